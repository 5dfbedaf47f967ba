"""Refuse set-ups under which the Re-Attention loss would be silently wrong."""
from __future__ import annotations

import functools

import torch


def _is_reentrant(fn) -> bool:
    """use_reentrant of a transformers checkpoint function (a functools.partial over
    torch.utils.checkpoint.checkpoint); torch treats a missing value as True."""
    kw = fn.keywords if isinstance(fn, functools.partial) else {}
    return kw.get("use_reentrant", None) in (None, True)


def check_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Raise if any module checkpoints reentrantly.

    Reentrant checkpointing runs the block under no_grad and replays it in backward, so the
    attention mass the CAT attention function computes inside the block has no graph: the
    side loss would silently give no gradient. Non-reentrant checkpointing is exact.
    """
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False):
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if fn is not None and _is_reentrant(fn):
                raise ValueError(
                    f"CAT is on but module {name or type(model).__name__!r} uses reentrant gradient checkpointing, "
                    "which silently drops the Re-Attention loss gradients. Enable it with "
                    "gradient_checkpointing_kwargs={'use_reentrant': False} (or turn CAT or checkpointing off).")
