"""User errors of the network adapters and LoRA tools: each message names the file, key or setting."""

from __future__ import annotations


class LoRAWeightsError(ValueError):
    """A weights file that does not fit the model; the message says which keys and why."""


class NetworkArgumentError(ValueError):
    """A network setting (``--network_dim``, ``--network_args`` value) that cannot work; the message names it."""


class LoRAFileError(ValueError):
    """A file the LoRA tools cannot use; the message names the file and the offending key."""
