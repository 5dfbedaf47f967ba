"""Which layers and heads enter the Re-Attention loss.

layers: ``"all"`` | ``"last N"`` | a list of indices (ints, negative counts from the end, or a
comma-separated string). heads: ``"all"`` | K (K heads per selected layer, resampled every step
from a `torch.Generator` seeded by (seed, step), so every data-parallel rank picks the same
heads without communicating, and a resumed run picks the same heads again).
"""
from __future__ import annotations

import torch

from cat_ds.choices import parse_heads, parse_layers  # the rule, shared with config validation

__all__ = ["parse_heads", "parse_layers", "select", "select_heads", "step_generator"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator whose state depends only on (seed, step)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return g


def select_heads(layers: list[int], num_heads: int, heads, *, seed: int, step: int) -> dict[int, torch.Tensor | None]:
    """Per selected layer: sorted LongTensor of K sampled heads, or None for all heads."""
    k = parse_heads(heads, num_heads)
    if k is None:
        return {layer: None for layer in layers}
    g = step_generator(seed, step)
    return {layer: torch.randperm(num_heads, generator=g)[:k].sort().values for layer in layers}


def select(num_layers: int, num_heads: int, *, layers="all", heads="all", seed: int = 0, step: int = 0):
    """Convenience: (layer list, head dict) for a model with the given shape at this step."""
    chosen = parse_layers(layers, num_layers)
    return chosen, select_heads(chosen, num_heads, heads, seed=seed, step=step)
