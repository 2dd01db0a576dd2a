"""Extract a LoRA that turns one model into another: SVD of their weight difference (kohya's extract_lora_from_models.py).

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to diff.safetensors --dim 32 [--conv_dim 16] [--clamp_quantile 0.99] [--min_diff 0.01] [--device cuda]

Both models may be diffusers folders or single files of one family (SD1, SD2 or SDXL: detected; ``--v2`` and
``--sdxl`` only assert it). The modules are those ``networks.lora`` trains, named as it names them (SAI
paths for SDXL): Linear/1x1 layers of the UNet's transformer blocks, with ``--conv_dim`` also the ResNet and
down/up-sampler layers (their 3x3 convs at ``--conv_dim``), and the CLIP attention/MLP layers.

Per module: ``D = W_tuned - W_org`` (3x3 kernels flattened), ``D ~ U_r S_r Vh_r``; ``up = U_r S_r`` and
``down = Vh_r``, then both are clamped to ``[-h, h]`` where ``h`` is the ``--clamp_quantile`` quantile of all
their values together (kohya's outlier clamp; ``--clamp_quantile 1`` turns it off, where kohya would still clip
negatives beyond the largest positive value). alpha = rank, so the file's update is exactly ``up @ down``.
The UNet is always extracted; a text encoder only if one of its weights differs by more than ``--min_diff``
(decided per encoder: kohya decides for SDXL's two encoders together). ``r`` is ``--dim`` (``--conv_dim`` for
3x3 convs), at most the matrix's smaller side (kohya caps 3x3 convs at their channel counts instead).

The file is written through ``networks.lora`` (``create_network_from_weights`` + ``save_weights``), so its
keys are checked against the model and it carries kohya's minimum metadata (ss_network_dim = dim,
ss_network_alpha = dim, conv_dim/conv_alpha in ss_network_args) plus the ModelSpec keys the training scripts
write (architecture, implementation, title, the original model's resolution and prediction type, date, hash,
merged_from = the two models) unless ``--no_metadata``.

It writes LoRA/LoCon only (kohya's tool does too): no flag asks for DoRA, LoHa or LoKr, and an unknown flag
(``--algo lokr``, ``--dora_wd``) is refused by the argument parser with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from library.adapters.errors import LoRAFileError
from library.adapters.lora_extract import extract_lora_state_dict
from library.adapters.lora_files import PRECISIONS, precision_dtype, refuse_existing
from library.adapters.tool_model_spec import model_resolution, model_spec_metadata
from library.models.model_spec import fill_in_hash

if TYPE_CHECKING:
    from library.models.families import ModelFamily


# --------------------------------------------------------------------------------------------------
# files


def extraction_metadata(family: "ModelFamily", dim: int, conv_dim: int | None, v_parameterization: bool, save_to: str,
                        no_metadata: bool, resolution: tuple[int, int] | None = None,
                        merged_from: list[str] | None = None) -> dict[str, str]:
    """kohya's minimum network metadata, plus the ModelSpec keys the training scripts write (the hash is filled
    in once the file is saved); ``resolution`` defaults to the family's, ``merged_from`` names the two models."""
    network_args = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))}
    metadata = {
        "ss_v2": str(family.kohya_v2),
        "ss_base_model_version": family.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(network_args),
    }
    if not no_metadata:
        side = family.default_resolution
        metadata.update(model_spec_metadata(family=family, kind="lora", save_to=save_to,
                                            resolution=resolution or (side, side), v_prediction=v_parameterization,
                                            merged_from=merged_from))
    return metadata


def extract(args: argparse.Namespace) -> int:
    from library.models.loading import load_model
    from networks.lora import create_network_from_weights

    from library.models.families import SD2, SDXL

    family = SD2.name if args.v2 else SDXL.name if args.sdxl else None
    print(f"loading original model {args.model_org}")
    model_org = load_model(args.model_org, family=family)
    print(f"loading tuned model {args.model_tuned}")
    model_tuned = load_model(args.model_tuned, family=family)
    if model_org.family is not model_tuned.family:
        raise LoRAFileError(f"--model_org is {model_org.family.name} but --model_tuned is {model_tuned.family.name}")
    state_dict = extract_lora_state_dict(model_org, model_tuned, args.dim, args.conv_dim, args.clamp_quantile,
                                         args.min_diff, args.device)
    del model_tuned
    network, _ = create_network_from_weights(1.0, None, None, model_org.text_encoders, model_org.unet,
                                             weights_sd=state_dict, for_inference=True)
    v_param = args.v_parameterization if args.v_parameterization is not None else model_org.prediction_type == "v_prediction"
    metadata = extraction_metadata(model_org.family, args.dim, args.conv_dim, v_param, args.save_to, args.no_metadata,
                                   resolution=model_resolution(model_org), merged_from=[args.model_org, args.model_tuned])
    network.save_weights(args.save_to, precision_dtype(args.save_precision), metadata)
    fill_in_hash(args.save_to)
    print(f"extracted {len(network.unet_loras)} UNet and {len(network.text_encoder_loras)} text-encoder modules "
          f"-> {args.save_to}")
    return 0


def add_extract_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's extract_lora_from_models.py flags and defaults."""
    parser.add_argument("--model_org", required=True, help="original model: diffusers folder or .safetensors/.ckpt")
    parser.add_argument("--model_tuned", required=True, help="tuned model; the LoRA is tuned - original")
    parser.add_argument("--save_to", required=True, help="output LoRA (.safetensors, .pt, .ckpt); never overwritten")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None, help="rank for 3x3 convs (LoCon); default: none extracted")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp the factors at this quantile of their values (default 0.99; 1 = no clamp)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="a text encoder is extracted only if a weight changed by more than this (default 0.01)")
    parser.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype of the output (default float)")
    parser.add_argument("--no_metadata", action="store_true", help="write only the minimum ss_* metadata, no ModelSpec")
    parser.add_argument("--v2", action="store_true", help="assert the models are SD2 (detected anyway)")
    parser.add_argument("--sdxl", action="store_true", help="assert the models are SDXL (detected anyway)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="mark the LoRA as v-prediction in ModelSpec (default: the original model's scheduler)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_extract_lora_arguments(parser)
    args = parser.parse_args(argv)
    if args.v2 and args.sdxl:
        parser.error("--v2 and --sdxl contradict each other")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        parser.error("--dim and --conv_dim must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        parser.error("--clamp_quantile must be in (0, 1]")
    if Path(args.save_to).suffix.lower() not in (".safetensors", ".pt", ".ckpt"):
        parser.error("--save_to must be a .safetensors, .pt or .ckpt file")
    from library.models.loading import ModelLoadError

    try:
        refuse_existing(args.save_to)
        return extract(args)
    except (FileExistsError, LoRAFileError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
