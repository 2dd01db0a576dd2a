"""Write a tiny random-weight SD1.5 / SD2.1 / SDXL diffusers folder (real architecture, small widths).

    python tools/make_tiny_model.py --family sdxl --output tiny_models/sdxl [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from library.models.families import FAMILY_ALIASES
from library.models.tiny_models import make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_ALIASES), help="sd15, sd21 or sdxl")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        parser.error(f"{output} already exists and is not an empty folder; choose a new --output")
    start = time.perf_counter()
    make_tiny_model(args.family, output, seed=args.seed)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    print(f"wrote tiny {args.family} model to {output} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
