"""Start a training run's ranks on this node: the one launcher behind `cat-ds train` and `cat-ds demo`.

    rc = launch("configs/smollm2_stg.yaml", "ds_configs/zero2.json", overrides=["cat.enabled=true"])

The config, the model and data it names and the port are checked here, in one process, before
any rank starts: a `ConfigError` says which file, line or key, and what is expected. One rank runs `python -m cat_ds.train` directly (torchrun's agent would only add
~2.5 s of start-up); more ranks run under torchrun. Torch-free on purpose: it runs in the CLI.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from cat_ds.choices import MODES
from cat_ds.config import load_config
from cat_ds.engine.device import check_gpu_ready, device_choice
from cat_ds.engine.preflight import (check, check_data, check_model, check_port, check_schedule_at,
                                    threads_per_rank)


def matrix(output_dir: str | Path, modes, seeds) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for every seed x mode of one recipe: runs `<mode>_s<seed>` side by side
    under `output_dir`, so they share its MLflow store (OUTPUT_DIR/../mlflow) and `cat-ds compare`
    pairs them by mode and seed."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: expected {' and/or '.join(MODES)}, got {', '.join(bad)}")
    return [(f"{m}_s{s}", [f"cat.enabled={str(MODES[m]).lower()}", f"train.seed={s}",
                           f"output_dir={Path(output_dir) / f'{m}_s{s}'}", f"tracking.run_name={m}_s{s}"])
            for s in seeds for m in modes]


def default_nproc() -> int:
    """Number of GPUs, or 1 on CPU (one rank with every core beats two ranks with one each)."""
    if device_choice() != "cpu" and shutil.which("nvidia-smi"):  # importing torch to count no GPUs costs ~2 s
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: str | Path, ds_config: str | Path, nproc: int, overrides=(), resume: str = "none",
            master_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `nproc` ranks of `cat_ds.train`."""
    port = str(master_port or free_port())
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))  # torchrun would give each rank 1
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        cmd = [sys.executable, "-m", "cat_ds.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", port, "-m", "cat_ds.train"]
    cmd += ["--config", str(config), "--ds_config", str(ds_config), "--resume", resume]
    if overrides:
        cmd += ["--set", *overrides]
    return cmd, env


def launch(config: str | Path, ds_config: str | Path, nproc: int | None = None, overrides=(), resume: str = "none",
           master_port: int | None = None, *, log: Path | None = None,
           poll: Callable[[], None] | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Check the config, start the ranks, wait; returns the exit code. With `log`, the ranks' output
    goes to that file instead of the console, and `poll()` is called about once a second meanwhile."""
    nproc = nproc or default_nproc()
    cfg = load_config(config, list(overrides))  # raises ConfigError
    check(cfg, str(ds_config), nproc, resume)
    check_model(cfg)
    check_port(master_port)
    check_gpu_ready()  # GPUs allocated but a CPU build of torch: one line, before any rank starts
    check_schedule_at(cfg, nproc, check_data(cfg), src=str(config))  # before any rank or model
    cmd, env = command(config, ds_config, nproc, overrides, resume, master_port)
    if echo:
        echo("+ " + " ".join(cmd))
    if log is None:
        if nproc == 1:
            return subprocess.call(cmd, env=env)
        with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
            first = RankErrors(sys.stderr).feed_all(proc.stderr)
        if proc.returncode != 0 and first:
            sys.stderr.write(f"cat-ds: {first}\n")
        return proc.returncode
    with open(log, "w") as fh, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env) as proc:
        while proc.poll() is None:
            if poll:
                poll()
            time.sleep(1.0)
    return proc.returncode


class RankErrors:
    """Passes the ranks' stderr through, except the noise after a rank fails: the first failing
    rank's traceback is shown once; the other ranks' consequential errors (a peer reset the
    connection) become one line each, and torchrun's own logs and ChildFailedError report are
    dropped. Until a rank fails, everything passes through unchanged."""

    FATAL = re.compile(r"^\[rank (\d+)\] fatal: ")
    AGENT_LOG = re.compile(r"^[WEI]\d{4} \d")  # torch elastic's glog-style lines

    def __init__(self, out):
        self.out, self.first, self.block, self.rest = out, None, None, False

    def feed(self, line: str) -> None:
        m = self.FATAL.match(line)
        if m:
            self.block = m[1]
            if self.first is None:
                self.first = f"rank {m[1]} failed"
                self.out.write(line)
            else:
                self.out.write(f"[rank {m[1]}] stopped: rank {self.first.split()[1]} failed first\n")
            return
        if self.block is not None:  # inside a rank's traceback; its last line is the exception
            if self.first.startswith(f"rank {self.block} ") and self.first.endswith("failed"):
                self.out.write(line)
                if line[:1] not in (" ", "\t") and not line.startswith("Traceback") and line.strip():
                    self.first += f": {line.strip()}"
                    self.block = None
            elif line[:1] not in (" ", "\t") and not line.startswith("Traceback") and line.strip():
                self.block = None
            return
        if self.first is None:
            self.out.write(line)
        elif not (self.rest or self.AGENT_LOG.match(line)):
            if line.startswith("Traceback"):  # torchrun's ChildFailedError: the rest is its report
                self.rest = True
            else:
                self.out.write(line)
        self.out.flush()

    def feed_all(self, stream) -> str | None:
        for line in stream:
            self.feed(line)
        return self.first
