"""`cat-ds data inspect --model`: the per-record diagnostics users run before/after training."""

import json
import math

import torch

from cat_ds.data.records import load_records
from cat_ds.data.spans import tokenize_example
from conftest import tiny_model
from test_data_cli import cat_ds


def test_inspect_with_model_reports_losses_and_row_stats(tmp_path, bpe_tokenizer, stg_dir):
    model = tiny_model("llama", vocab_size=len(bpe_tokenizer), seed=3)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "few.jsonl"
    data.write_text("".join(l for l in (stg_dir / "train.jsonl").read_text().splitlines(True)[:3]))

    p = cat_ds("data", "inspect", data, "--model", model_dir, "--dtype", "float64", "--json")
    objs = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(objs) == 4 and "summary" in objs[-1]
    model = model.double().eval()
    for rec, obj in zip(load_records(data), objs[:-1]):
        ex = tokenize_example(rec, bpe_tokenizer)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            want_lm = model(input_ids=ids, labels=torch.tensor([ex.labels])).loss.item()
        assert math.isclose(obj["lm_loss"], want_lm, rel_tol=1e-9)
        assert [r[0] for r in obj["row_stats"]] == [q for q, _ in ex.rows]
        for q, a1, a0 in obj["row_stats"]:
            assert 0 < a1 < 1 and 0 < a0 < 1
        mean_ratio = sum(a1 / a0 for _, a1, a0 in obj["row_stats"]) / len(obj["row_stats"])
        assert math.isclose(obj["ratio"], mean_ratio, rel_tol=1e-6)
        assert obj["cat_loss"] <= 0  # div loss is negative for rows below alpha, 0 otherwise
    assert objs[-1]["summary"]["mean_attention_ratio"] > 0

    human = cat_ds("data", "inspect", data, "--model", model_dir, "--heads", "2", "--layers", "last 1").stdout
    assert "causal/non-causal attention ratio" in human
