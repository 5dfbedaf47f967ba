"""score_example (for `data inspect --model`), a real collated STG batch through the loss, and
bf16 (CPU, and CUDA when there is one)."""
import copy

import pytest
import torch
from reattention_ref import dense_mask, full_precision_eager, lm_loss, make_batch, reference, tiny_model

from cat_ds.reattention import CatContext, reattention_loss
from cat_ds.reattention.diagnostics import score_example


def test_score_example_matches_reference():
    model = tiny_model("qwen2", seed=1)
    batch = make_batch([27], seed=8)
    res = score_example(model, batch, alpha=1.5, loss_type="nll")
    assert model.config._attn_implementation != "cat_sdpa"  # restored
    assert set(res) == {"lm_loss", "cat_loss", "row_stats", "ratio"}
    with torch.no_grad():
        ref_lm, ref_cat, ratios = reference(copy.deepcopy(model), batch, alpha=1.5, loss_type="nll")
        model.set_attn_implementation("eager")
        with full_precision_eager():
            att = model(input_ids=batch["input_ids"], output_attentions=True).attentions
    assert res["lm_loss"] == pytest.approx(float(ref_lm), abs=1e-6)
    assert res["cat_loss"] == pytest.approx(float(ref_cat), abs=1e-9) and res["cat_loss"] != 0
    assert len(res["row_stats"]) == len(ratios) == batch["cat_rows"].shape[0]
    abar, mask = torch.cat(att, 1).mean(1)[0], dense_mask(batch)[0]
    for (q, a1, a0), (b, q_ref) in zip(res["row_stats"], batch["cat_rows"].tolist()):
        row = mask[q_ref, :q_ref + 1] == 1
        assert q == q_ref
        assert a1 == pytest.approx(float(abar[q, :q + 1][row].mean()), abs=1e-12)
        assert a0 == pytest.approx(float(abar[q, :q + 1][~row].mean()), abs=1e-12)
    assert res["ratio"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-9)


def test_score_example_without_supervision_and_sampled_heads():
    model = tiny_model("llama", seed=2)
    model.set_attn_implementation("sdpa")
    res = score_example(model, make_batch([14], supervised=[False]))
    assert res["cat_loss"] == 0.0 and res["row_stats"] == [] and res["ratio"] != res["ratio"]  # NaN
    assert model.config._attn_implementation == "sdpa"  # restored
    res = score_example(model, make_batch([22], seed=4), heads=2, layers="last 1")
    assert res["row_stats"] and res["cat_loss"] <= 0


def test_real_collated_stg_batch(stg_dir, stg_h_dir, bpe_tokenizer):
    from cat_ds.data.collate import CatCollator
    from cat_ds.data.records import load_records
    from cat_ds.data.spans import tokenize_example

    tok = bpe_tokenizer
    records = load_records(stg_dir / "train.jsonl")[:2] + load_records(stg_h_dir / "train.jsonl")[:2]
    examples = [tokenize_example(r, tok, max_length=128) for r in records]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = CatCollator(pad_token_id=pad)(examples)
    assert batch["cat_rows"].shape[0] > 0 and len({len(e.input_ids) for e in examples}) > 1
    base = tiny_model("llama", vocab=len(tok), seed=3)
    ref_model, cat_model = copy.deepcopy(base), copy.deepcopy(base)

    ref_lm, ref_cat, ratios = reference(ref_model, batch, alpha=2.0, loss_type="div")
    (ref_lm + ref_cat).backward()
    cat_model.set_attn_implementation("cat_sdpa")
    ctx = CatContext.from_batch(batch, layers=[0, 1], num_heads=4)
    out = cat_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    res = reattention_loss(ctx, alpha=2.0, loss_type="div")
    (lm_loss(out.logits, batch["labels"]) + res.loss).backward()
    assert res.num_counted == len(ratios) > 0
    assert abs(float((res.loss - ref_cat).detach())) < 1e-9 and float(ref_cat.detach()) != 0
    for (name, p), (_, r) in zip(cat_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-9, rtol=0, msg=name)


@pytest.mark.parametrize("device", [
    "cpu",  # the same half-precision code path, so CI without a GPU covers it too
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_close_to_float64_reference(family, device):
    base = tiny_model(family, seed=5, hidden=64, heads=8)
    batch = make_batch([48, 40, 33], seed=6)
    ref_model = copy.deepcopy(base)
    ref_lm, ref_cat, _ = reference(ref_model, batch, alpha=1e9, loss_type="div")
    ref_cat.backward()

    model = copy.deepcopy(base).to(device, torch.bfloat16)
    model.set_attn_implementation("cat_sdpa")
    cuda_batch = {k: v.to(device) for k, v in batch.items()}
    ctx = CatContext.from_batch(cuda_batch, layers=[0, 1], num_heads=8)
    model(input_ids=cuda_batch["input_ids"], attention_mask=cuda_batch["attention_mask"], cat=ctx)
    res = reattention_loss(ctx, alpha=1e9, loss_type="div")
    res.loss.backward()
    assert abs(float(res.loss.detach()) - float(ref_cat.detach())) < 2e-2 * abs(float(ref_cat.detach())) + 1e-3
    for (name, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        if r.grad is not None and r.grad.abs().max() > 0:
            rel = (p.grad.double().cpu() - r.grad).norm() / r.grad.norm()
            assert rel < 0.1, (name, float(rel))
