"""Merge LoRAs into a Stable Diffusion model, or several LoRAs into one LoRA file (kohya's merge_lora.py).

    # bake LoRAs into a model (SD1, SD2 or SDXL; diffusers folder or single file in, either out)
    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    # merge LoRAs into one LoRA file
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 1 [--concat]

Into a model (``--sd_model``): each LoRA adds ``ratio * up @ down * alpha / rank`` to the weight it targets,
computed by ``networks.lora``'s ``merge_to`` in float32 (the result is what the LoRA applied at multiplier
``ratio`` gives, as in A1111). The family is read from the model (``--v2``/``--sdxl`` only assert it; kohya
needs ``sdxl_merge_lora.py`` for SDXL). An output ending in ``.safetensors``/``.ckpt`` is one file in the
original layout, anything else a diffusers folder. A LoRA whose modules are not in the model is an error
(kohya skips them with a log line, which hides a LoRA made for another family).

DoRA and LyCORIS files (LoHa, LoKr, (IA)³, full, OFT, ... as LyCORIS's kohya plug-in or our networks.lycoris_kohya
write them) merge into a model too, with the result of LyCORIS's own merge (``lycoris.utils.merge``): DoRA
through ``library.adapters.dora`` (no extra package), the LyCORIS algorithms through the optional lycoris-lora
package's own module classes (``pip install lycoris-lora==4.1.3``). See ``library.adapters.lycoris_merge``.

Saved files carry the ModelSpec keys the training scripts write (``modelspec.*``: architecture,
implementation, title = the output's name, resolution, prediction type, date, hash, merged_from = the inputs);
``--no_metadata`` leaves them out.

LoRA + LoRA, default (kohya's semantics, for LoRAs of the same rank per module): the factors are summed,
``down = sum(r_i * s_i * down_i)``, ``up = sum(|r_i| * s_i * up_i)`` with ``s_i = sqrt(alpha_i / alpha_1)``
and the first LoRA's alpha kept. So the ratio multiplies both factors (a lone LoRA's update scales with
``r * |r|``: take square roots of the ratios you would use in A1111), and two different LoRAs also give the
cross terms ``up_1 @ down_2`` and ``up_2 @ down_1``: this is a blend, not the sum of the two updates. Modules
present in only some LoRAs are taken from those; different ranks for one module are an error (use --concat).

LoRA + LoRA with ``--concat``: the ranks are stacked (output rank = sum of the ranks), and the result is
exactly ``sum(r_i * delta_i)``, what applying the LoRAs together at multipliers ``r_i`` does. The first LoRA's
alpha is kept and each LoRA's factors are rescaled by ``sqrt(|c_i|)`` (sign on down) with
``c_i = r_i * (alpha_i / rank_i) / (alpha_1 / rank_total)``. This differs from kohya, whose ``--concat``
keeps the summed-factor scaling, so each update there comes out multiplied by ``r_i * |r_i| * rank_i / rank_total``.

Merging into one LoRA takes kohya LoRA/LoCon files only: a LyCORIS or DoRA file is refused with one line.

The output is never overwritten. ``--shuffle`` permutes the rank dimension (same effect, different file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import torch

from library.adapters.errors import LoRAFileError, LoRAWeightsError
from library.models.model_spec import fill_in_hash
from library.adapters.lora_merge import merge_lora_modules
from library.adapters.tool_model_spec import merged_lora_model_spec, model_resolution, model_spec_metadata
from library.adapters.lora_files import (
    PRECISIONS,
    LoRAFactors,
    common_value,
    modules_state_dict,
    precision_dtype,
    read_lora_modules,
    refuse_existing,
    save_lora_file,
)

SINGLE_FILE_OUTPUTS = (".safetensors", ".ckpt")
LORA_INTO_LORA = ("merging into one LoRA file (no --sd_model) takes kohya LoRA/LoCon files only; merge LyCORIS "
                  "and DoRA files into a model with --sd_model")


# --------------------------------------------------------------------------------------------------
# LoRA + LoRA


def lora_merge_metadata(merged: dict[str, LoRAFactors], sources: list[dict[str, str]], inputs: list[str],
                        save_to: str, no_metadata: bool) -> dict[str, str]:
    """kohya's minimum network metadata (dims/alphas or "Dynamic"), plus the ModelSpec keys (title = output name,
    merged_from = the inputs, family/resolution/prediction type from the inputs' metadata)."""
    def first(key: str) -> str | None:
        return next((meta[key] for meta in sources if meta.get(key)), None)

    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": common_value([m.rank for m in merged.values()]),
        "ss_network_alpha": common_value([float(m.effective_alpha) for m in merged.values()]),
    }
    for key in ("ss_v2", "ss_base_model_version"):
        if first(key) is not None:
            metadata[key] = first(key)
    if no_metadata:
        return metadata
    metadata.update(merged_lora_model_spec(sources, save_to=save_to, merged_from=inputs))
    return metadata


def merge_lora_files(files: list[str], ratios: list[float], save_to: str, concat: bool = False, shuffle: bool = False,
                     merge_dtype: torch.dtype = torch.float32, save_dtype: torch.dtype | None = None,
                     no_metadata: bool = False) -> dict[str, LoRAFactors]:
    loras, sources = [], []
    for file, ratio in zip(files, ratios):
        modules, metadata = read_lora_modules(file, refusal=LORA_INTO_LORA)
        modules = {n: LoRAFactors(n, m.down.to(merge_dtype), m.up.to(merge_dtype), m.alpha) for n, m in modules.items()}
        loras.append((modules, ratio))
        sources.append(metadata)
        print(f"{file}: {len(modules)} modules, rank(s) {sorted({m.rank for m in modules.values()})}, ratio {ratio}")
    merged = merge_lora_modules(loras, concat, shuffle)
    metadata = lora_merge_metadata(merged, sources, files, save_to, no_metadata)
    save_lora_file(modules_state_dict(merged, save_dtype or merge_dtype), save_to, metadata)
    fill_in_hash(save_to)
    print(f"merged {len(files)} LoRAs ({'concatenated ranks' if concat else 'summed factors'}) into {len(merged)} "
          f"modules, rank {metadata['ss_network_dim']}, alpha {metadata['ss_network_alpha']} -> {save_to}")
    return merged


# --------------------------------------------------------------------------------------------------
# LoRA -> model


def merge_into_model_file(sd_model: str, files: list[str], ratios: list[float], save_to: str,
                          merge_dtype: torch.dtype, save_dtype: torch.dtype | None, expected_family: str | None,
                          no_metadata: bool) -> None:
    from library.models.loading import load_model, save_diffusers, save_single_file

    model = load_model(sd_model, family=expected_family)
    from networks.lora import merge_into_model

    merge_into_model(model, files, ratios, merge_dtype)
    dtype = save_dtype or merge_dtype
    if Path(save_to).suffix.lower() in SINGLE_FILE_OUTPUTS:
        metadata = None if no_metadata else model_spec_metadata(
            family=model.family, kind="checkpoint", save_to=save_to, resolution=model_resolution(model),
            v_prediction=model.prediction_type == "v_prediction", merged_from=[sd_model, *files])
        save_single_file(model, save_to, dtype=dtype, metadata=metadata)
        fill_in_hash(save_to)
    else:
        save_diffusers(model, save_to, dtype=dtype)
    print(f"saved {model.family.name} model with {len(files)} network file(s) merged -> {save_to}")


# --------------------------------------------------------------------------------------------------
# command line


def add_merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's merge_lora.py flags (plus --sdxl, since one script handles every family here)."""
    parser.add_argument("--sd_model", default=None,
                        help="model to merge into (diffusers folder or .safetensors/.ckpt); omit to merge LoRAs into one LoRA")
    parser.add_argument("--save_to", required=True,
                        help="output: .safetensors/.ckpt (model or LoRA) or a folder (diffusers model); never overwritten")
    parser.add_argument("--models", nargs="+", required=True,
                        help="LoRA files (.safetensors, .pt, .ckpt); into --sd_model also DoRA and LyCORIS files")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float", help="dtype of the merge (float recommended)")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype of the output (default: --precision)")
    parser.add_argument("--concat", action="store_true",
                        help="stack the ranks (output rank = sum of ranks): the exact sum of the LoRAs' updates")
    parser.add_argument("--shuffle", action="store_true", help="randomly permute the rank dimension of the result")
    parser.add_argument("--no_metadata", action="store_true", help="write only the minimum ss_* metadata, no ModelSpec")
    parser.add_argument("--v2", action="store_true", help="assert that --sd_model is an SD2 model (detected anyway)")
    parser.add_argument("--sdxl", action="store_true", help="assert that --sd_model is an SDXL model (detected anyway)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_merge_lora_arguments(parser)
    args = parser.parse_args(argv)
    ratios = args.ratios if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        parser.error(f"--ratios gives {len(ratios)} value(s) for {len(args.models)} model(s)")
    if args.v2 and args.sdxl:
        parser.error("--v2 and --sdxl contradict each other")
    if args.sd_model is None and Path(args.save_to).suffix.lower() not in (".safetensors", ".pt", ".ckpt"):
        parser.error("a merged LoRA is saved as .safetensors, .pt or .ckpt: give --save_to such a file name")
    if args.sd_model is not None and (args.concat or args.shuffle):
        parser.error("--concat and --shuffle apply to merging LoRAs into a LoRA, not into --sd_model")
    from library.models.loading import ModelLoadError

    try:
        refuse_existing(args.save_to)
        merge_dtype = precision_dtype(args.precision)
        save_dtype = precision_dtype(args.save_precision)
        if args.sd_model is None:
            merge_lora_files(args.models, ratios, args.save_to, args.concat, args.shuffle, merge_dtype, save_dtype,
                             args.no_metadata)
        else:
            from library.models.families import SD2, SDXL

            family = SD2.name if args.v2 else SDXL.name if args.sdxl else None
            merge_into_model_file(args.sd_model, args.models, ratios, args.save_to, merge_dtype, save_dtype, family,
                                  args.no_metadata)
    except (FileExistsError, LoRAFileError, LoRAWeightsError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
