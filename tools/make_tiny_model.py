"""Write a tiny SD1.5 / SD2.1 / SDXL diffusers folder (real architecture, small widths): random weights, or with
``--pretrained`` the embedded SDXL or SD1.5 base that draws shapes (tools/pretrain_tiny.py).

    python tools/make_tiny_model.py --family sdxl --output tiny_models/sdxl [--seed 0]
    python tools/make_tiny_model.py --family sd15 --pretrained --output tiny_models/sd15_shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from library.models.families import FAMILY_ALIASES, resolve_family
from library.models.loading import save_diffusers
from library.models.tiny_models import build_pretrained_tiny_model, has_pretrained_tiny_model, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_ALIASES), help="sd15, sd21 or sdxl")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--pretrained", action="store_true",
                        help="the embedded pretrained base instead of random weights (sdxl and sd15 have one)")
    args = parser.parse_args(argv)
    if args.pretrained and not has_pretrained_tiny_model(args.family):
        parser.error(f"--pretrained: there is no pretrained tiny {resolve_family(args.family).name} model; "
                     "use --family sdxl or sd15, or leave --pretrained out for random weights")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        parser.error(f"{output} already exists and is not an empty folder; choose a new --output")
    start = time.perf_counter()
    if args.pretrained:
        save_diffusers(build_pretrained_tiny_model(args.family), output)
    else:
        make_tiny_model(args.family, output, seed=args.seed)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    print(f"wrote {'pretrained' if args.pretrained else 'random'} tiny {args.family} model to {output} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
