"""`cat-ds plan`: model-state figures are DeepSpeed's own estimators' for SmolLM2-135M and a 1B
Llama config; activations and CAT's extra are added; each option gets a verdict."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

CAT_DS = str(Path(sys.executable).with_name("cat-ds"))
GIB = 1024 ** 3


def _rows(out: str) -> dict[str, tuple[float, float, float, str]]:
    rows = {}
    for m in re.finditer(r"^\| (zero[^|]*?) \| ([\d.]+) GiB \| ([\d.]+) GiB \| ([\d.]+) GiB \| ([^|]+) \|$", out, re.M):
        rows[m[1]] = (float(m[2]), float(m[3]), float(m[4]), m[5])
    return rows


def _deepspeed(total, largest, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    z3 = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False)
    z3o = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=True)
    return {"zero2": (z2[1], z2[0]), "zero3": (z3[1], z3[0]), "zero3+offload optimizer+params": (z3o[1], z3o[0])}


def test_smollm2_figures_are_deepspeeds_on_the_real_model(smol_cache, monkeypatch):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("CAT_DS_MODEL_CACHE", str(smol_cache))
    (model_dir,) = smol_cache.iterdir()
    total, largest = model_to_params(AutoModelForCausalLM.from_pretrained(model_dir))  # DeepSpeed counts the real one
    assert total == 134_515_008
    p = subprocess.run([CAT_DS, "plan", "smollm2_stg", "--nodes", "2", "--gpus-per-node", "4", "--gpu-mem", "24"],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**__import__("os").environ, "CAT_DS_MODEL_CACHE": str(smol_cache)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"model: {total:,} parameters (largest layer {largest:,})" in p.stdout
    rows = _rows(p.stdout)
    assert len(rows) == 5 and all(v[3] == "fits" for v in rows.values())
    for name, (gpu, cpu) in _deepspeed(total, largest, 2, 4).items():
        assert rows[name][0] == pytest.approx(gpu / GIB, abs=0.006) and rows[name][2] == pytest.approx(cpu / GIB, abs=0.006)
        assert rows[name][1] > rows[name][0]  # activations on top


def test_a_1b_llama_config_against_the_parameter_formula_and_a_verdict():
    import json

    c = json.loads((REPO / "configs" / "models" / "llama_1b.json").read_text())
    h, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v (GQA); gate, up, down; 2 norms
    total = 2 * v * h + L * per_layer + h  # untied embedding and head, final norm
    largest = v * h
    sets = ["--set", "model.config=configs/models/llama_1b.json", "--set", "cat.enabled=false"]
    p = subprocess.run([CAT_DS, "plan", "stg_tiny", "--gpus-per-node", "8", "--gpu-mem", "8", *sets],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"model: {total:,} parameters (largest layer {largest:,})" in p.stdout
    rows = _rows(p.stdout)
    for name, (gpu, cpu) in _deepspeed(total, largest, 1, 8).items():
        assert rows[name][0] == pytest.approx(gpu / GIB, abs=0.006) and rows[name][2] == pytest.approx(cpu / GIB, abs=0.006)
    # 18 bytes per parameter / 8 GPUs + 16-bit weights does not fit 8 GiB with ZeRO-2; ZeRO-3 offload does.
    assert rows["zero2"][3].startswith("too large") and rows["zero3+offload optimizer+params"][3] == "fits"


def test_cat_adds_its_recompute_measured_on_the_data(tmp_path, stg_dir, bpe_tokenizer):
    from cat_ds.config import load_config
    from cat_ds.plan import plan

    from engine_helpers import write_config

    path = write_config(tmp_path, "p", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path)
    base = plan(load_config(path, ["cat.enabled=false"]), 1, 1, 80, 512)
    cat = plan(load_config(path), 1, 1, 80, 512)
    assert "CAT recompute" not in base and "supervised rows per record (measured)" in cat
