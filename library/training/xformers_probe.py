"""Whether --xformers can actually run here: importing xformers is not enough.

An xformers wheel built for another torch or CUDA imports fine (it only warns "xFormers can't load C++/CUDA
extensions") and then fails inside the first attention call of the first training step, with a page of
"No operator found for memory_efficient_attention_forward". Seen on an H200 with xformers 0.0.35 (built for
torch 2.10) under torch 2.11. One tiny attention call at start-up turns that into one line before any model loads.
"""

from __future__ import annotations

from typing import Any

import torch


def xformers_unusable_reason(device: torch.device | str = "cuda") -> str | None:
    """None when xformers' memory-efficient attention runs on ``device``; else why not, with the fix."""
    try:
        import xformers
        import xformers.ops
    except ImportError:
        return "needs the xformers package: pip install xformers (built for your torch version), or use --sdpa"
    version = getattr(xformers, "__version__", "?")
    query = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)  # (batch, tokens, heads, head dim)
    try:
        out: Any = xformers.ops.memory_efficient_attention(query, query, query)
    except (NotImplementedError, RuntimeError, ValueError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        return (f"cannot work here: the installed xformers {version} cannot run attention with torch {torch.__version__} "
                f"({first}): install the xformers build made for this torch and CUDA, or use --sdpa")
    if tuple(out.shape) != tuple(query.shape):
        return f"cannot work here: the installed xformers {version} returned a wrong attention shape: reinstall it, or use --sdpa"
    return None
