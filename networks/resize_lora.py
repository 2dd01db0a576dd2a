"""Change the rank of a kohya LoRA by SVD, keeping its effect as far as the new rank allows (kohya's resize_lora.py).

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8 [--new_conv_rank 4]
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Per module: ``M = up @ down`` (convolutions flattened to out x (in*kh*kw)), its SVD ``U S Vh``, and the best
rank-``r`` approximation kept as ``up = U_r S_r``, ``down = Vh_r``. The new alpha is ``alpha_old / rank_old *
r`` (kohya's rule), so ``alpha / rank`` is unchanged and the module's update is the truncation of the old one:
a LoRA whose modules truly have rank <= r comes out with the same effect.

The rank ``r`` is ``--new_rank`` (``--new_conv_rank`` for 3x3 LoCon convs, default --new_rank), or chosen per
module by ``--dynamic_method`` with ``--new_rank`` as the cap (kohya's rules on the singular values S):
  * ``sv_ratio X``: keep the singular values larger than ``S[0] / X``;
  * ``sv_fro X``: the smallest rank whose Frobenius norm is at least the fraction X of the whole;
  * ``sv_cumulative X``: the smallest rank whose sum of singular values is at least the fraction X of the sum.
An all-zero module keeps rank 1. ``--verbose`` prints, per module, the fraction of sum(S) and of the
Frobenius norm retained (``||new update|| / ||old update||``) and S[0]/S[r-1]; the mean Frobenius retention
is always printed.

Only kohya LoRA/LoCon files are resized: a LyCORIS (LoHa, LoKr, (IA)³, full, OFT) or DoRA file is refused with
one line naming its kind (their updates are not ``up @ down``; DoRA's scale is tied to the update it was trained
with).

Metadata: the input's is kept; ``ss_network_dim``/``ss_network_alpha`` become the new values, or "Dynamic"
with a dynamic method, and ``ss_training_comment`` gets kohya's note about the resize. The hashes are renewed.

Differences from kohya: the SVD is computed exactly from the rank-``r_old`` factors (QR of up and down, then
the SVD of an r_old x r_old core), so no ``svd_lowrank`` approximation is ever needed and ``--svd_lowrank_niter``
has no effect; a rank cannot grow beyond the module's old rank (kohya pads with singular values ~0); 1x1
convolutions (SD1's proj_in/proj_out) take ``--new_rank`` like the Linear layers they are trained with, where
kohya gives every 4-D weight ``--new_conv_rank``; ``ss_network_alpha`` is the alpha all Linear modules share
(kohya writes the last module's).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


import torch

from library.adapters.errors import LoRAFileError
from library.adapters.lora_files import (
    PRECISIONS,
    modules_state_dict,
    precision_dtype,
    read_lora_modules,
    refuse_existing,
    save_lora_file,
)
from library.adapters.lora_resize import DYNAMIC_METHODS, resize_lora_modules, resize_metadata

RESIZABLE = ("resize_lora.py resizes kohya LoRA/LoCon files only (lora_down/lora_up/alpha keys): LoHa, LoKr, "
             "(IA)³, full and OFT updates are not up @ down, and a DoRA scale belongs to the update it was trained with")


# --------------------------------------------------------------------------------------------------
# command line


def add_resize_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's resize_lora.py flags and defaults."""
    parser.add_argument("--model", required=True, help="LoRA to resize (.safetensors, .pt, .ckpt)")
    parser.add_argument("--save_to", required=True, help="output .safetensors/.pt/.ckpt/.pth; never overwritten")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank for 3x3 conv (LoCon) modules (default: --new_rank)")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype of the output (default float)")
    parser.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    parser.add_argument("--verbose", action="store_true", help="print the retained fractions for every module")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values (--new_rank caps it)")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: S[0]/S[r] limit (> 1); sv_fro, sv_cumulative: fraction to keep (0-1]")
    parser.add_argument("--svd_lowrank_niter", type=int, default=2,
                        help="accepted for kohya command lines; has no effect (the SVD here is exact and cheap)")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if Path(args.save_to).suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth"):
        parser.error("--save_to must be a .safetensors, .ckpt, .pt or .pth file")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        parser.error("--new_rank and --new_conv_rank must be at least 1")
    if args.dynamic_method and args.dynamic_param is None:
        parser.error(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_param is not None and not args.dynamic_method:
        parser.error("--dynamic_param is used only with --dynamic_method")
    if args.dynamic_method == "sv_ratio" and args.dynamic_param <= 1:
        parser.error("--dynamic_param for sv_ratio is the largest S[0]/S[r] kept and must be > 1")
    if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
        parser.error(f"--dynamic_param for {args.dynamic_method} is a fraction in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_resize_lora_arguments(parser)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    try:
        refuse_existing(args.save_to)
        modules, metadata = read_lora_modules(args.model, refusal=RESIZABLE)
    except (FileExistsError, LoRAFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.dynamic_method:
        print(f"choosing ranks with {args.dynamic_method} {args.dynamic_param:g}, at most {args.new_rank}")
    resized, infos = resize_lora_modules(modules, args.new_rank, conv_rank, args.dynamic_method, args.dynamic_param,
                                         args.device)
    if args.verbose:
        for info in infos:
            print(info.line(bool(args.dynamic_method)))
    fro = torch.tensor([i.fro_retained for i in infos if not math.isnan(i.fro_retained)])
    if len(fro):
        print(f"Average Frobenius norm retention: {float(fro.mean()):.2%} | std: {float(fro.std(unbiased=False)):0.3f}")
    new_metadata = resize_metadata(metadata, resized, infos, args.new_rank, conv_rank, args.dynamic_method, args.dynamic_param)
    save_lora_file(modules_state_dict(resized, precision_dtype(args.save_precision) or torch.float32), args.save_to, new_metadata)
    ranks = sorted({m.rank for m in resized.values()})
    print(f"resized {len(resized)} modules (rank(s) {ranks}) -> {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
