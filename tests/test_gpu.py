"""The GPU path (bf16, flash-attn, NCCL, ZeRO-3 on CUDA): collected everywhere, skipped without a
CUDA device with the reason. Written for one GPU; not yet run on one (README, BENCHMARKS.md).

Everything else in the suite trains on CPU/gloo in fp32 (tests/conftest.py sets CAT_DS_DEVICE=cpu);
these tests ask for CUDA explicitly (`device_env("cuda")`), in subprocesses for the engine, so the
pytest process's DeepSpeed stays on CPU for the rest of the suite."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cat_ds.engine.device import device_env
from conftest import REPO
from engine_helpers import metrics, tail, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")]
CAT_DS = str(Path(sys.executable).with_name("cat-ds"))
# bf16 keeps 8 bits of mantissa (~0.4 % per rounding); over two layers and a mean over rows the
# losses stay within a few percent of float64. Flash and SDPA differ by kernel rounding only.
BF16_REL = 5e-2


def _cuda_env() -> dict:
    return {**os.environ, **device_env("cuda"), "OMP_NUM_THREADS": "4"}


@pytest.mark.parametrize("kernel", ["flash", "sdpa"])
def test_cat_loss_in_bf16_on_cuda_matches_the_float64_reference(kernel, monkeypatch):
    from reattention_ref import lm_loss, make_batch, reference, tiny_model

    from cat_ds.reattention import CatContext, attention, reattention_loss, select

    flash = attention.load_flash()
    if kernel == "flash":
        if not callable(flash):
            pytest.skip(flash)
        used = []
        monkeypatch.setattr(attention, "_FLASH", lambda *a, **k: used.append(1) or flash(*a, **k))
    else:
        monkeypatch.setattr(attention, "_FLASH", "off in this test: SDPA")
    base = tiny_model("llama", gqa=True, hidden=128, heads=4)  # float64, head dim 32 (flash: <= 256)
    batch = make_batch([48, 40], seed=1)  # right padding: cat_sdpa passes no mask, so flash can run
    layers, heads = select(2, 4, layers="all", heads="all", seed=0, step=0)
    with torch.no_grad():
        _, _, ratios = reference(copy.deepcopy(base), batch, alpha=0, loss_type="div")
        alpha = sorted(ratios)[len(ratios) // 2]  # about half the rows active
        ref_lm, ref_cat, _ = reference(copy.deepcopy(base), batch, alpha=alpha, loss_type="div")
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    model.set_attn_implementation("cat_sdpa")
    gb = {k: v.cuda() for k, v in batch.items()}
    ctx = CatContext.from_batch(gb, layers=layers, heads=heads, num_heads=4)
    out = model(input_ids=gb["input_ids"], attention_mask=gb["attention_mask"], cat=ctx)
    lm = lm_loss(out.logits.float(), gb["labels"])
    res = reattention_loss(ctx, alpha=alpha, loss_type="div")
    (lm + res.loss).backward()
    if kernel == "flash":
        assert used, "flash-attn was not called"
    assert abs(float(lm.detach()) - float(ref_lm)) <= BF16_REL * abs(float(ref_lm))
    assert abs(float(ref_cat)) > 1e-3 and abs(float(res.loss.detach()) - float(ref_cat)) <= BF16_REL * abs(float(ref_cat))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def zero3_cuda_run(tmp_path_factory, stg_dir, bpe_tokenizer):
    """`cat-ds train` on one GPU: ZeRO-3, CAT, 2 steps, then the end-of-run evaluation (generation)."""
    tmp = tmp_path_factory.mktemp("gpu_zero3")
    cfg = write_config(tmp, "run", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path,
                       train={"max_steps": 2}, data={"eval": {"iid": str(stg_dir / "test_iid.jsonl")}},
                       eval={"limit": 8, "batch_size": 4, "probe_size": 4}, tracking={"mlflow": False})
    p = subprocess.run([CAT_DS, "train", str(cfg), "--ds-config", "zero3", "--nproc", "1"], cwd=REPO,
                       env=_cuda_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, tail(p)
    return tmp / "run", p


def test_one_zero3_step_with_cat_on_nccl(zero3_cuda_run):
    out, p = zero3_cuda_run
    ds = json.loads((out / "ds_config.json").read_text())
    # bf16 is filled in only when the rank runs on CUDA, i.e. the NCCL branch of init_distributed.
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True, ds
    steps = [r for r in metrics(out) if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2], steps
    assert all(math.isfinite(r["loss"]) and r["cat_loss"] > 0 for r in steps), steps
    from cat_ds.reattention.attention import load_flash

    assert ("[cat-ds] warning: flash-attn" in p.stderr) == (not callable(load_flash())), p.stderr[-2000:]


def test_generation_under_zero3_on_cuda(zero3_cuda_run):
    out, _ = zero3_cuda_run
    evals = [r for r in metrics(out) if "eval/iid/n" in r]
    assert evals and evals[-1]["eval/iid/n"] == 8, metrics(out)[-3:]
    preds = [json.loads(line) for f in (out / "eval").glob("step_*/iid.jsonl") for line in f.read_text().splitlines()]
    assert len(preds) == 8 and all("prediction" in r for r in preds)


@pytest.mark.slow
def test_step_time_bench_on_cuda(tmp_path, smol_cache):
    """bench/step_time.py on the GPU, SmolLM2, engine ZeRO-3 on one rank: tokens/s, MFU (against a
    bf16 matmul), CAT/base and peak memory per mode."""
    env = {**_cuda_env(), "CAT_DS_MODEL_CACHE": str(smol_cache)}
    p = subprocess.run([sys.executable, "bench/step_time.py", "--variants", "zero3x1", "--per-mode", "--steps", "3",
                        "--warmup", "1", "--no-startup", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, tail(p)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["matmul_gflops"] > 5000, res  # a bf16 GPU matmul; two CPU cores reach ~0.1 TFLOP/s
    (row,) = res["rows"]
    for m in ("base", "cat"):
        assert row[f"{m}_tokens_per_s"] > 0 and 0 < row[f"{m}_mfu"] < 1, row
        assert any(k.startswith(m) and "peak" in k and row[k] > 0 for k in row), row
    assert 0.9 < res["cat_over_base"] < 3, res
