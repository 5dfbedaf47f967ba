"""Which layers and heads enter the Re-Attention loss.

layers: ``"all"`` | ``"last N"`` | a list of indices (ints, negative counts from the end, or a
comma-separated string). heads: ``"all"`` | K (K heads per selected layer, resampled every step
from a `torch.Generator` seeded by (seed, step), so every data-parallel rank picks the same
heads without communicating, and a resumed run picks the same heads again).
"""
from __future__ import annotations

import torch


def parse_layers(spec, num_layers: int) -> list[int]:
    """Resolve a layer spec to sorted, unique layer indices."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("last"):
            n_txt = s[4:].strip(" :=")
            if not n_txt.isdigit() or not 1 <= int(n_txt) <= num_layers:
                raise ValueError(f"layers: 'last N' needs 1 <= N <= {num_layers}, got {spec!r}")
            return list(range(num_layers - int(n_txt), num_layers))
        try:
            spec = [int(x) for x in s.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"layers: expected 'all', 'last N' or a list of ints, got {spec!r}") from None
    if isinstance(spec, int):
        spec = [spec]
    out = set()
    for i in spec:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"layers: index {i} out of range for a model with {num_layers} layers")
        out.add(j)
    if not out:
        raise ValueError("layers: empty selection")
    return sorted(out)


def parse_heads(spec, num_heads: int) -> int | None:
    """``"all"``/None -> None (all heads); K -> K (validated)."""
    if spec is None or spec == "all":
        return None
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"heads: expected 'all' or an int K, got {spec!r}") from None
    if not 1 <= k <= num_heads:
        raise ValueError(f"heads: K must be in [1, {num_heads}], got {k}")
    return None if k == num_heads else k


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
