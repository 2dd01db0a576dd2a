"""Merge any network file (LoRA, DoRA, LoHa, LoKr, (IA)³, full, OFT... as kohya and LyCORIS write them) into
the weights of a model, with the result LyCORIS's own modules give: the weight its forward pass applies, which
is what its merge (``lycoris.utils.merge``) writes too, except where lycoris-lora 4.1.3's merge is wrong (LoHa and
LoKr with alpha != rank; (IA)³, which it cannot merge): see `_merge_with_lycoris`.

Module names are kohya's: ``lora_unet_`` + the UNet path (diffusers paths for SD1/SD2, LDM/SAI paths for SDXL;
the other spelling is accepted too) and ``lora_te[N]_`` + the text encoder's ``text_model.`` path, for every
Linear, Conv2d and norm layer (LyCORIS's presets reach more layers than kohya's LoRA). Per module:

  * LoRA: ``W += ratio * up @ down * alpha / rank``; with a ``dora_scale`` (DoRA) the rescaled weight of
    `library.adapters.dora.dora_merged_weight` (LyCORIS's convention and multiplier).
  * Anything else: LyCORIS builds its own module from the tensors (``lycoris.modules.get_module`` /
    ``make_module``) around the layer and merges it (``merge_to(ratio)``), as its merge utility does; the
    lycoris-lora package is imported only then (one error line naming the install command without it).

A module that names no layer of the model is an error: the file was made for another model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from library.adapters.dora import dora_merged_weight
from library.adapters.errors import LoRAFileError, LoRAWeightsError
from library.adapters.lora_files import lora_delta_weight
from library.adapters.lycoris_files import AdapterModuleTensors, describe_kinds, import_lycoris, kind_counts, module_tensors
from library.adapters.targets import UNET_PREFIX, text_encoder_prefixes, underscored
from library.models.families import family_of_unet

MERGEABLE_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)


def kohya_named_layers(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> dict[str, nn.Module]:
    """Every Linear/Conv2d/norm layer of the model by its kohya module name (and the other UNet spelling)."""
    layers: dict[str, nn.Module] = {}
    aliases: dict[str, nn.Module] = {}
    if unet is not None:
        from library.models.ldm_layout import unet_table

        names_from_ldm = family_of_unet(unet).lora_names_from_ldm
        table = unet_table(dict(unet.config))
        for path, module in unet.named_modules():
            if not isinstance(module, MERGEABLE_LAYERS):
                continue
            ldm_key = table.diffusers_key_to_ldm(path + ".weight")
            ldm = ldm_key[: -len(".weight")] if ldm_key else None
            ours, other = (ldm, path) if names_from_ldm and ldm else (path, ldm)
            layers[underscored(UNET_PREFIX, ours)] = module
            if other:
                aliases[underscored(UNET_PREFIX, other)] = module
    for prefix, text_encoder in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for path, module in text_encoder.named_modules():
            if isinstance(module, MERGEABLE_LAYERS):
                canonical = path if path.startswith("text_model.") else f"text_model.{path}"
                layers[underscored(prefix, canonical)] = module
                aliases[underscored(prefix, canonical[len("text_model."):])] = module
    return {**aliases, **layers}


@torch.no_grad()
def merge_network_weights(unet: nn.Module | None, text_encoders: Sequence[nn.Module],
                          weights_sd: dict[str, torch.Tensor], ratio: float, source: str) -> dict[str, int]:
    """Merge every module of ``weights_sd`` into the model's layers in place; returns the modules merged per
    kind. Unknown keys or modules that match no layer are errors (nothing is merged then)."""
    modules, others = module_tensors(weights_sd)
    if others:
        raise LoRAFileError(f"{source}: {len(others)} tensor(s) belong to no network module that LoRA, DoRA or "
                            f"LyCORIS defines, e.g. {others[0]}")
    layers = kohya_named_layers(unet, text_encoders)
    unmatched = sorted(name for name in modules if name not in layers)
    if unmatched:
        raise LoRAWeightsError(f"{source}: {len(unmatched)} of {len(modules)} module(s) match no layer of this model, "
                               f"e.g. {unmatched[0]}; is the file for another model family?")
    lycoris_modules = None
    for name, module in modules.items():
        module = AdapterModuleTensors(name, {k: v.float() for k, v in module.tensors.items()})
        layer = layers[name]
        if module.is_lora_or_dora:
            layer.weight.copy_(_lora_merged_weight(module, layer.weight, ratio, source))
            continue
        if lycoris_modules is None:
            lycoris_modules = import_lycoris("modules", source, describe_kinds(kind_counts(modules)))
        _merge_with_lycoris(lycoris_modules, module, layer, ratio, source)
    return kind_counts(modules)


def _lora_merged_weight(module: AdapterModuleTensors, weight: torch.Tensor, ratio: float,
                        source: str) -> torch.Tensor:
    down, up = module.tensors["lora_down.weight"], module.tensors["lora_up.weight"]
    rank = down.shape[0]
    scale = (module.alpha if module.alpha is not None else rank) / rank
    delta = lora_delta_weight(down.to(weight.device), up.to(weight.device), scale)
    if delta.numel() != weight.numel():
        raise LoRAWeightsError(f"{source}: {module.name} has an update of shape {tuple(delta.shape)} for a weight of "
                               f"shape {tuple(weight.shape)}; is the file for another model?")
    delta = delta.reshape(weight.shape)
    if not module.has_dora:
        return weight.float() + ratio * delta
    dora_scale = module.tensors["dora_scale"]
    if dora_scale.numel() != weight.shape[0]:
        raise LoRAFileError(f"{source}: {module.name}.dora_scale has {dora_scale.numel()} values, not one per output "
                            f"row ({weight.shape[0]}): only DoRA scales on the output side (LyCORIS's default "
                            "wd_on_output=True) can be merged")
    return dora_merged_weight(weight, delta, dora_scale.to(weight.device), ratio)


def _merge_with_lycoris(lycoris_modules, module: AdapterModuleTensors, layer: nn.Module, ratio: float,
                        source: str) -> None:
    """LyCORIS's merge of one module: its module class is built from the tensors (``get_module`` /
    ``make_module``, as ``lycoris.utils.merge`` does) and merged into ``layer``.

    Two corrections to lycoris-lora 4.1.3, so that the merged weight is what LyCORIS's own forward pass (and
    A1111/ComfyUI) apply: LoHa and LoKr take the weight their forward computes (``get_weight`` times the
    scalar, then DoRA's rescale or ``ratio`` times it), because their ``merge_to`` applies ``alpha / rank``
    twice; (IA)³ modules are built with their ``on_input`` side, because ``make_module`` fails on them."""
    try:
        if module.algorithm == "ia3":
            lyco_module = lycoris_modules.IA3Module(module.name, layer, 1,
                                                    train_on_input=bool(int(module.tensors["on_input"])))
            lyco_module.weight.data.copy_(module.tensors["weight"])
        else:
            prefixed = {f"{module.name}.{key}": value for key, value in module.tensors.items()}
            lyco_type, params = lycoris_modules.get_module(prefixed, module.name)
            if lyco_type is None:
                raise LoRAFileError(f"{source}: LyCORIS recognises no algorithm in {module.name} (keys "
                                    f"{', '.join(sorted(module.tensors))})")
            lyco_module = lycoris_modules.make_module(lyco_type, params, module.name, layer)
    except (ValueError, RuntimeError, TypeError) as error:
        raise LoRAWeightsError(f"{source}: LyCORIS cannot apply {module.name} ({module.kind}) to a "
                               f"{type(layer).__name__} of weight shape {tuple(layer.weight.shape)}: "
                               f"{' '.join(str(error).split())}") from error
    if lyco_module is None:
        raise LoRAFileError(f"{source}: LyCORIS cannot merge {module.kind} modules into weights ({module.name})")
    lyco_module.to(layer.weight.device)
    if module.algorithm not in ("loha", "lokr"):
        lyco_module.merge_to(ratio)
        return
    weight = layer.weight
    diff = lyco_module.get_weight(lyco_module.shape).to(weight.dtype) * lyco_module.scalar.to(weight)
    merged = lyco_module.apply_weight_decompose(weight + diff, ratio) if lyco_module.wd else weight + diff * ratio
    weight.copy_(merged)


# --------------------------------------------------------------------------------------------------
# what a module changes, without the model (for check_lora_weights)

# algorithms whose update is a product of their own tensors (so its norm needs no base weight)
UPDATE_WITHOUT_BASE = ("lora", "loha", "lokr", "full")


def update_of_module(module: AdapterModuleTensors, source: str) -> torch.Tensor | None:
    """The dense update ``dW`` at multiplier 1 (flattened to out x in*k*k for LyCORIS convolutions) of a
    LoRA/DoRA (``up @ down * alpha / rank``, before DoRA's rescale), LoHa, LoKr or full module, computed by
    LyCORIS's functional API with the scale its module classes use; None for algorithms whose update depends
    on the base weight ((IA)³, OFT, norms, GLoRA)."""
    t = {key: value.float() for key, value in module.tensors.items()}
    algorithm = module.algorithm
    if algorithm == "lora" and "lora_mid.weight" not in t:
        rank = t["lora_down.weight"].shape[0]
        return lora_delta_weight(t["lora_down.weight"], t["lora_up.weight"], (module.alpha or rank) / rank)
    if algorithm == "full":
        return t["diff"]
    if algorithm == "loha":
        functional = import_lycoris("functional.loha", source, "LoHa")
        rank = t["hada_w1_b"].shape[0]
        return functional.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                      t.get("hada_t1"), t.get("hada_t2"), gamma=(module.alpha or rank) / rank)
    if algorithm == "lokr":
        functional = import_lycoris("functional.lokr", source, "LoKr")
        return functional.diff_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                      t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"),
                                      gamma=module.alpha if module.alpha is not None else (module.rank or 1))
    if algorithm == "lora":  # LoCon's Tucker form: LyCORIS's rebuild
        functional = import_lycoris("functional.locon", source, "LoCon (Tucker)")
        rank = t["lora_down.weight"].shape[0]
        return functional.diff_weight(t["lora_down.weight"], t["lora_up.weight"], t["lora_mid.weight"],
                                      gamma=(module.alpha or rank) / rank)
    return None
