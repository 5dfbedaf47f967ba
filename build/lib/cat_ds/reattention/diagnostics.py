"""Per-record diagnostics for `cat-ds data inspect --model`: LM loss, CAT loss, per-row stats."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import NAME
from .context import CatContext
from .loss import log_stats, reattention_loss
from .selection import select


@torch.no_grad()
def score_example(model, batch: dict, *, alpha: float = 2.0, loss_type: str = "div", heads="all", layers="all",
                  seed: int = 0, step: int = 0) -> dict:
    """Score one collated batch (usually a batch of one record) without gradients.

    Returns ``lm_loss`` (mean next-token cross-entropy over the labelled tokens: answer + EOS),
    ``cat_loss`` (the Re-Attention loss, micro normalisation, before amplitude; 0.0 without
    supervised rows), ``row_stats`` ([[q, a1, a0], ...] for the non-skipped rows) and ``ratio``
    (mean a1/a0 over those rows; NaN without rows). The model's attention implementation is
    switched to "cat_sdpa" for the call and restored afterwards.
    """
    cfg = model.config
    chosen, head_sel = select(cfg.num_hidden_layers, cfg.num_attention_heads, layers=layers, heads=heads,
                              seed=seed, step=step)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    ctx = CatContext.from_batch(batch, layers=chosen, heads=head_sel, num_heads=cfg.num_attention_heads)
    previous = cfg._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    finally:
        model.set_attn_implementation(previous)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    res = reattention_loss(ctx, alpha=alpha, loss_type=loss_type)
    stats = log_stats(ctx, res)
    return {"lm_loss": float(lm), "cat_loss": float(res.loss), "row_stats": stats["row_stats"],
            "ratio": stats["ratio"]}
