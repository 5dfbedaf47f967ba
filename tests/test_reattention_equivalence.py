"""cat_sdpa + sparse loss == dense float64 reference (eager, all maps, row loop): values and
gradients of every parameter, to 1e-9 (the issue asks 1e-6)."""
import copy

import pytest
import torch
from reattention_ref import lm_loss, make_batch, reference, tiny_model

from cat_ds.reattention import CatContext, check_gradient_checkpointing, reattention_loss, select

TOL = 1e-9  # stricter than the 1e-6 required: float64 on both sides


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_cat(model, batch, *, alpha, loss_type, layers, heads, checkpointing, chunk_elems):
    model.set_attn_implementation("cat_sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        check_gradient_checkpointing(model)
    ctx = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=model.config.num_attention_heads,
                                chunk_elems=chunk_elems)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    lm = lm_loss(out.logits, batch["labels"])
    res = reattention_loss(ctx, alpha=alpha, loss_type=loss_type)
    (lm + 0.7 * res.loss).backward()
    return lm, res, _grads(model)


def _check(family, gqa, loss_type, checkpointing, lengths, layers_spec="all", heads_spec="all", seed=0,
           supervised=None, chunk_elems=1 << 25):
    base = tiny_model(family, gqa, seed=seed)
    batch = make_batch(lengths, seed=seed, supervised=supervised)
    n_layers, n_heads = base.config.num_hidden_layers, base.config.num_attention_heads
    layers, heads = select(n_layers, n_heads, layers=layers_spec, heads=heads_spec, seed=seed, step=3)
    ref_heads = {layer: (None if h is None else h.tolist()) for layer, h in heads.items()}
    # alpha halfway between the two middle ratios: some rows active, some not, none on the edge.
    with torch.no_grad():
        _, _, ratios = reference(copy.deepcopy(base), batch, alpha=0, loss_type=loss_type, layers=layers,
                                 heads=ref_heads)
    mid = sorted(ratios)[len(ratios) // 2 - 1: len(ratios) // 2 + 1]
    alpha = sum(mid) / 2
    assert min(ratios) < alpha < max(ratios) and mid[1] - mid[0] > 1e-6

    ref_model = copy.deepcopy(base)
    ref_lm, ref_cat, _ = reference(ref_model, batch, alpha=alpha, loss_type=loss_type, layers=layers, heads=ref_heads)
    (ref_lm + 0.7 * ref_cat).backward()
    ref_grads = _grads(ref_model)

    cat_model = copy.deepcopy(base)
    lm, res, grads = _run_cat(cat_model, batch, alpha=alpha, loss_type=loss_type, layers=layers, heads=heads,
                              checkpointing=checkpointing, chunk_elems=chunk_elems)
    assert 0 < int(res.active.sum()) < res.num_counted == len(ratios)
    assert abs(float((lm - ref_lm).detach())) < TOL
    assert abs(float((res.loss - ref_cat).detach())) < TOL, (float(res.loss.detach()), float(ref_cat.detach()))
    assert abs(float(ref_cat.detach())) > 1e-3  # the comparison is not 0 == 0
    assert set(grads) == set(ref_grads) == {n for n, _ in base.named_parameters()}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", ["div", "div2", "nll", "hinge"])
@pytest.mark.parametrize("family,gqa", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_equivalence_all_heads_padding(family, gqa, loss_type):
    # batch of 3, right padding, different lengths, multi-token keys, several keys per record
    _check(family, gqa, loss_type, checkpointing=False, lengths=[24, 17, 20])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("loss_type", ["div", "hinge"])
def test_equivalence_non_reentrant_checkpointing(family, loss_type):
    _check(family, True, loss_type, checkpointing=True, lengths=[22, 15], seed=1)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_equivalence_sampled_heads_and_layers(family, checkpointing):
    _check(family, True, "div", checkpointing=checkpointing, lengths=[21, 26], heads_spec=2, seed=2)
    _check(family, False, "nll", checkpointing=checkpointing, lengths=[21, 26], layers_spec="last 1", heads_spec=3,
           seed=3)


def test_equivalence_with_unsupervised_record_in_batch():
    _check("llama", True, "div", checkpointing=False, lengths=[19, 25, 16], supervised=[True, False, True], seed=4)


@pytest.mark.parametrize("heads_spec", ["all", 3])
def test_equivalence_chunked_over_rows(heads_spec):
    # chunk_elems so small that every supervised row is its own chunk
    _check("qwen2", True, "div2", checkpointing=False, lengths=[24, 18], heads_spec=heads_spec, seed=6, chunk_elems=1)


def test_equivalence_left_padding():
    """Left padding (not the collator's layout, but the context takes the attention mask):
    padded keys get no attention, as in the eager reference, and still count in |N| there."""
    base = tiny_model("llama", True, seed=7)
    batch = make_batch([23, 15, 19], seed=7)
    seq = batch["input_ids"].shape[1]
    pads = seq - batch["attention_mask"].sum(1)
    for k in ("input_ids", "attention_mask", "labels"):
        batch[k] = torch.stack([torch.roll(batch[k][b], int(pads[b])) for b in range(len(pads))])
    shift = pads[batch["cat_rows"][:, 0]]
    batch["cat_rows"] = torch.stack([batch["cat_rows"][:, 0], batch["cat_rows"][:, 1] + shift], 1)
    row_of_col = torch.repeat_interleave(torch.arange(len(shift)), batch["cat_col_ptr"].diff())
    batch["cat_cols"] = batch["cat_cols"] + shift[row_of_col]
    ref_model, cat_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_lm, ref_cat, _ = reference(ref_model, batch, alpha=1e9, loss_type="div")
    (ref_lm + 0.7 * ref_cat).backward()  # _run_cat's weighting
    lm, res, grads = _run_cat(cat_model, batch, alpha=1e9, loss_type="div", layers=[0, 1], heads={},
                              checkpointing=False, chunk_elems=1 << 25)
    assert abs(float((res.loss - ref_cat).detach())) < TOL and abs(float((lm - ref_lm).detach())) < TOL
    for name, g in _grads(ref_model).items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("granularity,loss_type", [("layer", "div"), ("layer", "hinge"), ("head", "div"),
                                                   ("head", "nll")])
def test_granularity_matches_per_unit_reference(granularity, loss_type):
    """granularity 'layer' / 'head' (not in the spec): each layer's head average / each head must
    pass alpha on its own; the row loss is the mean over those units. Same value and gradients as
    the dense reference applying the spec's loss per unit, and different from the spec's average."""
    base = tiny_model("llama", True, layers=3, seed=8)
    batch = make_batch([22, 18], seed=8)
    with torch.no_grad():
        _, _, ratios = reference(copy.deepcopy(base), batch, alpha=0, loss_type=loss_type, granularity=granularity)
    flat = sorted(ratios)
    alpha = (flat[len(flat) // 2 - 1] + flat[len(flat) // 2]) / 2  # some (row, layer) pairs pass, some do not
    ref_model = copy.deepcopy(base)
    ref_lm, ref_cat, _ = reference(ref_model, batch, alpha=alpha, loss_type=loss_type, granularity=granularity)
    (ref_lm + 0.7 * ref_cat).backward()
    cat_model = copy.deepcopy(base)
    cat_model.set_attn_implementation("cat_sdpa")
    ctx = CatContext.from_batch(batch, layers=[0, 1, 2], heads={}, num_heads=base.config.num_attention_heads)
    out = cat_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    each = reattention_loss(ctx, alpha=alpha, loss_type=loss_type, granularity=granularity)
    mean = reattention_loss(ctx, alpha=alpha, loss_type=loss_type)
    (lm_loss(out.logits, batch["labels"]) + 0.7 * each.loss).backward()
    assert abs(float((each.loss - ref_cat).detach())) < TOL and abs(float(ref_cat.detach())) > 1e-3
    assert abs(float((each.loss - mean.loss).detach())) > 1e-6
    assert each.a1.shape == mean.a1.shape == each.active.shape  # one value per row, for logging
    for name, g in _grads(ref_model).items():
        torch.testing.assert_close(_grads(cat_model)[name], g, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="granularity"):
        reattention_loss(ctx, alpha=alpha, granularity="row")
