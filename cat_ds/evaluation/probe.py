"""Attention diagnostics: a fixed probe set of supervised records, scored at every eval, so a
user sees CAT move attention. Per layer l (all heads): per supervised row, mass on the causal
columns C, a1 = mass_C/|C|, a0 = (1 - mass_C)/|N|, ratio = a1/a0 (docs/METHOD.md section 3);
logged as the median ratio over rows: `probe/attn_ratio/layer_<l>`, and its mean over layers
`probe/attn_ratio`. The median, not the mean: once CAT has trained, a layer can put all of a
row's attention on C, and 1 - mass_C is then fp32 rounding noise (1e-8, even negative) that
would turn a mean into +-1e6; a0 is floored at A0_FLOOR for the same reason. Same number for
base and CAT runs (the attention function only measures), so the two curves are comparable.

Under ZeRO-3 every rank runs the same probe forward (parameter gathers are collective); the
result is identical on every rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from cat_ds.choices import attention_ratio

A0_FLOOR = 1e-9  # below fp32's resolution of 1 - mass_C for |N| up to ~100


def probe_from_examples(examples, pad_id: int, limit: int = 16) -> dict | None:
    """Collate the first `limit` already tokenised training examples (the engine's cached
    `datasets.map` rows, or TokenizedExamples) that have causal rows; None if none has any."""
    from cat_ds.data.collate import CatCollator

    picked = []
    for ex in examples:
        rows = ex.rows if hasattr(ex, "rows") else ex["cat_q"]
        if len(rows):
            picked.append(ex)
        if len(picked) >= limit:
            break
    return CatCollator(pad_id)(picked) if picked else None


def probe_batch(tokenizer, records: Sequence, max_length: int | None = 256, limit: int = 16) -> dict | None:
    """Collate the first `limit` records that have causal rows; None if none has any."""
    from cat_ds.data.collate import CatCollator
    from cat_ds.data.records import CatRecord, parse_record
    from cat_ds.data.spans import tokenize_example

    exs = []
    for i, r in enumerate(records):
        rec = r if isinstance(r, CatRecord) else parse_record(r, f"probe[{i}]: ")
        ex = tokenize_example(rec, tokenizer, max_length)
        if ex.rows:
            exs.append(ex)
        if len(exs) >= limit:
            break
    if not exs:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CatCollator(pad)(exs)


@contextmanager
def measuring(model):
    """The model in eval mode with the "cat_sdpa" attention function (which measures the mass on
    a context's columns), both restored afterwards. Used by the probe and by attention_map."""
    from cat_ds.reattention import NAME

    previous = model.config._attn_implementation
    was_training = model.training
    model.eval()
    if previous != NAME:
        model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        if previous != NAME:
            model.set_attn_implementation(previous)
        model.train(was_training)


@torch.no_grad()
def probe_attention(model, batch: dict, prefix: str = "probe/attn_ratio") -> dict[str, float]:
    from cat_ds.reattention import CatContext

    cfg = model.config
    layers = list(range(cfg.num_hidden_layers))
    device = model.device
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx = CatContext.from_batch(batch, layers=layers, num_heads=cfg.num_attention_heads)
    with measuring(model):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    n_c = ctx.col_counts().to(device)
    n_n = ctx.cat_rows[:, 1].to(device) + 1 - n_c
    counted = (n_c >= 1) & (n_n >= 1)
    out: dict[str, float] = {}
    ratios = []
    for layer in layers:
        mass_c = ctx.mass[layer].double().sum(dim=1) / ctx.num_heads_for(layer)
        a1 = mass_c / n_c.clamp(min=1)
        a0 = ((1 - mass_c) / n_n.clamp(min=1)).clamp(min=A0_FLOOR)
        r = float(attention_ratio(a1[counted], a0[counted]).median()) if bool(counted.any()) else float("nan")
        out[f"{prefix}/layer_{layer}"] = r
        ratios.append(r)
    out[prefix] = sum(ratios) / len(ratios)
    return out
