"""The UNet as kohya's own UNet classes would show it to LyCORIS: same module paths, same class names.

LyCORIS's kohya plug-in (``lycoris.kohya``) chooses modules by walking ``unet.named_modules()`` and matching
class names (``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``CrossAttention``,
``TimestepEmbedding``...) and module paths (``conv_in``, ``time_embedding.linear_1``), and it names each module
``lora_unet_`` + that path. Its presets are written for kohya's UNets (``library/original_unet.py`` for SD1/SD2,
``library/sdxl_original_unet.py`` for SDXL). We train diffusers' ``UNet2DConditionModel``, so `kohya_unet_view`
builds a tree of empty containers with kohya's paths and class names whose leaves are our real
Linear/Conv2d/norm modules. LyCORIS walks the view, so presets, ``module_algo_map``/``name_algo_map`` and file
names mean what they mean under kohya, and the LyCORIS modules it makes wrap (and train) the real layers.

  * SD1/SD2: kohya's UNet uses diffusers' paths and class names, except that attention is ``CrossAttention``
    (diffusers: ``Attention``).
  * SDXL: kohya's UNet uses the original SAI/LDM paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``,
    resnet ``in_layers.2``/``emb_layers.1``/``out_layers.3``/``skip_connection``, ``time_embed.0``,
    ``label_emb.0.0``, ``out.2``) with ``nn.Sequential``/``nn.ModuleList`` containers between the blocks;
    paths come from the single-file key table (`library.models.ldm_layout.unet_table`).

Text encoders: transformers 5 dropped CLIP's ``text_model`` level, which kohya's names keep
(``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``); `kohya_text_encoder_view` puts it back.

The view is not registered anywhere: nothing saves it, and it adds no parameters of its own.
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from library.models.families import family_of_unet
from library.models.ldm_layout import unet_table

# diffusers class -> kohya's class of the same module (kohya's own UNet classes); others keep their name
_KOHYA_CLASS = {"Attention": "CrossAttention", "UNet2DConditionModel": "UNet2DConditionModel"}
_SDXL_ROOT = "SdxlUNet2DConditionModel"
_SDXL_TOP = {"time_embed": "Sequential", "label_emb": "Sequential", "input_blocks": "ModuleList",
             "middle_block": "ModuleList", "output_blocks": "ModuleList", "out": "ModuleList"}
_DIFFUSERS_BLOCK = re.compile(r"^(.*?\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+)(?:\.(.*))?$")


class ViewNode(nn.Module):
    """A container in the kohya-named view; it only holds children (the class name is what LyCORIS reads)."""

    def forward(self, *args, **kwargs):  # pragma: no cover - the view is walked, never called
        raise RuntimeError("the kohya-named UNet view is for naming modules only; call the real UNet")


@lru_cache(maxsize=None)
def _node_class(name: str) -> type[ViewNode]:
    """One ViewNode subclass per kohya class name (cached, so two views share classes)."""
    return type(name, (ViewNode,), {"__module__": __name__, "__qualname__": name})


def _is_leaf(module: nn.Module) -> bool:
    """What a LyCORIS module can wrap: Linear, convolutions, and norms (``train_norm``)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or "Norm" in type(module).__name__


def kohya_unet_view(unet: nn.Module) -> nn.Module:
    """The kohya-named view of ``unet`` (see the module docstring); its leaves are ``unet``'s own modules."""
    family = family_of_unet(unet)
    modules = dict(unet.named_modules())
    if family.lora_names_from_ldm:
        table = unet_table(dict(unet.config))
        leaves = {}
        for path, module in modules.items():
            if path and _is_leaf(module):
                ldm = table.diffusers_key_to_ldm(path + ".weight")
                if ldm is not None:
                    leaves[ldm[: -len(".weight")]] = (path, module)
        return _build(_SDXL_ROOT, leaves, lambda kohya_path, diffusers_path: _sdxl_class(kohya_path, diffusers_path,
                                                                                         modules))
    leaves = {path: (path, module) for path, module in modules.items() if path and _is_leaf(module)}
    return _build("UNet2DConditionModel", leaves,
                  lambda kohya_path, diffusers_path: _kohya_name(type(modules[kohya_path]).__name__))


def kohya_text_encoder_view(text_encoder: nn.Module) -> nn.Module:
    """``text_encoder`` with kohya's paths: transformers 4's CLIP models have a ``text_model`` level
    (``text_model.encoder.layers.0.self_attn``), which transformers 5 dropped; the view puts it back over the
    real submodules (the projection of ``CLIPTextModelWithProjection`` stays at the root)."""
    if hasattr(text_encoder, "text_model"):
        return text_encoder
    root = _node_class(type(text_encoder).__name__)()
    inner = _node_class("CLIPTextTransformer")()
    root.add_module("text_model", inner)
    for name, child in text_encoder.named_children():
        (root if name == "text_projection" else inner).add_module(name, child)
    return root


def _kohya_name(diffusers_class: str) -> str:
    return _KOHYA_CLASS.get(diffusers_class, diffusers_class)


def _build(root_class: str, leaves: dict[str, tuple[str, nn.Module]], class_of) -> nn.Module:
    """A tree of ViewNodes holding each leaf at its kohya path; ``class_of(kohya_path, diffusers_leaf_path)``
    names the container at ``kohya_path``."""
    root = _node_class(root_class)()
    nodes: dict[str, nn.Module] = {"": root}
    for kohya_path, (diffusers_path, module) in leaves.items():
        parts = kohya_path.split(".")
        parent = root
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            node = nodes.get(prefix)
            if node is None:
                node = _node_class(class_of(prefix, diffusers_path))()
                parent.add_module(parts[depth - 1], node)
                nodes[prefix] = node
            parent = node
        parent.add_module(parts[-1], module)
    return root


def _sdxl_class(kohya_path: str, diffusers_leaf: str, modules: dict[str, nn.Module]) -> str:
    """kohya's class (sdxl_original_unet.py) of the container at LDM path ``kohya_path``, which holds the
    diffusers leaf ``diffusers_leaf``."""
    parts = kohya_path.split(".")
    if len(parts) == 1:
        return _SDXL_TOP[parts[0]]
    head = parts[0]
    if head in ("time_embed", "label_emb", "out"):
        return "Sequential"  # label_emb.0
    block_depth = 2 if head == "middle_block" else 3
    if len(parts) < block_depth:  # input_blocks.N / output_blocks.N
        if head == "input_blocks" and (parts[1] == "0" or ".downsamplers." in diffusers_leaf):
            return "Sequential"
        return "ModuleList"
    match = _DIFFUSERS_BLOCK.match(diffusers_leaf)
    if match is None:
        raise KeyError(f"SDXL UNet module {diffusers_leaf} ({kohya_path}) is in no resnet/attention/sampler block")
    block = modules[match.group(1)]
    if len(parts) == block_depth:
        return _kohya_name(type(block).__name__)
    if type(block).__name__ == "Transformer2DModel":  # same paths below the block in both layouts
        inner = ".".join(parts[block_depth:])
        return _kohya_name(type(modules[f"{match.group(1)}.{inner}"]).__name__)
    return "Sequential"  # a resnet's in_layers / emb_layers / out_layers
