"""The training-time evaluation callback (sets, predictions JSONL, best metric, attention
probe) and the standalone `cat-ds eval --json` on a saved Hugging Face model directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cat_ds.data.records import write_jsonl
from cat_ds.evaluation import Evaluator, run_eval
from cat_ds.evaluation.probe import probe_attention, probe_batch
from eval_helpers import stg_records, tiny_model, train_tiny

CAT_DS = str(Path(sys.executable).parent / "cat-ds")


@pytest.fixture(scope="module")
def trained(bpe_tokenizer):
    return train_tiny(tiny_model(bpe_tokenizer, layers=3), bpe_tokenizer, stg_records(400, seed=5), steps=150)


def test_evaluator_sets_predictions_best(trained, bpe_tokenizer, tmp_path):
    iid, ood = stg_records(12, seed=21, split="iid"), stg_records(10, seed=22, split="ood")
    ev = Evaluator(bpe_tokenizer, {"iid": iid, "ood": ood}, out_dir=tmp_path, batch_size=4,
                   probe_records=stg_records(40, seed=1), probe_size=6, best_metric="eval/ood/accuracy")
    out = ev(trained, step=30)
    m = out.metrics
    assert m["eval/iid/n"] == 12 and m["eval/ood/n"] == 10
    assert m["eval/iid/accuracy"] == out.results["iid"].accuracy == m["eval/iid/correct"] / 12
    assert {f"probe/attn_ratio/layer_{i}" for i in range(3)} | {"probe/attn_ratio"} <= set(m)
    assert [p.name for p in out.files[:2]] == ["iid.jsonl", "ood.jsonl"]
    assert out.files[0].parent == tmp_path / "eval" / "step_30"
    # Then the attention pictures of 4 sampled records per set (attention_map), returned for the trainer to log.
    step_dir = tmp_path / "eval" / "step_30" / "attention"
    pictures = {str(f.relative_to(step_dir)) for f in out.files[2:]}
    for name in ("iid", "ood"):
        assert {f"{name}_shares.png", f"{name}_attention.html", f"{name}_attention.json"} <= pictures
        assert len([f for f in pictures if f.startswith(f"{name}_record_")]) == 4
    assert all(f.is_file() for f in out.files)
    lines = [json.loads(x) for x in out.files[1].read_text().splitlines()]
    assert len(lines) == 10 and set(lines[0]) == {"input", "target", "prediction", "correct"}
    assert [x["correct"] for x in lines] == [p.correct for p in out.results["ood"].predictions]
    assert lines[0]["input"] == ood[0]["input"] and lines[0]["target"] == ood[0]["target"]
    assert out.is_best  # first evaluation
    assert ev(trained, step=60).is_best is False  # same model: not better
    ev.best_value = m["eval/ood/accuracy"] - 0.5  # as if an earlier eval was worse
    assert ev(trained, step=90).is_best is True
    with pytest.raises(KeyError, match="eval/test/accuracy"):
        Evaluator(bpe_tokenizer, {"iid": iid}, out_dir=tmp_path, best_metric="eval/test/accuracy")(trained, 1)


def test_probe_per_layer_ratio_matches_reattention_scoring(trained, bpe_tokenizer):
    """Per layer, the probe is the median over rows of `score_example`'s per-row a1/a0,
    restricted to that layer."""
    from cat_ds.reattention.diagnostics import score_example

    batch = probe_batch(bpe_tokenizer, stg_records(5, seed=3), limit=2)
    got = probe_attention(trained, batch)
    for layer in range(3):
        rows = score_example(trained, batch, layers=[layer])["row_stats"]
        ratios = sorted(a1 / a0 for _, a1, a0 in rows)
        assert len(ratios) >= 3
        # torch's median of an even count is the lower middle value
        ref = ratios[(len(ratios) - 1) // 2]
        assert got[f"probe/attn_ratio/layer_{layer}"] == pytest.approx(ref, rel=1e-5)
    assert trained.config._attn_implementation == "sdpa"  # restored
    assert probe_batch(bpe_tokenizer, [{"input": "a ", "target": "b"}]) is None  # no supervision: no probe


def test_cli_eval_json(trained, bpe_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    trained.save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    recs = stg_records(9, seed=31, split="iid")
    data = tmp_path / "iid.jsonl"
    write_jsonl(recs, data)
    want = run_eval(trained, bpe_tokenizer, recs, batch_size=4)
    proc = subprocess.run([CAT_DS, "eval", "--model", str(model_dir), "--data", str(data), "--batch-size", "4",
                           "--predictions", str(tmp_path / "p.jsonl"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want.summary()
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert preds == [p.prediction for p in want.predictions]
    bad = subprocess.run([CAT_DS, "eval", "--model", str(model_dir), "--data", str(data), "--scorer", "bleu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "bleu" in bad.stderr


def test_records_are_tokenised_once_per_run(trained, bpe_tokenizer, tmp_path, monkeypatch):
    # The probe takes the run's tokenised training rows (what datasets.map cached), never the files;
    # each eval set is tokenised at its first evaluation only, and gives the same predictions.
    import torch

    import cat_ds.evaluation.generate as generate
    from cat_ds.data.records import parse_record
    from cat_ds.data.spans import tokenize_example
    from cat_ds.evaluation.probe import probe_from_examples

    train = stg_records(40, seed=1)
    rows = [tokenize_example(parse_record(r, ""), bpe_tokenizer, 256).to_dict() for r in train]
    from_rows = probe_from_examples(rows, bpe_tokenizer.pad_token_id, limit=6)
    from_records = probe_batch(bpe_tokenizer, train, max_length=256, limit=6)
    assert from_rows.keys() == from_records.keys() and all(torch.equal(from_rows[k], from_records[k]) for k in from_rows)

    calls = []
    real = generate.prepare_prompts
    monkeypatch.setattr(generate, "prepare_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    iid = stg_records(8, seed=21, split="iid")
    ev = Evaluator(bpe_tokenizer, {"iid": iid}, out_dir=tmp_path, batch_size=4, probe_examples=rows, probe_size=6)
    first, second = ev(trained, step=1), ev(trained, step=2)
    assert len(calls) == 1 and first.metrics == second.metrics
    assert [p.prediction for p in first.results["iid"].predictions] == \
        [p.prediction for p in run_eval(trained, bpe_tokenizer, iid, batch_size=4).predictions]
