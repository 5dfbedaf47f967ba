"""Checkpointing rules, accumulation, no-supervision batches, generate(), selection, amplitude."""
import copy
import math

import pytest
import torch
from reattention_ref import lm_loss, make_batch, tiny_model

import cat_ds.reattention.attention as attn_mod
from cat_ds.reattention import (
    CatContext, amplitude, check_gradient_checkpointing, count_rows, parse_layers, reattention_loss, select,
    select_heads,
)


def _ctx(model, batch, **kw):
    cfg = model.config
    return CatContext.from_batch(batch, layers=list(range(cfg.num_hidden_layers)), num_heads=cfg.num_attention_heads,
                                 **kw)


def test_reentrant_checkpointing_refused_non_reentrant_accepted():
    model = tiny_model()
    check_gradient_checkpointing(model)  # off: fine
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
        check_gradient_checkpointing(model)
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={})  # torch's default is reentrant
    with pytest.raises(ValueError, match="use_reentrant"):
        check_gradient_checkpointing(model)
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    check_gradient_checkpointing(model)
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable()  # transformers' default is non-reentrant
    check_gradient_checkpointing(model)


def test_recomputation_writes_nothing(monkeypatch):
    """Under non-reentrant checkpointing the attention function runs again in backward; that call
    leaves the context as the forward left it (one entry per layer: the mass the loss read)."""
    calls = []
    real = attn_mod.causal_mass
    monkeypatch.setattr(attn_mod, "causal_mass", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    model = tiny_model()
    model.set_attn_implementation("cat_sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = make_batch([20, 14])
    ctx = _ctx(model, batch)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    assert calls == [0, 1]
    forward_mass = dict(ctx.mass)
    reattention_loss(ctx).loss.backward()
    assert len(calls) > 2 and sorted(ctx.mass) == [0, 1]  # recomputed, neither appended nor stored
    assert all(ctx.mass[layer] is forward_mass[layer] for layer in (0, 1))


def _cat_step(model, batch, **loss_kw):
    ctx = _ctx(model, batch)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    res = reattention_loss(ctx, alpha=1e9, **loss_kw)  # alpha huge: every row active
    res.loss.backward()
    return res.loss.detach()


def test_accumulation_global_normalisation_independent_of_micro_batch():
    base = tiny_model("qwen2")
    base.set_attn_implementation("cat_sdpa")
    batch = make_batch([23, 12, 18, 26], seed=5, n_keys=3)
    b = batch["cat_rows"][:, 0]
    micro = []
    for i in range(4):  # split the batch of 4 into 4 micro-batches of 1, unpadded
        n = int(batch["attention_mask"][i].sum())
        sel = (b == i).nonzero().flatten()
        ptr = batch["cat_col_ptr"]
        cols = torch.cat([batch["cat_cols"][ptr[r]:ptr[r + 1]] for r in sel.tolist()])
        lens = ptr[sel + 1] - ptr[sel]
        micro.append({"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n],
                      "cat_rows": torch.stack([torch.zeros_like(sel), batch["cat_rows"][sel, 1]], 1),
                      "cat_col_ptr": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]), "cat_cols": cols})
    counts = [count_rows(m) for m in micro]
    assert len(set(counts)) > 1  # uneven rows per record, so "micro" would differ
    denom = sum(counts)  # what the engine all-reduces
    assert denom == count_rows(batch)

    one = copy.deepcopy(base)
    loss_one = _cat_step(one, batch, normalization="global", denominator=denom)
    four = copy.deepcopy(base)
    loss_four = sum(_cat_step(four, m, normalization="global", denominator=denom) for m in micro)
    assert abs(float(loss_one - loss_four)) < 1e-12
    for (name, p1), (_, p4) in zip(one.named_parameters(), four.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p4.grad, p1.grad, atol=1e-12, rtol=0, msg=name)
    # The research default ("micro") does depend on the split: this test could fail.
    loss_micro = sum(_cat_step(copy.deepcopy(base), m) for m in micro) / 4
    assert abs(float(loss_micro - loss_one)) > 1e-6
    with pytest.raises(ValueError, match="denominator"):
        reattention_loss(_ctx(base, batch), normalization="global")


def test_no_supervision_no_extra_work(monkeypatch):
    calls = []
    monkeypatch.setattr(attn_mod, "causal_mass", lambda *a, **k: calls.append(1))
    model = tiny_model()
    model.set_attn_implementation("cat_sdpa")
    batch = make_batch([15, 11], supervised=[False, False])
    assert batch["cat_rows"].shape == (0, 2)
    ctx = _ctx(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    res = reattention_loss(ctx)
    assert calls == [] and ctx.mass == {} and float(res.loss.detach()) == 0.0 and res.num_counted == 0
    (lm_loss(out.logits, batch["labels"]) + 0.5 * res.loss).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_missing_cat_attention_is_a_clear_error():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    batch = make_batch([15])
    ctx = _ctx(model, batch)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    with pytest.raises(RuntimeError, match="cat_sdpa"):
        reattention_loss(ctx)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_matches_stock_sdpa_with_left_padding(family):
    model = tiny_model(family, dtype=torch.float32, seed=7)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    model.set_attn_implementation("sdpa")
    ref = model.generate(**kw)
    model.set_attn_implementation("cat_sdpa")
    got = model.generate(**kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_selection_is_deterministic_per_seed_and_step():
    a = select_heads([0, 1, 2], 8, 3, seed=11, step=5)
    b = select_heads([0, 1, 2], 8, 3, seed=11, step=5)
    assert all(torch.equal(a[k], b[k]) and a[k].numel() == 3 for k in a)
    assert all(torch.equal(v, v.sort().values) for v in a.values())
    later = [select_heads([0], 8, 3, seed=11, step=s)[0].tolist() for s in range(6, 16)]
    assert any(h != a[0].tolist() for h in later)  # resampled every step
    assert select_heads([0, 1], 8, "all", seed=0, step=0) == {0: None, 1: None}
    assert select_heads([0], 8, 8, seed=0, step=0) == {0: None}
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("last 2", 4) == [2, 3]
    assert parse_layers([-1, 0], 4) == [0, 3]
    assert parse_layers("0, 2", 4) == [0, 2]
    for bad in ("last 5", "first 2", [4], "last 0"):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad, 4)
    with pytest.raises(ValueError, match="heads"):
        select(4, 8, heads=9)


def test_amplitude_schedules():
    assert amplitude("epoch", decay=1.0, epoch=0) == 1.0
    assert amplitude("epoch", decay=1.0, epoch=2) == pytest.approx(math.exp(-2))
    assert amplitude("epoch", decay=0.5, epoch=1.7) == pytest.approx(math.exp(-0.5))  # integer epoch
    assert amplitude("step", decay=1.0, step=15, steps_per_epoch=10) == pytest.approx(math.exp(-1.5))
    assert amplitude("constant", value=0.3) == 0.3
    with pytest.raises(ValueError):
        amplitude("step", step=3)
    with pytest.raises(ValueError):
        amplitude("linear")


def test_context_validates_rows():
    rows = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match="cat_col_ptr"):
        CatContext(rows, torch.tensor([0, 2, 3]), torch.tensor([1, 2]), layers=[0], num_heads=4)
    ctx = CatContext(rows, torch.tensor([0, 1]), torch.tensor([5]), layers=[0], num_heads=4)
    with pytest.raises(ValueError, match="< the row's query position"):
        ctx.row_index(torch.device("cpu"), 1, 8)


def test_saturated_rows_give_finite_gradients():
    """A row whose causal mass is exactly 1 (a0 == 0) is inactive; it must not turn the
    gradient of the whole batch into NaN (div divides by log1p(a0))."""
    import torch

    from cat_ds.reattention.context import CatContext
    from cat_ds.reattention.loss import reattention_loss

    ctx = CatContext(torch.tensor([[0, 3], [0, 4]]), torch.tensor([0, 3, 4]), torch.tensor([0, 1, 2, 1]),
                     layers=[0], num_heads=1)
    mass = torch.tensor([[1.0], [0.3]], requires_grad=True)  # row 0 saturated, row 1 active
    ctx.mass[0] = mass
    for loss_type in ("div", "div2", "nll", "hinge"):
        out = reattention_loss(ctx, alpha=2.0, loss_type=loss_type)
        (g,) = torch.autograd.grad(out.loss, mass)
        assert torch.isfinite(g).all(), (loss_type, g)
        assert g[0, 0] == 0 and out.active.tolist() == [False, True]
