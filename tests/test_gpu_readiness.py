"""GPU readiness, checked where there is no GPU: GPUs allocated with a CPU build of torch is one line
before any rank starts (through `cat-ds train` and a direct `srun`-style launch of cat_ds/train.py);
CAT_DS_DEVICE owns the device choice; a flash-attn that does not import is one warning line at
model build, and SDPA runs."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from cat_ds.engine.device import GpuNotReady, check_gpu_ready, device_choice, pick, torch_build
from conftest import REPO
from engine_helpers import write_config

CPU_TORCH = pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build: nothing to refuse")
GPU_ALLOCATED = {"SLURM_GPUS_ON_NODE": "1", "CAT_DS_DEVICE": "auto"}  # what a Slurm GPU job's ranks see


def test_torch_build_is_read_without_importing_torch():
    assert torch_build() == (torch.__version__, torch.version.cuda)
    code = "import sys; from cat_ds.engine.device import torch_build; torch_build(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip() == "False"


def test_the_rule():
    cpu, cuda = ("2.13.0+cpu", None), ("2.13.0+cu128", "12.8")
    with pytest.raises(GpuNotReady, match=r"SLURM_GPUS_ON_NODE=1.*torch 2\.13\.0\+cpu is a CPU build"):
        check_gpu_ready(GPU_ALLOCATED, build=cpu)
    with pytest.raises(GpuNotReady, match=r"SLURM_JOB_GPUS=0,1"):
        check_gpu_ready({"SLURM_JOB_GPUS": "0,1"}, build=cpu)
    with pytest.raises(GpuNotReady, match=r"CAT_DS_DEVICE=cuda"):
        check_gpu_ready({"CAT_DS_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}, build=cpu)
    check_gpu_ready(GPU_ALLOCATED, build=cuda)  # the CUDA build: fine
    check_gpu_ready({**GPU_ALLOCATED, "CAT_DS_DEVICE": "cpu"}, build=cpu)  # CPU on purpose
    check_gpu_ready({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": ""}, build=cpu)  # no GPU meant
    assert pick(True, {}) == "cuda" and pick(False, {}) == "cpu" and pick(True, {"CAT_DS_DEVICE": "cpu"}) == "cpu"
    with pytest.raises(GpuNotReady):
        pick(False, {"CAT_DS_DEVICE": "cuda"})
    with pytest.raises(ValueError, match="CAT_DS_DEVICE=gpu: expected one of auto, cpu, cuda"):
        device_choice({"CAT_DS_DEVICE": "gpu"})


def _cfg(tmp_path, stg_dir, bpe_tokenizer):
    return write_config(tmp_path, "run", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path,
                        train={"max_steps": 1})


@CPU_TORCH
def test_cat_ds_train_refuses_a_cpu_torch_on_a_gpu_node(tmp_path, stg_dir, bpe_tokenizer):
    cfg = _cfg(tmp_path, stg_dir, bpe_tokenizer)
    p = subprocess.run([str(Path(sys.executable).with_name("cat-ds")), "train", str(cfg), "--nproc", "1"], cwd=REPO,
                       env={**os.environ, **GPU_ALLOCATED}, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line, no rank was started
    assert f"torch {torch.__version__} is a CPU build" in p.stderr and "SLURM_GPUS_ON_NODE=1" in p.stderr
    assert not (tmp_path / "run").exists()


@CPU_TORCH
def test_a_direct_srun_launch_refuses_it_too(tmp_path, stg_dir, bpe_tokenizer):
    """srun/torchrun start cat_ds/train.py on every rank without the launcher's check."""
    cfg = _cfg(tmp_path, stg_dir, bpe_tokenizer)
    env = {**os.environ, **GPU_ALLOCATED, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "cat_ds.train", "--config", str(cfg)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"torch {torch.__version__} is a CPU build" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_a_broken_flash_attn_is_one_warning_at_model_build(tmp_path, monkeypatch, capsys):
    """A flash-attn built against another torch fails at import (undefined symbol): the model build
    says so once and the attention falls back to SDPA."""
    from cat_ds.engine.model import _load_flash
    from cat_ds.reattention import attention

    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)  # a real one imported earlier
    monkeypatch.setattr(attention, "_FLASH", None)
    assert _load_flash() is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[cat-ds] warning: flash-attn does not import (ImportError: " in err, err
    assert "attention runs on PyTorch SDPA" in err
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    assert not attention._flash_usable(q)  # so attention_output takes SDPA
    out = attention.attention_output(q, q, q, None, 0.0, 8 ** -0.5)
    assert out.shape == (1, 4, 2, 8)


def test_setup_refuses_an_unknown_torch_choice():
    p = subprocess.run(["bash", "scripts/setup_venv.sh"], cwd=REPO, env={**os.environ, "CAT_DS_TORCH": "gpu"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "CAT_DS_TORCH=gpu: expected cuda or cpu" in p.stderr, p.stderr


def test_the_gpu_extra_installs_under_build_isolation():
    """flash-attn cannot be an extra: it needs torch at build time (pip's build isolation has none);
    scripts/setup_venv.sh installs it afterwards with --no-build-isolation."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for reqs in extras.values() for r in reqs if r.lower().replace("_", "-").startswith("flash-attn")]
    assert "--no-build-isolation" in (REPO / "scripts" / "setup_venv.sh").read_text()
