"""Process-group set-up (the one place besides the engine that touches DeepSpeed's comm).

Works under `deepspeed` (RANK/LOCAL_RANK/WORLD_SIZE + `--local_rank`), `torchrun`, Slurm
`srun` (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS) and a bare `python` (one rank on a free
port). gloo on CPU, nccl on GPU.

Failure policy: a rank that raises prints its traceback and exits non-zero *without* waiting
for the others (os._exit after tearing down), so the launcher (deepspeed/torchrun/srun) sees
the failure and kills the remaining ranks; a rank blocked in a collective with a dead peer
gets a gloo connection error, and at worst the collective timeout (CAT_DS_DIST_TIMEOUT,
default 600 s) bounds everything. Nothing hangs forever.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass

import torch

from cat_ds.engine.preflight import threads_per_rank

# DeepSpeed 0.19's ZeRO-3 calls torch collectives that torch 2.13 deprecates: one
# FutureWarning per call (hundreds per step, thousands per evaluation) would bury every log.
# Nothing for users to do.
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated",
                        category=FutureWarning)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env() -> None:
    """Make RANK/WORLD_SIZE/MASTER_* exist (else DeepSpeed falls back to MPI discovery)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def _abort_on_exception(rank: int):
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if exc_type is KeyboardInterrupt:
            return previous(exc_type, exc, tb)
        sys.stderr.write(f"[rank {rank}] fatal: {''.join(traceback.format_exception(exc_type, exc, tb))}")
        sys.stderr.flush()
        # Do not run atexit/destroy hooks that may block on peers: leave now, loudly.
        os._exit(1)

    sys.excepthook = hook


def tune_cpu_process() -> None:
    """CPU training: the thread count (unless OMP_NUM_THREADS says otherwise) and glibc malloc.

    Why malloc: tensors over 32 MB (a 134M model's flat gradient and optimizer temporaries, the
    vocabulary logits) are mmap-ed fresh and unmapped on free, so every step first-touches
    gigabytes of new pages: measured on SmolLM2-135M, a third of a step in page faults. With
    mmap off and no trimming, freed memory stays in the heap and is reused without faults. The
    cost: the process keeps its peak heap until it exits, which a training process does anyway."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or \
            os.environ.get("WORLD_SIZE", "1")
        torch.set_num_threads(threads_per_rank(int(local.split("(")[0])))
    if sys.platform.startswith("linux") and os.environ.get("CAT_DS_MALLOC_TUNING", "1") != "0":
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: no mmap-ed chunks
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: (almost) never return the heap's top
        except (OSError, AttributeError):  # not glibc (musl, ...): keep its defaults
            pass


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and return this rank's info."""
    import deepspeed

    _fill_env()
    timeout_s = float(os.environ.get("CAT_DS_DIST_TIMEOUT", timeout_s or 600))
    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        tune_cpu_process()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    _abort_on_exception(rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(rank, local_rank, torch.distributed.get_world_size(), device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a rank's process after `shutdown()` without Python's interpreter finalisation.

    Why: gloo's worker threads may still be releasing their last work when Python finalises;
    one that then needs the GIL is killed by the interpreter mid-C++ frame and the process
    aborts ("terminate called without an active exception", SIGABRT) although the run had
    finished cleanly: seen once in CI on both ranks of a 2-rank gloo job. Everything the run
    owns is closed by now (checkpoints, metrics.jsonl, the MLflow pusher joins on close), so
    only stdio needs flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe must not turn success into a traceback
            pass
    os._exit(code)
