"""The engine on the real SmolLM2-135M-Instruct (GQA 9/3 heads, tied embeddings), named in the
config as `smollm2-135m-instruct`: 2 ranks of ZeRO-3 with CAT load it sharded, train, stop on
SIGTERM with a checkpoint, resume bit-exactly, export a model whose weights are the
uninterrupted run's and which, reloaded, predicts what the trained engine predicted. Records go
through the model's chat template (data.chat_template). Short inputs, a few steps (~3 min on 2 cores)."""
from __future__ import annotations

import re
import signal

import pytest
import torch

from engine_helpers import launch, metrics, state, tail, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stg_dir, smol_cache):
    tmp = tmp_path_factory.mktemp("smol")
    common = dict(stg_dir=stg_dir, tokenizer_dir=None,
                  model={"name_or_path": "smollm2-135m-instruct", "config": None, "tokenizer": None,
                         "gradient_checkpointing": True},
                  train={"micro_batch_size": 2, "max_steps": 4, "lr": 1e-4, "export": True},
                  cat={"enabled": True, "heads": "all"},
                  eval={"limit": 4, "batch_size": 4, "probe_size": 0},
                  data={"train": str(stg_dir / "train.jsonl"), "max_length": 128, "cache_dir": str(tmp / "cache"),
                        "chat_template": True,
                        "eval": {"iid": str(stg_dir / "test_iid.jsonl")}})
    env = {"CAT_DS_MODEL_CACHE": str(smol_cache)}
    ref_cfg = write_config(tmp, "ref", **common)
    ref = launch(ref_cfg, 2, env=env, launcher="torchrun", timeout=600)
    assert ref.returncode == 0, tail(ref)
    cut_cfg = write_config(tmp, "cut", **common)
    # SIGTERM before step 3: it finishes step 3, saves, exits 0.
    first = launch(cut_cfg, 2, env={**env, "CAT_DS_TEST_FAULTS": f"signal_at=2:{int(signal.SIGTERM)}"},
                   launcher="torchrun", timeout=600)
    assert first.returncode == 0 and "stop signal received" in first.stdout, tail(first)
    second = launch(cut_cfg, 2, "--resume", "auto", env=env, launcher="torchrun", timeout=600)
    assert second.returncode == 0 and "resumed from step_" in second.stdout, tail(second)
    return tmp, ref, second


def test_sharded_load_of_the_real_model(runs):
    _, ref, _ = runs
    m = re.search(r"model: ([\d,]+) parameters; rank 0 holds ([\d,]+)", ref.stdout)
    total, local = (int(g.replace(",", "")) for g in m.groups())
    assert total == 134_515_008 and local <= total // 2 + 100_000, (total, local)
    assert "activation checkpointing on)" in ref.stdout  # the CAT loss below runs under it


def test_cat_trains_and_resume_is_bit_exact(runs):
    tmp, _, _ = runs
    ref, cut = ([r for r in metrics(tmp / d) if "loss" in r] for d in ("ref", "cut"))
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    assert all(r["cat_loss"] != 0 and r["attn_ratio"] == r["attn_ratio"] for r in ref)
    assert state(cut) == state(ref)


def test_export_equals_the_uninterrupted_run_and_evaluates(runs):
    from transformers import AutoModelForCausalLM

    tmp, ref_proc, _ = runs
    a = AutoModelForCausalLM.from_pretrained(tmp / "ref" / "export")
    b = AutoModelForCausalLM.from_pretrained(tmp / "cut" / "export")
    assert a.config.tie_word_embeddings and a.config.num_key_value_heads == 3
    ids = torch.tensor([[1, 520, 33, 1035, 28, 216, 34]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    final = [r for r in metrics(tmp / "ref") if "eval/iid/accuracy" in r]
    assert final and 0.0 <= final[-1]["eval/iid/accuracy"] <= 1.0


def test_the_exported_model_predicts_what_the_trained_engine_predicted(runs, tmp_path, stg_dir):
    # Reloaded from export/, evaluated standalone (`cat-ds eval --chat-template`), the model gives the
    # in-engine evaluation's predictions, token for token, on the same records.
    import json

    from cat_ds.evaluation.standalone import evaluate_model_dir

    tmp, _, _ = runs
    (engine_preds,) = (tmp / "ref" / "eval").glob("step_*/iid.jsonl")
    engine = [json.loads(line) for line in engine_preds.read_text().splitlines()]
    data = tmp_path / "iid4.jsonl"  # eval.limit 4: the first 4 records, as written (not yet templated)
    data.write_text("".join((stg_dir / "test_iid.jsonl").read_text().splitlines(keepends=True)[:4]))
    assert engine[0]["input"].startswith("<|im_start|>")  # the engine evaluated templated prompts
    res = evaluate_model_dir(tmp / "ref" / "export", [str(data)], batch_size=4, chat_template=True)
    assert [p.prediction for p in res.predictions] == [p["prediction"] for p in engine]
    assert len(engine) == 4
