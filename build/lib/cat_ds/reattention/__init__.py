"""Sparse exact Re-Attention loss: attention function, context, selection, loss.

Imports only torch and transformers. Importing this package registers the "cat_sdpa"
attention implementation with transformers.
"""
from .attention import NAME, cat_attention, causal_mass, register
from .checks import check_gradient_checkpointing
from .context import CatContext
from .diagnostics import score_example
from .loss import CatLossOutput, amplitude, count_rows, log_stats, reattention_loss, row_stats
from .selection import parse_heads, parse_layers, select, select_heads

__all__ = [
    "NAME", "CatContext", "CatLossOutput", "amplitude", "cat_attention", "causal_mass", "check_gradient_checkpointing",
    "count_rows", "log_stats", "parse_heads", "parse_layers", "reattention_loss", "register", "row_stats", "score_example",
    "select", "select_heads",
]
