"""Convert a Stable Diffusion model between a diffusers folder and a single-file checkpoint.

    python tools/convert_model.py --input model.safetensors --output model_diffusers
    python tools/convert_model.py --input model_diffusers --output model.safetensors --save_precision fp16

An output ending in .safetensors or .ckpt is written as one file in the original (LDM) layout that A1111
and ComfyUI load; any other output is a diffusers folder. Single files we write carry their diffusers
configs, so they convert back to an identical folder with no extra flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from library.models.families import FAMILY_ALIASES
from library.models.loading import SAVE_DTYPES, ModelLoadError, load_model, save_diffusers, save_single_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="diffusers folder or .safetensors/.ckpt file")
    parser.add_argument("--output", required=True, help=".safetensors/.ckpt for a single file, else a folder")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the written weights (default: as loaded)")
    parser.add_argument("--family", choices=sorted(FAMILY_ALIASES), default=None,
                        help="expected model family; an error if the input is another")
    parser.add_argument("--model_config", default=None,
                        help="diffusers folder whose configs describe a non-standard single-file input")
    parser.add_argument("--vae", default=None, help="replace the VAE with this file or folder")
    parser.add_argument("--v_parameterization", action="store_true",
                        help="mark the model as v-prediction (SD2 768-v style)")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and (output.is_file() or any(output.iterdir())):
        parser.error(f"{output} already exists; choose a new --output (nothing was written)")
    start = time.perf_counter()
    try:
        model = load_model(args.input, family=args.family, vae=args.vae, model_config=args.model_config,
                           prediction_type="v_prediction" if args.v_parameterization else None)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    dtype = SAVE_DTYPES[args.save_precision] if args.save_precision else None
    if output.suffix.lower() in (".safetensors", ".ckpt"):
        save_single_file(model, output, dtype=dtype)
    else:
        save_diffusers(model, output, dtype=dtype)
    print(f"converted {model.family.name} model {args.input} -> {output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
