"""Checkpoints: DeepSpeed save/load + client state, an atomic `latest` pointer, keep-last-K.

Layout under OUTPUT_DIR/checkpoints/:
    step_00000040/            DeepSpeed's files (model/optimizer shards) for global step 40
        client_state.json     step, epoch, position, world size, head-sampler seed (rank 0)
        rng_rank{r}.pt        this rank's torch/python/numpy(/cuda) RNG states
        hf/                   model config + tokenizer (what `export` needs besides weights)
        COMPLETE              written last, after every rank has finished writing
    latest                    the tag of the newest COMPLETE checkpoint

Visibility: DeepSpeed is told not to write `latest` itself (`save_latest=False`); we write
it with os.replace after COMPLETE, so a run killed mid-save leaves `latest` on the previous
checkpoint, which still loads. The half-written directory is removed at the next save.
DeepSpeed's own loaders (`load_checkpoint`, zero_to_fp32) read the same `latest` file.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from cat_ds.engine.distributed import barrier, broadcast_object
from cat_ds.engine.ds_config import checkpoint_root  # noqa: F401  (re-exported: one owner)

TAG_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(root: str | Path) -> str | None:
    p = Path(root) / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not (Path(root) / tag / COMPLETE).is_file():
        raise RuntimeError(f"{p} points to {tag!r}, which is not a complete checkpoint")
    return tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(root: Path) -> list[str]:
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()] if root.is_dir() else []
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def save(engine, output_dir: str | Path, *, step: int, client_state: dict, rank: int, keep_last: int,
         hf_files=None, faults=None) -> str:
    """Collective: every rank calls it. Returns the tag. `hf_files(dir)` writes config/tokenizer (rank 0).
    `faults` (engine/faults.py, tests only): may kill this process between writing and committing."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if (root / tag).exists():  # a half-written save of this step from a killed run
            shutil.rmtree(root / tag)
    barrier()
    try:
        # LoRA: only what trains (adapters + their optimizer state); the frozen base comes from the model source.
        engine.save_checkpoint(str(root), tag=tag, client_state={"cat_ds": client_state}, save_latest=False,
                               exclude_frozen_parameters=_frozen_part(engine))
        torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as e:
        # A full disk surfaces from torch.save as "unexpected pos 538063104 vs 538062992": say what it means.
        raise CheckpointWriteError(_write_failure(root, tag, e)) from e
    if rank == 0:
        (root / tag / "client_state.json").write_text(json.dumps(client_state, indent=1) + "\n")
        if hf_files is not None:
            hf_files(root / tag / "hf")
    if faults is not None:
        faults.in_save(step, rank)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        _write_atomic(root / tag / COMPLETE, "")
        _write_atomic(root / "latest", tag)
        _prune(root, keep_last, tag)
    barrier()
    return tag


class CheckpointWriteError(RuntimeError):
    """A rank could not write its part of a checkpoint (disk full, quota, file-size limit, I/O error)."""


def _write_failure(root: Path, tag: str, err: BaseException) -> str:
    try:
        latest = read_latest(root)
    except RuntimeError:
        latest = None
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    free = shutil.disk_usage(root).free / 2**30
    msg = f"writing checkpoint {root / tag} failed ({first_line}); {free:.1f} GiB free on that disk"
    if latest is None:
        return msg + "; no earlier checkpoint exists"
    size = sum(f.stat().st_size for f in (root / latest).rglob("*") if f.is_file())
    return (msg + f", the last checkpoint took {size / 2**20:,.0f} MiB; {root / 'latest'} still points to {latest}, "
            "which `--resume auto` continues from once there is room")


def _frozen_part(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def _prune(root: Path, keep_last: int, current: str) -> None:
    keep = set(complete_tags(root)[-keep_last:]) | {current}  # never the one `latest` points to
    for p in root.iterdir():
        if TAG_RE.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, output_dir: str | Path, *, rank: int, world_size: int) -> dict | None:
    """Collective. Load the checkpoint `latest` points to; returns its client state (None if none).

    `latest` is read once, by rank 0, and broadcast: on a network file system two nodes may see two
    versions of it (attribute caching), and ranks resuming from different steps would hang or diverge."""
    root = checkpoint_root(output_dir)
    tag = error = None
    if rank == 0:
        try:
            tag = read_latest(root)
        except RuntimeError as e:  # every rank raises it, none waits in a collective rank 0 left
            error = str(e)
    tag, error = broadcast_object((tag, error))
    if error:
        raise RuntimeError(error)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not _frozen_part(engine))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state = client["cat_ds"]
    rng = root / tag / f"rng_rank{rank}.pt"
    if state.get("world_size") == world_size and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    state["tag"] = tag
    return state


def resolve(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(root, tag) from a run's OUTPUT_DIR, its checkpoints/ dir or one tag dir."""
    p = Path(checkpoint_dir)
    if (p / "checkpoints").is_dir() and not (p / "latest").exists():
        p = p / "checkpoints"
    if tag is None and (p / COMPLETE).is_file():
        return p.parent, p.name
    if tag is None:
        tag = read_latest(p)
        if tag is None:
            raise FileNotFoundError(f"{checkpoint_dir}: no 'latest' checkpoint pointer (and not a checkpoint dir)")
    if not (p / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"{p / tag}: not a complete cat-ds checkpoint")
    return p, tag
