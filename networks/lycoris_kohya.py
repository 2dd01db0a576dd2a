"""LyCORIS networks (LoCon, LoHa, LoKr, (IA)^3, full, diag-OFT, BOFT...; DoRA with ``dora_wd=True``) through the
lycoris-lora package, for SD1.x, SD2.x and SDXL, in the files kohya + LyCORIS write.

Two names for the same network module:

  * ``--network_module lycoris.kohya`` -- what kohya users type; `networks.plugin.import_network_module` serves
    that name from here, because LyCORIS's own ``lycoris.kohya`` expects kohya's UNet classes and ours is
    diffusers' (on SDXL it stops with ``duplicated lora name: lora_unet_time_embedding_linear_1``);
  * ``--network_module networks.lycoris_kohya`` -- the same thing under our name.

    train_network.py ... --network_module lycoris.kohya --network_dim 16 --network_alpha 8 \\
        --network_args "algo=lokr" "factor=8" "preset=attn-mlp"

The algorithms, ``--network_args`` (algo, preset -- a built-in name or a preset TOML file --, conv_dim,
conv_alpha, dropout, factor, dora_wd, use_tucker, train_norm, ...) and their meanings are LyCORIS's own:
``lycoris.kohya.create_network`` builds the network. It walks a kohya-named view of our UNet
(`networks.lycoris_view`), so presets select the modules they select under kohya, module names are kohya's
(SDXL: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and the modules wrap our real layers.
Differences from kohya + LyCORIS 4.1.3:

  * a module targeted both by class and by name (preset ``full`` on SD1/SD2: ``TimestepEmbedding`` and
    ``time_embedding.linear_1``) gets one LyCORIS module under that name instead of an AssertionError;
  * modules on text-encoder layers whose output cannot reach the loss (SDXL's text encoder 1 is read at its
    penultimate layer; ``--clip_skip``) are kept in the file but frozen, so DDP sees no unused parameters;
  * ``load_weights`` refuses a file with keys that match no module (kohya ignores them silently);
  * ``create_network_from_weights`` reads (IA)^3 files, which LyCORIS 4.1.3's ``make_module`` cannot rebuild;
  * it builds only the file's modules (LyCORIS's first builds, then drops, a default network on every layer);
  * CLIP text encoders from transformers 5 get back the ``text_model`` level of kohya's names.

The network has kohya's network API plus ours (`networks.base.AdapterNetwork`'s method names).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.adapters.errors import LoRAWeightsError, NetworkArgumentError
from library.adapters.lora_files import load_lora_state_dict, save_lora_file
from library.adapters.targets import name_aliases, rename_key, text_encoder_layers_in_use, text_encoder_prefixes
from library.models.families import family_of_unet
from networks.lycoris_training import (
    LycorisTrainingOptions,
    check_training_network_args,
    optimizer_param_groups,
    training_options,
)
from networks.lycoris_view import kohya_text_encoder_view, kohya_unet_view
from networks.plugin import as_module_list

LYCORIS_REQUIREMENT = "lycoris-lora==4.1.3"
MODULE_NAMES = ("lycoris.kohya", "networks.lycoris_kohya")  # the --network_module names served here
_TE_LAYER = re.compile(r"^(lora_te\d?)_text_model_encoder_layers_(\d+)_")


def is_lycoris_module(name: str) -> bool:
    return name in MODULE_NAMES


def lycoris_kohya(module_name: str = "networks.lycoris_kohya") -> Any:
    """LyCORIS's kohya plug-in module, or one error line naming the package to install."""
    try:
        import lycoris.kohya
    except ImportError as error:
        raise NetworkArgumentError(f"--network_module {module_name} needs the lycoris-lora package: "
                                   f"pip install {LYCORIS_REQUIREMENT} ({error})") from None
    return lycoris.kohya


def check_network_args(module_name: str, network_args: dict[str, str]) -> None:
    """What can be checked before any model loads: the package, ``algo`` and ``preset``."""
    kohya = lycoris_kohya(module_name)
    from lycoris.wrapper import network_module_dict

    check_training_network_args(network_args)  # LoRA+ needs lora_up; block LR weights' syntax
    algo = (network_args.get("algo") or "lora").lower()
    if algo not in network_module_dict:
        raise NetworkArgumentError(f"--network_args algo={algo}: LyCORIS has no such algorithm; use one of "
                                   f"{', '.join(sorted(network_module_dict))}")
    preset = network_args.get("preset", "full")
    if preset not in kohya.PRESET:
        if not Path(preset).is_file():
            raise NetworkArgumentError(f"--network_args preset={preset}: not a LyCORIS preset "
                                       f"({', '.join(kohya.PRESET)}) nor a preset TOML file")
        if kohya.read_preset(preset) is None:
            raise NetworkArgumentError(f"--network_args preset={preset}: LyCORIS cannot read this preset file "
                                       "(see the line above); fix its TOML")


# --------------------------------------------------------------------------------------------------
# kohya's plug-in entry points


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                   neuron_dropout: float | None = None, clip_skip: int | None = None, **kwargs: Any) -> nn.Module:
    """A fresh LyCORIS network: ``lycoris.kohya.create_network`` on the kohya-named view of ``unet``.
    ``kwargs`` are ``--network_args`` (LyCORIS's meanings); ``clip_skip`` decides which text-encoder layers
    reach the loss (the others' modules are frozen)."""
    kohya = lycoris_kohya()
    text_encoders = as_module_list(text_encoder)
    with _network_class_for(kohya) as network_class:
        try:
            network = kohya.create_network(multiplier, network_dim, network_alpha, vae, _lycoris_te(text_encoders),
                                           kohya_unet_view(unet), neuron_dropout=neuron_dropout, **kwargs)
        except AssertionError as error:
            raise NetworkArgumentError(f"LyCORIS could not build the network ({error}): a preset that targets "
                                       "a module both by class and by a name pattern makes it twice") from None
        except ValueError as error:  # settings the model's layer sizes do not allow (e.g. BOFT's factor)
            raise NetworkArgumentError(f"LyCORIS could not build the network for this model: {error} "
                                       "(change --network_dim or the --network_args it names)") from None
    assert isinstance(network, network_class)
    network.finish(text_encoders, unet, clip_skip)
    network.training_options = training_options(kwargs, unet=unet)  # block LR, LoRA+ (networks.lycoris_training)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any,
                                text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                clip_skip: int | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A network shaped like a LyCORIS file (each module's algorithm and dims read by LyCORIS's
    ``get_module``/``make_module``), with its weights; returns ``(network, weights_sd)`` as kohya does."""
    kohya = lycoris_kohya()
    text_encoders = as_module_list(text_encoder)
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_lora_state_dict(file)
    aliases = name_aliases(unet, text_encoders)
    weights_sd = {rename_key(key, aliases): value for key, value in weights_sd.items()}
    te_views, unet_view = _lycoris_te(text_encoders), kohya_unet_view(unet)
    ia3 = {key.partition(".")[0] for key in weights_sd if key.endswith(".on_input")}
    with _network_class_for(kohya, targets=False):
        network, _ = kohya.create_network_from_weights(
            multiplier, None, vae, te_views, unet_view, for_inference=for_inference,
            weights_sd={k: v for k, v in weights_sd.items() if k.partition(".")[0] not in ia3}, **kwargs)
    for lora in _ia3_modules(weights_sd, ia3, _named_modules(te_views, unet_view), multiplier):
        (network.unet_loras if lora.lora_name.startswith("lora_unet_") else network.text_encoder_loras).append(lora)
    network.loras = network.text_encoder_loras + network.unet_loras
    network.finish(text_encoders, unet, None if for_inference else clip_skip)
    network.training_options = training_options(kwargs, unet=unet)
    unknown = network.unknown_keys(weights_sd)
    if unknown:
        raise LoRAWeightsError(f"{file or 'weights'}: {len(unknown)} key(s) match no module of this model, e.g. "
                               f"{', '.join(unknown[:2])}: use a LyCORIS file made for this model family")
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd


def _named_modules(te_views: Any, unet_view: nn.Module) -> dict[str, nn.Module]:
    """Every module by the name LyCORIS's kohya plug-in gives it (``lora_unet_…``, ``lora_te…_…``)."""
    views = [] if te_views is None else te_views if isinstance(te_views, list) else [te_views]
    named = {f"lora_unet_{path}".replace(".", "_"): m for path, m in unet_view.named_modules()}
    for prefix, view in zip(text_encoder_prefixes(len(views)), views):
        named |= {f"{prefix}_{path}".replace(".", "_"): m for path, m in view.named_modules()}
    return named


def _ia3_modules(weights_sd: dict[str, torch.Tensor], names: set[str], named: dict[str, nn.Module],
                 multiplier: float) -> list[nn.Module]:
    """(IA)^3 modules of a file, built with LyCORIS's IA3Module: LyCORIS 4.1.3's ``make_module`` cannot
    (``IA3Module.make_module_from_state_dict`` takes the weight alone, ``get_module`` passes ``on_input`` too)."""
    from lycoris.modules.ia3 import IA3Module

    modules = []
    for name in sorted(names & named.keys()):
        module = IA3Module(name, named[name], multiplier, train_on_input=bool(int(weights_sd[f"{name}.on_input"])))
        with torch.no_grad():
            module.weight.copy_(weights_sd[f"{name}.weight"])
        modules.append(module)
    return modules


def _lycoris_te(text_encoders: list[nn.Module]) -> Any:
    """The text encoders as LyCORIS takes them (kohya's paths): one is named ``lora_te``, a list of them
    ``lora_te1``, ``lora_te2``."""
    views = [kohya_text_encoder_view(te) for te in text_encoders]
    if not views:
        return None
    return views[0] if len(views) == 1 else views


@contextmanager
def _network_class_for(kohya: Any, *, targets: bool = True) -> Iterator[type]:
    """Build with a fresh subclass of LyCORIS's network class: ``apply_preset`` sets class attributes, which
    would otherwise carry one network's preset into the next one made in this process. ``targets=False``:
    the class targets nothing, for ``create_network_from_weights``, which builds an empty network and then
    the file's modules (LyCORIS's would first build, and drop, a default one on every layer)."""
    original = kohya.LycorisNetworkKohya
    nothing = {} if targets else {name: [] for name in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                                        "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                                                        "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    network_class = type(original.__name__, (_KohyaApi, original), {"__module__": __name__, **nothing})
    kohya.LycorisNetworkKohya = network_class  # lycoris.kohya looks its class up by this name
    try:
        yield network_class
    finally:
        kohya.LycorisNetworkKohya = original


def _targeted_paths(roots: Sequence[nn.Module], classes: Sequence[str]) -> set[str]:
    """Paths of modules inside a module whose class is targeted (LyCORIS makes those by class)."""
    inside = set()
    for root in roots:
        for path, module in root.named_modules():
            if type(module).__name__ in classes:
                inside |= {f"{path}.{sub}" if path else sub for sub, _ in module.named_modules() if sub}
    return inside


class _KohyaApi:
    """Mixed in before ``lycoris.kohya.LycorisNetworkKohya``: our loop's network API on LyCORIS's network."""

    unreachable: frozenset[str] = frozenset()

    def __init__(self, text_encoder: Any, unet: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        text_encoders = as_module_list(text_encoder)
        inside = _targeted_paths([unet] if unet is not None else [], cls.UNET_TARGET_REPLACE_MODULE)
        cls.UNET_TARGET_REPLACE_NAME = [n for n in cls.UNET_TARGET_REPLACE_NAME if n not in inside]
        inside = _targeted_paths(text_encoders, cls.TEXT_ENCODER_TARGET_REPLACE_MODULE)
        cls.TEXT_ENCODER_TARGET_REPLACE_NAME = [n for n in cls.TEXT_ENCODER_TARGET_REPLACE_NAME if n not in inside]
        super().__init__(text_encoder, unet, *args, **kwargs)

    def finish(self, text_encoders: list[nn.Module], unet: nn.Module, clip_skip: int | None) -> None:
        """Register the modules under their names (so ``state_dict()`` is the file before ``apply_to``), and
        freeze those on text-encoder layers that cannot reach the loss (None: keep all trainable)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        self._aliases = name_aliases(unet, text_encoders)
        if clip_skip is not None or text_encoders:
            layers = text_encoder_layers_in_use(text_encoders, family_of_unet(unet), clip_skip)
            limits = dict(zip(text_encoder_prefixes(len(text_encoders)), layers))
            self.unreachable = frozenset(
                lora.lora_name for lora in self.text_encoder_loras
                if (m := _TE_LAYER.match(lora.lora_name)) and m.group(1) in limits and int(m.group(2)) >= limits[m.group(1)])
        self.requires_grad_(True)

    # -- kohya's network API, as our loop calls it -----------------------------------------------------

    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Wrap the real layers; a part not applied is dropped (not trained, not saved), as in kohya."""
        dropped = (self.text_encoder_loras if not apply_text_encoder else []) + (self.unet_loras if not apply_unet else [])
        for lora in dropped:
            self._modules.pop(lora.lora_name, None)
        super().apply_to(text_encoder, unet, bool(apply_text_encoder), bool(apply_unet))

    def requires_grad_(self, requires_grad: bool = True) -> nn.Module:
        super().requires_grad_(requires_grad)
        for name in self.unreachable:
            module = self._modules.get(name)
            if module is not None:
                module.requires_grad_(False)
        return self

    def normalise_keys(self, weights_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Other tools' spellings of module names (diffusers-named SDXL files, ``lora_te1_encoder_...``) -> ours."""
        aliases = getattr(self, "_aliases", {})
        return {rename_key(key, aliases): value for key, value in weights_sd.items()}

    def unknown_keys(self, weights_sd: dict[str, torch.Tensor]) -> list[str]:
        own = self.state_dict()
        return sorted(k for k in weights_sd if k not in own)

    def load_weights(self, file: str | os.PathLike) -> dict[str, list[str]]:
        """Load a LyCORIS file into this network (``--network_weights``); keys that match no module, or
        another shape, are refused with the fix. Returns LyCORIS's ``{"missing keys": [...]}`` report."""
        weights_sd = self.normalise_keys(load_lora_state_dict(file))
        unknown = self.unknown_keys(weights_sd)
        if unknown:
            raise LoRAWeightsError(
                f"{file} does not fit this network: {len(unknown)} key(s) match no module, e.g. "
                f"{', '.join(unknown[:2])}; it was made for another model family, preset or algo: pass the "
                "--network_args it was trained with, or --dim_from_weights to take its layout")
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights_sd.items()
                 if v.shape != own[k].shape]
        if wrong:
            raise LoRAWeightsError(f"{file} has other dims than this network ({'; '.join(wrong[:2])}): pass the "
                                   "--network_dim/--network_args it was trained with, or --dim_from_weights")
        missing, _ = self.load_state_dict(weights_sd, strict=False)
        return {"missing keys": missing} if missing else {}

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """The file LyCORIS writes (its state dict in ``dtype``), atomically, with kohya's sshs_* hashes."""
        state_dict = {k: v.detach().to("cpu", dtype) if dtype is not None else v.detach().cpu()
                      for k, v in self.state_dict().items()}
        save_lora_file(state_dict, file, metadata)

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None = None,
                                 unet_lr: float | None = None, default_lr: float | None = None,
                                 ) -> tuple[list[dict[str, Any]], list[str]]:
        """Param groups as networks.lora makes them (`networks.lycoris_training`): one LR or one per text
        encoder, the UNet per kohya block with down/mid/up_lr_weight, LoRA+ on LyCORIS's ``lora_up``; frozen
        modules are left out."""
        self.requires_grad_(True)
        return optimizer_param_groups(text_encoder_modules=self.text_encoder_loras, unet_modules=self.unet_loras,
                                      options=getattr(self, "training_options", LycorisTrainingOptions()),
                                      text_encoder_lr=text_encoder_lr, unet_lr=unet_lr, default_lr=default_lr)
