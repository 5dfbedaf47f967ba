"""Process-group set-up (the one place besides the engine that touches DeepSpeed's comm).

Works under `deepspeed` (RANK/LOCAL_RANK/WORLD_SIZE + `--local_rank`), `torchrun`, Slurm
`srun` (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS) and a bare `python` (one rank on a free
port). gloo on CPU, nccl on GPU; `CAT_DS_DEVICE=cpu` keeps a GPU machine on CPU/gloo (engine/device.py).

Failure policy: a rank that raises prints its traceback and exits non-zero *without* waiting
for the others (os._exit after tearing down), so the launcher (deepspeed/torchrun/srun) sees
the failure and kills the remaining ranks; a rank blocked in a collective with a dead peer
gets a gloo connection error, and at worst the collective timeout bounds everything. Three
bounds: joining the group (CAT_DS_RDZV_TIMEOUT, default 60 s: a rank that cannot reach the head
node says so in one line), set-up collectives (CAT_DS_SETUP_TIMEOUT, default 4 h: rank 0 may
convert a model or tokenise a large dataset while the others wait) and training collectives
(CAT_DS_DIST_TIMEOUT, default 600 s); `use_timeout` switches between the last two. A rank whose
peer vanished mid-collective (a lost node) says in one line which rank and host went
(`exit_on_lost_peer`). Nothing hangs forever.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import traceback
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch

from cat_ds.engine.device import device_choice, device_env, pick
from cat_ds.engine.preflight import threads_per_rank
from cat_ds.launch import free_port

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


class StopSignal:
    """SIGTERM/SIGUSR1 (Slurm's preemption / time limit) set a flag; ranks agree on it at the step's end."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


# The rendezvous port of a Slurm job: derived from the job id, so two jobs sharing a node do not
# collide and a requeued job (same id) reuses it. slurm/train_cat.sbatch applies the same rule.
JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 20000
RDZV_TIMEOUT_S = 60  # joining the process group; CAT_DS_RDZV_TIMEOUT overrides
# Collective timeouts per phase: (environment variable, default seconds).
TIMEOUTS = {"setup": ("CAT_DS_SETUP_TIMEOUT", 4 * 3600), "train": ("CAT_DS_DIST_TIMEOUT", 600)}


def job_port(job_id: str | int) -> int:
    return JOB_PORT_BASE + int(job_id) % JOB_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[01-04,7],gpu1" -> "node01"): `scontrol show
    hostnames` where Slurm's clients are installed, else the common forms parsed here."""
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "") + suffix


def _fill_env() -> None:
    """Make RANK/WORLD_SIZE/MASTER_* exist (else DeepSpeed falls back to MPI discovery).

    Under a direct `srun python -m cat_ds.train` (no torchrun), Slurm's variables say it all: task
    0 runs on the first host of the step, which hosts the store on the job's port."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if nodes and "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = first_host(nodes)
        if "SLURM_JOB_ID" in env:
            env.setdefault("MASTER_PORT", str(job_port(env["SLURM_JOB_ID"])))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
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


def _use_cpu_accelerator(choice: str) -> None:
    """CAT_DS_DEVICE=cpu in a process whose DeepSpeed already picked CUDA (imported before the
    choice was exported): switch it, or DeepSpeed would move the model to a GPU."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if choice == "cpu" and get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and return this rank's info."""
    choice = device_choice()  # CAT_DS_DEVICE: auto | cpu | cuda (engine/device.py)
    os.environ.update(device_env(choice))  # before DeepSpeed picks its accelerator (at import)
    import deepspeed

    _use_cpu_accelerator(choice)
    _fill_env()
    rdzv_s = float(os.environ.get("CAT_DS_RDZV_TIMEOUT", RDZV_TIMEOUT_S))
    on_gpu = pick(torch.cuda.is_available()) == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        tune_cpu_process()
    if not torch.distributed.is_initialized():
        _join(deepspeed, "nccl" if on_gpu else "gloo", rdzv_s)
        use_timeout("train", timeout_s)
    rank = torch.distributed.get_rank()
    _abort_on_exception(rank)
    _record_hosts()
    _release_shm_segment(rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(rank, local_rank, torch.distributed.get_world_size(), device)


def _join(deepspeed, backend: str, rdzv_s: float) -> None:
    """Join the process group within `rdzv_s` (a rank that cannot reach the store, or a rank that never
    comes, fails it). Failure: one line naming the address and the variables to set, and exit."""
    env = os.environ
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=rdzv_s))
    except Exception as e:  # noqa: BLE001  (store timeout, refused connection, unknown interface, ...)
        ifnames = ", ".join(f"{k}={env[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in env)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        sys.stderr.write(
            f"cat-ds: rank {env.get('RANK')} on {socket.gethostname()}: could not join the process group at "
            f"MASTER_ADDR={env.get('MASTER_ADDR')} MASTER_PORT={env.get('MASTER_PORT')} within {rdzv_s:.0f} s "
            f"({type(e).__name__}: {first}); set MASTER_ADDR to the head node's address as this host reaches it "
            f"and GLOO_SOCKET_IFNAME (CPU) / NCCL_SOCKET_IFNAME (GPU) to the interface of the network the nodes "
            f"share ({ifnames or 'neither is set'}; CAT_DS_RDZV_TIMEOUT={rdzv_s:.0f})\n")
        sys.stderr.flush()
        os._exit(1)


def _release_shm_segment(rank: int) -> None:
    """DeepSpeed's CPU allreduce over shared memory (all ranks on one host with LOCAL_SIZE set, as the
    `deepspeed` launcher does) creates a 69 MB /dev/shm segment per rank and never unlinks it, so each
    run would keep that RAM taken until reboot. Once the group is up every rank has mapped every
    segment (init_distributed opens them all; the all-gather in _record_hosts comes after), so the
    name can go now: the memory is freed when the last rank exits, however it ends."""
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{rank}"
    with suppress(OSError):  # absent: another backend, or ranks on several hosts
        os.unlink(os.path.join("/dev/shm", name))


def use_timeout(phase: str, seconds: float | None = None) -> float:
    """Give the default group's collectives the timeout of `phase` ("setup" or "train"; its variable, else
    `seconds`, else the default). A peer whose process dies closes its sockets, which fails a collective at
    once; the timeout bounds a silent loss (a hung peer, a cut cable). Returns the seconds set."""
    var, default = TIMEOUTS[phase]
    seconds = float(os.environ.get(var) or seconds or default)
    if torch.distributed.is_initialized():
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout  # private API, hence guarded
        except ImportError:  # a torch without it: collectives keep the rendezvous timeout
            return seconds
        _set_pg_timeout(datetime.timedelta(seconds=seconds), None)
    return seconds


# ---- a lost peer ----------------------------------------------------------------------------
# gloo's words for a peer that went away mid-collective, with the peer's address: "Read error
# [10.213.9.2]:40123: Connection reset by peer", "Connection closed by peer [10.213.9.2]:40123".
_LOST_RE = re.compile(r"Connection (?:reset|closed) by peer|Read error|Write error|Broken pipe")
_PEER_RE = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")
_LOST_KEY = "cat_ds/lost_peer"
_hosts: list[tuple[str, str]] = []  # rank -> (hostname, address its collectives use)


def _own_address() -> str:
    """The address this rank's collectives use: the interface GLOO_/NCCL_SOCKET_IFNAME names, else the hostname's."""
    from cat_ds.doctor import iface_addr

    var = "NCCL_SOCKET_IFNAME" if torch.distributed.get_backend() == "nccl" else "GLOO_SOCKET_IFNAME"
    name = os.environ.get(var, "").split(",")[0]
    if name and not name.startswith(("^", "=")) and (addr := iface_addr(name)):
        return addr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "?"


def _record_hosts() -> None:
    """Every rank's host and address (one small all-gather at start): a lost peer is then named."""
    global _hosts
    world = torch.distributed.get_world_size()
    if world > 1:
        box: list = [None] * world
        torch.distributed.all_gather_object(box, (socket.gethostname(), _own_address()))
        _hosts = [tuple(h) for h in box]


@contextmanager
def exit_on_lost_peer(where):
    """Around the training loop: a collective that failed because a peer vanished (its node lost, its
    process killed) ends this rank with one line, `cat-ds: lost contact with rank 2 (node2, 10.0.0.2)
    during step 7; ...`, instead of a traceback per rank. `where()` -> (what was running, the
    checkpoint a resume continues from). Any other error passes through."""
    try:
        yield
    except RuntimeError as e:
        peer = _PEER_RE.search(str(e))
        if not (peer and _LOST_RE.search(str(e))):
            raise
        _say_lost(peer.group(1), *where())
        exit_process(1)


def _say_lost(addr: str, what: str, resume: str) -> None:
    """One line, from the lowest surviving rank. The first rank to notice names the peer for all (through
    the store): a rank that noticed only because a peer on its own host exited first would blame that host."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))  # the store's host may be the one lost
        addr = store.compare_set(_LOST_KEY, "", addr).decode() or addr
    except Exception:  # noqa: BLE001  (store unreachable: this rank's own view)
        pass
    lost = [r for r, (_, a) in enumerate(_hosts) if a == addr]
    survivors = [r for r in range(len(_hosts)) if r not in lost] or [0]
    if torch.distributed.get_rank() != min(survivors):
        return
    host = _hosts[lost[0]][0] if lost else "unknown host"
    who = (f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}") if lost else "a peer"
    sys.stderr.write(f"cat-ds: lost contact with {who} ({host}, {addr}) during {what}; the job ends, "
                     f"resume continues from {resume}\n")


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
