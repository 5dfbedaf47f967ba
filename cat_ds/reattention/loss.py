"""The Re-Attention loss (docs/METHOD.md section 3) from per-(row, layer, head) mass on C.

Per supervised row: Abar = mean over the selected (layer, head) pairs of the attention
probabilities; mass_C = sum_{k in C} Abar[q, k]; since a causal attention row sums to 1 over
k <= q, the mass on N is 1 - mass_C. With |C| and |N| = q + 1 - |C|:
    a1 = mass_C / |C|,  a0 = (1 - mass_C) / |N|,  ratio = a1 / a0.
A row is skipped if C or N is empty. A non-skipped row with ratio < alpha contributes
    div:  -log(1 + a1) / log(1 + a0)      div2: -log(1 + a1 / (1 + a0))
    nll:  -a1 / (a1 + a0)                 hinge: max(alpha - ratio, 0)
and 0 otherwise (it still counts in the denominator).
``granularity`` "layer" / "head" (not in the spec) apply that per layer / per head instead of to
the one average, and average the row's losses over those units (``reattention_loss``).

Normalisation (``normalization=``):
- ``"micro"`` (research-code default): this micro-batch's row-loss sum / its number of
  non-skipped rows (0 if none). The result depends on how rows fall into micro-batches.
- ``"global"``: this micro-batch's row-loss sum / ``denominator``, the number of non-skipped
  rows in the WHOLE optimizer step over all micro-batches and all data-parallel ranks. Skipping
  depends only on the mask, so the engine counts it ahead of time: ``count_rows(batch)`` for
  each micro-batch of the step, sum, all-reduce (SUM) across ranks, pass it here. Summing the
  returned values over the step's micro-batches and ranks gives the step's loss, independent
  of micro-batch size and world size. How the engine scales it for DeepSpeed's averaging:
  cat_ds/engine/normalization.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .context import CatContext

from cat_ds.choices import AMPLITUDES, GRANULARITIES, LOSS_TYPES, NORMALIZATIONS, attention_ratio


@dataclass
class CatLossOutput:
    loss: torch.Tensor  # scalar, before amplitude
    row_loss: torch.Tensor  # (R,) 0 for skipped or inactive rows
    a1: torch.Tensor  # (R,)
    a0: torch.Tensor  # (R,)
    counted: torch.Tensor  # (R,) bool: not skipped
    active: torch.Tensor  # (R,) bool: counted and ratio < alpha
    num_counted: int

    @property
    def ratio(self) -> torch.Tensor:
        return self.a1 / self.a0


def count_rows(batch_or_ptr, cat_rows: torch.Tensor | None = None) -> int:
    """Non-skipped rows (|C| >= 1 and |N| >= 1) of a batch dict, or of (cat_col_ptr, cat_rows)."""
    if isinstance(batch_or_ptr, dict):
        ptr, rows = batch_or_ptr["cat_col_ptr"], batch_or_ptr["cat_rows"]
    else:
        ptr, rows = batch_or_ptr, cat_rows
    n_c = ptr[1:] - ptr[:-1]
    return int(((n_c >= 1) & (n_c <= rows[:, 1])).sum())


def row_stats(ctx: CatContext, granularity: str = "all") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a1, a0, counted) from the masses the attention function left in ``ctx``: a1, a0 are (R, U),
    one column per unit the ratio applies to. ``granularity`` "all" (the spec): U = 1, the average
    over every selected (layer, head); "layer": each selected layer's head average; "head": each
    selected (layer, head). ``counted`` (R,) does not depend on the unit."""
    missing = [layer for layer in ctx.layers if layer not in ctx.mass]
    if missing:
        raise RuntimeError(f"no CAT attention mass for layers {missing}: is the model's attention implementation "
                           "'cat_sdpa' and was the context passed as model(..., cat=ctx)?")
    if granularity == "layer":
        mass_c = torch.stack([ctx.mass[layer].mean(dim=1) for layer in ctx.layers], dim=1)
    elif granularity == "head":
        mass_c = torch.cat([ctx.mass[layer] for layer in ctx.layers], dim=1)
    else:
        pairs = sum(ctx.num_heads_for(layer) for layer in ctx.layers)
        mass_c = (sum(ctx.mass[layer].sum(dim=1) for layer in ctx.layers) / pairs)[:, None]
    n_c = ctx.col_counts().to(mass_c.device)
    n_n = ctx.cat_rows[:, 1].to(mass_c.device) + 1 - n_c
    counted = (n_c >= 1) & (n_n >= 1)
    a1 = mass_c / n_c[:, None].clamp(min=1).to(mass_c.dtype)
    a0 = (1 - mass_c) / n_n[:, None].clamp(min=1).to(mass_c.dtype)
    return a1, a0, counted


def _row_loss(a1, a0, alpha: float, loss_type: str) -> torch.Tensor:
    if loss_type == "div":
        return -torch.log1p(a1) / torch.log1p(a0)
    if loss_type == "div2":
        return -torch.log1p(a1 / (1 + a0))
    if loss_type == "nll":
        return -a1 / (a1 + a0)
    if loss_type == "hinge":
        return (alpha - attention_ratio(a1, a0)).clamp(min=0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def reattention_loss(ctx: CatContext, *, alpha: float = 2.0, loss_type: str = "div",
                     normalization: str = "micro", denominator: float | int | None = None,
                     granularity: str = "all") -> CatLossOutput:
    """The spec's loss for one micro-batch (see the module docstring for the normalisations).

    ``granularity`` (the spec is ``"all"``: one average over every selected layer and head):
    ``"layer"`` makes each selected layer's head average pass alpha on its own, ``"head"`` each
    selected head; a row's loss is then the mean over those units. Why offer them: with one
    average, some heads can keep reading the spurious tokens while the others over-satisfy the
    ratio (docs/demo_recipe.md). ``a1``/``a0`` in the output stay one value per row (the mean
    over units) for logging; ``active`` is "some unit below alpha"."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "global" and denominator is None:
        raise ValueError("normalization='global' needs the step's all-reduced row count as denominator")
    if ctx.num_rows == 0:  # no supervision: no extra work, a zero that backward accepts
        z = torch.zeros((), device=ctx.cat_rows.device, requires_grad=True)
        e = torch.zeros((0,), device=ctx.cat_rows.device)
        return CatLossOutput(z, e, e, e, e.bool(), e.bool(), 0)
    a1, a0, counted = row_stats(ctx, granularity)
    active = counted[:, None] & (attention_ratio(a1, a0) < alpha).detach()
    # Inactive rows get harmless stand-ins before the loss formula: a row whose causal mass
    # rounds to 1 has a0 == 0, and div's log1p(a0) = 0 there would make the (discarded)
    # branch's gradient NaN, which torch.where still propagates as NaN * 0.
    a1_safe = torch.where(active, a1, torch.zeros_like(a1))
    a0_safe = torch.where(active, a0, torch.ones_like(a0))
    row_loss = torch.where(active, _row_loss(a1_safe, a0_safe, alpha, loss_type), torch.zeros_like(a1))
    # One value per row: the units' losses averaged (for the spec's one unit, the row's loss).
    row_loss, a1, a0, active = row_loss.mean(dim=1), a1.mean(dim=1), a0.mean(dim=1), active.any(dim=1)
    n = int(counted.sum())
    denom = n if normalization == "micro" else float(denominator)
    loss = row_loss.sum() / denom if denom > 0 else row_loss.sum() * 0.0
    return CatLossOutput(loss, row_loss, a1, a0, counted, active, n)


def amplitude(schedule: str = "epoch", *, decay: float = 1.0, epoch: int = 0, step: int | None = None,
              steps_per_epoch: int | None = None, value: float = 1.0) -> float:
    """Loss multiplier (`cat.amplitude`). ``epoch``: exp(-decay * epoch), integer epoch from 0
    (research code); ``step``: exp(-decay * step / steps_per_epoch), a fractional epoch per
    optimizer step; ``constant``: ``value``."""
    if schedule == "epoch":
        return math.exp(-decay * int(epoch))
    if schedule == "step":
        if step is None or not steps_per_epoch:
            raise ValueError("amplitude 'step' needs step and steps_per_epoch > 0")
        return math.exp(-decay * step / steps_per_epoch)
    if schedule == "constant":
        return float(value)
    raise ValueError(f"amplitude schedule must be one of {AMPLITUDES}, got {schedule!r}")


def log_stats(ctx: CatContext, out: CatLossOutput | None = None) -> dict:
    """For logging: per-row [q, a1, a0] (counted rows) and the mean causal/non-causal ratio a1/a0."""
    if ctx.num_rows == 0:
        return {"row_stats": [], "ratio": float("nan"), "rows": 0, "active_rows": 0}
    if out is None:
        a1, a0, counted = row_stats(ctx)
        a1, a0, active = a1[:, 0], a0[:, 0], None
    else:
        a1, a0, counted, active = out.a1, out.a0, out.counted, out.active
    a1, a0, counted = a1.detach().double().cpu(), a0.detach().double().cpu(), counted.cpu()
    qs = ctx.cat_rows[:, 1].cpu()
    stats = [[int(qs[i]), float(a1[i]), float(a0[i])] for i in range(len(qs)) if counted[i]]
    ratio = float(attention_ratio(a1[counted], a0[counted]).mean()) if bool(counted.any()) else float("nan")
    return {"row_stats": stats, "ratio": ratio, "rows": int(counted.sum()),
            "active_rows": int(active.sum()) if active is not None else None}
