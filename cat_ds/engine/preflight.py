"""What the launching process checks before any rank starts. Cheap on purpose (no torch, no
DeepSpeed, no transformers): `cat-ds train` runs it before torchrun, and every second here
is a second before the first step."""
from __future__ import annotations

import os
from pathlib import Path

from cat_ds.config import Config, ConfigError, fill_ds_config, load_ds_config


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def check(cfg: Config, ds_config_path: str, world_size: int, resume: str | None = "auto") -> dict:
    """Everything that can be checked without data or a model: raises ConfigError."""
    ds = load_ds_config(ds_config_path)
    fill_ds_config(ds, cfg, world_size=world_size, src=ds_config_path)  # batch arithmetic, fp16-on-CPU
    latest = checkpoint_root(cfg.output_dir) / "latest"
    if resume != "auto" and latest.exists():
        # A fresh run would interleave its checkpoints with the old ones (and keep-last-K could
        # then prune the new ones): refuse instead of guessing.
        raise ConfigError(f"output_dir {cfg.output_dir} already holds checkpoints of a run ({latest}): "
                          "continue it with --resume auto, or choose another output_dir")
    return ds


def threads_per_rank(ranks_on_node: int) -> int:
    """CPU threads for one rank: this process's usable cores shared by the node's ranks.
    (torchrun's default of 1 thread per rank leaves half of a 2-core machine idle on 1 rank.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ranks_on_node))
