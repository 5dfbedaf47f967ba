"""Helpers for the engine tests: a tiny run config and real launches of cat_ds/train.py
(DeepSpeed launcher, gloo, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cat_ds.launch import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_MODEL = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True}  # tied, as SmolLM2
# Metrics that must match exactly between runs (timing ones never do).
STATE_KEYS = ("step", "epoch", "loss", "lm_loss", "cat_loss", "amplitude", "lr", "grad_norm", "attn_ratio")


def write_config(tmp: Path, name: str, *, stg_dir: Path, tokenizer_dir: str, **sections) -> Path:
    """A tiny-run YAML under tmp/name.yaml; `sections` override e.g. train={...}."""
    (tmp / "tiny_model.json").write_text(json.dumps(TINY_MODEL))
    cfg = {
        "output_dir": str(tmp / name),
        "model": {"config": str(tmp / "tiny_model.json"), "tokenizer": tokenizer_dir},
        "data": {"train": str(stg_dir / "train.jsonl"), "max_length": 128, "cache_dir": str(tmp / "cache")},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 0, "max_steps": 6,
                  "save_every": 0, "seed": 0, "export": False},
        "cat": {"enabled": True, "heads": 2, "layers": "all"},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            cfg.setdefault(sec, {}).update(vals)
        else:
            cfg[sec] = vals
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, nproc: int, *args: str, env: dict | None = None, timeout: float = 300,
           ds_config: str = "ds_configs/zero3.json", launcher: str = "deepspeed") -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N cat_ds/train.py ...` (or torchrun) exactly as a user runs it (CPU: N processes)."""
    port = free_port()
    if launcher == "deepspeed":
        head = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)]
    else:  # torchrun: lighter to start (the launcher itself does not import DeepSpeed)
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = [*head, "cat_ds/train.py", "--ds_config", ds_config, "--config", str(config), *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    p.elapsed, p.master_port = time.time() - t0, port
    return p


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def state(rows: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in STATE_KEYS) for r in rows]


def tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={p.returncode}\nSTDOUT:\n{p.stdout[-n:]}\nSTDERR:\n{p.stderr[-n:]}"
