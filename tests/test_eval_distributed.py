"""2-rank evaluation (torchrun, gloo) gives the same accuracy and predictions as 1 rank, and
uneven shards (7 records over 2 ranks, batch 2: 4 + 3, padded) do not hang: with a full model
per rank, and under the engine's DeepSpeed ZeRO-3 (partitioned weights, "cat_sdpa")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cat_ds.data.records import write_jsonl
from cat_ds.evaluation import run_eval
from eval_helpers import stg_records, tiny_model, train_tiny
from tracking_helpers import free_port

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("evalmodel")
    model = train_tiny(tiny_model(bpe_tokenizer), bpe_tokenizer, stg_records(400, seed=5), steps=150)
    model.save_pretrained(d)
    bpe_tokenizer.save_pretrained(d)
    return d, model


def _torchrun(model_dir, data, out, batch_size, mode="plain", *extra):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(HERE / "eval_dist_script.py"), str(model_dir), str(data), str(out), str(batch_size), mode, *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line][:20]
    assert proc.returncode == 0, "\n".join(errors) + proc.stdout[-3000:] + proc.stderr[-8000:]
    return json.loads(Path(out).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("n,batch_size", [(7, 2), (5, 4), (1, 2)])  # uneven; fewer batches than ranks' share
def test_two_ranks_equal_one_rank(saved_model, bpe_tokenizer, tmp_path, n, batch_size):
    model_dir, model = saved_model
    recs = stg_records(n, seed=11, split="ood")
    data = tmp_path / "eval.jsonl"
    write_jsonl(recs, data)
    one = run_eval(model, bpe_tokenizer, recs, batch_size=batch_size)
    two = _torchrun(model_dir, data, tmp_path / "out.json", batch_size)
    assert two["world_size"] == 2 and two["n"] == n
    assert two["predictions"] == [p.prediction for p in one.predictions]
    assert (two["accuracy"], two["correct"]) == (one.accuracy, one.correct)
    if n == 7:
        assert 0 < one.correct < n  # mixed right/wrong answers: the comparison means something


@pytest.mark.slow
def test_zero3_two_ranks_equal_one_rank(saved_model, bpe_tokenizer, tmp_path):
    model_dir, model = saved_model
    recs = stg_records(7, seed=12, split="iid")  # 4 + 3 records: rank 1 generates a padding batch
    data = tmp_path / "eval.jsonl"
    write_jsonl(recs, data)
    cfg = tmp_path / "z3.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'z3'}\nmodel:\n  name_or_path: {model_dir}\n"
                   f"data:\n  train: {data}\n  generate_stg: false\ntrain:\n  micro_batch_size: 2\n"
                   "  grad_accum: 1\n  max_steps: 1\n  allow_dropped_records: true\n")  # 7 records, batch 4: set-up only
    one = run_eval(model, bpe_tokenizer, recs, batch_size=2)
    two = _torchrun(model_dir, data, tmp_path / "out.json", 2, "zero3", cfg)
    assert two["world_size"] == 2 and two["attn"] == "cat_sdpa"
    assert two["predictions"] == [p.prediction for p in one.predictions]
    assert (two["accuracy"], two["correct"]) == (one.accuracy, one.correct)
    assert 0 < one.correct < 7
