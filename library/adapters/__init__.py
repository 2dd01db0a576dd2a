"""Machinery every network adapter shares (LoRA, LoCon, and the kinds to come): which modules of the UNet and
text encoders get one and their kohya names (`targets`), per-block settings from ``--network_args``
(`blocks`, `network_args`), kohya LoRA files (`lora_files`), the arithmetic of the LoRA tools (`lora_merge`,
`lora_resize`, `lora_extract`) and the user errors (`errors`). It sits above ``library.models`` (family tables,
key layouts) and below ``library.cli``.

The adapter protocol and its implementations live in ``networks/``; this package never imports them.
"""
