"""Test helpers for the Re-Attention tests: tiny models, hand-built sparse rows, and the dense
float64 reference (eager attention, output_attentions=True, the spec's row loop over a dense
mask). The reference is deliberately written from docs/METHOD.md section 3, not from cat_ds code."""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

VOCAB = 97


def tiny_model(family: str = "llama", gqa: bool = True, dtype=torch.float64, layers: int = 2, hidden: int = 32,
               heads: int = 4, seed: int = 0, vocab: int = VOCAB):
    kv = heads // 2 if gqa else heads
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                  initializer_range=0.25, tie_word_embeddings=False)
    cfg = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(cfg).to(dtype)
    return model


def span_rows(length: int, rng: random.Random, n_keys: int = 2) -> dict[int, set[int]]:
    """Rows from random (key span, value spans) pairs as the spec's section 3 builds them:
    multi-token keys (1-3 tokens), one or two value spans per key, rows ks-1..ke-2."""
    rows: dict[int, set[int]] = {}
    for _ in range(n_keys):
        klen = rng.randint(1, 3)
        ks = rng.randint(4, length - klen)
        cols: set[int] = set()
        for _ in range(rng.randint(1, 2)):
            ve = rng.randint(1, ks - 2)  # ks > ve: at least one token between
            vs = rng.randint(max(0, ve - 3), ve - 1)
            cols.update(range(vs, ve))
        for q in range(ks - 1, ks + klen - 1):
            rows.setdefault(q, set()).update(cols)
    return rows


def make_batch(lengths: list[int], seed: int = 0, supervised: list[bool] | None = None, n_keys: int = 2) -> dict:
    """A DESIGN.md batch (right padding) with hand-built sparse rows; also returns `dense_rows`."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    bsz, seq = len(lengths), max(lengths)
    input_ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    attention_mask = torch.zeros((bsz, seq), dtype=torch.long)
    labels = torch.full((bsz, seq), -100, dtype=torch.long)
    all_rows = []
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = 0
        labels[b, n // 2:n] = input_ids[b, n // 2:n]
        if supervised is None or supervised[b]:
            for q, cols in sorted(span_rows(n, rng, n_keys).items()):
                all_rows.append((b, q, sorted(cols)))
    ptr = [0]
    for _, _, cols in all_rows:
        ptr.append(ptr[-1] + len(cols))
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "cat_rows": torch.tensor([[b, q] for b, q, _ in all_rows], dtype=torch.long).reshape(-1, 2),
        "cat_col_ptr": torch.tensor(ptr, dtype=torch.long),
        "cat_cols": torch.tensor([c for *_, cols in all_rows for c in cols], dtype=torch.long),
    }


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, in the logits' dtype."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def dense_mask(batch: dict) -> torch.Tensor:
    bsz, seq = batch["input_ids"].shape
    m = torch.zeros((bsz, seq, seq))
    ptr, cols = batch["cat_col_ptr"], batch["cat_cols"]
    for r, (b, q) in enumerate(batch["cat_rows"].tolist()):
        m[b, q, cols[ptr[r]:ptr[r + 1]]] = 1
    return m


def _eager_full_precision(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, except the softmax stays in the input dtype (stock eager
    computes it in float32, which would cap a float64 reference at ~1e-7)."""
    rep = module.num_key_value_groups
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


@contextlib.contextmanager
def full_precision_eager():
    saved = modeling_llama.eager_attention_forward, modeling_qwen2.eager_attention_forward
    modeling_llama.eager_attention_forward = modeling_qwen2.eager_attention_forward = _eager_full_precision
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward, modeling_qwen2.eager_attention_forward = saved


def reference(model, batch: dict, *, alpha: float, loss_type: str, layers=None, heads=None, granularity: str = "all"):
    """(lm_loss, cat_loss, ratios) the research way. heads: {layer: list of heads} or None (all).
    granularity (cat_ds's option; the spec is "all"): "layer" / "head" apply the spec's loss to
    each selected layer's head average / each selected head's map, then take the mean."""
    model.set_attn_implementation("eager")
    with full_precision_eager():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    layers = list(range(len(out.attentions))) if layers is None else layers
    maps = [out.attentions[layer] if heads is None or heads.get(layer) is None else out.attentions[layer][:, heads[layer]]
            for layer in layers]
    mask = dense_mask(batch)
    if granularity == "all":  # the spec: one map, the mean over every selected (layer, head)
        units = [torch.cat(maps, dim=1).mean(dim=1)]
    elif granularity == "layer":
        units = [m.mean(dim=1) for m in maps]
    else:
        units = [m[:, h] for m in maps for h in range(m.shape[1])]
    parts = [_spec_loss(u, mask, alpha, loss_type) for u in units]
    cat, ratios = sum(c for c, _ in parts) / len(parts), [r for _, rs in parts for r in rs]
    return lm_loss(out.logits, batch["labels"]), cat, ratios


def _spec_loss(abar: torch.Tensor, mask: torch.Tensor, alpha: float, loss_type: str):
    """docs/METHOD.md section 3 steps 2-3 on a dense (B, T, T) averaged map: (loss, ratios of counted rows)."""
    total, count, ratios = abar.new_zeros(()), 0, []
    for b in range(mask.shape[0]):
        for q in range(mask.shape[1]):
            row = mask[b, q, :q + 1]
            if row.sum() == 0 or row.sum() == q + 1:
                continue
            c, n = row == 1, row == 0
            a1, a0 = abar[b, q, :q + 1][c].mean(), abar[b, q, :q + 1][n].mean()
            ratio = a1 / a0
            ratios.append(float(ratio.detach()))
            count += 1
            if ratio < alpha:
                if loss_type == "div":
                    total = total - torch.log(1 + a1) / torch.log(1 + a0)
                elif loss_type == "div2":
                    total = total - torch.log(1 + a1 / (1 + a0))
                elif loss_type == "nll":
                    total = total - a1 / (a1 + a0)
                else:
                    total = total + torch.clamp(alpha - ratio, min=0)
    return (total / count if count else total), ratios
