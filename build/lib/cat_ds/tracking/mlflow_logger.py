"""MLflow backend of the `Logger` interface. Construct it on global rank 0 only (several
ranks opening a fresh SQLite store race on its schema migration); other ranks get NullLogger.

Where runs go: `MLFLOW_TRACKING_URI` if set, else an embedded SQLite store
`sqlite:///<store_root>/mlflow.db` with artifacts under `<store_root>/mlartifacts` (no server).

Never loses data, never kills training: calls only append to a local spool (see spool.py);
a background thread pushes it to MLflow and retries every `retry_s` while the server is away.
The user is told once per outage, on stderr, and at the end what (if anything) is still
pending and how to push it: `cat-ds tracking sync <run_dir>`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from cat_ds.tracking.spool import SPOOL, STATE, Pusher, now_ms, pending_bytes, read_state

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250


def _say(msg: str) -> None:
    print(f"[cat-ds tracking] {msg}", file=sys.stderr, flush=True)


def resolve_tracking_uri(store_root: str | os.PathLike | None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if store_root is None:
        raise ValueError("no MLFLOW_TRACKING_URI and no store_root: nowhere to put the MLflow store")
    root = Path(store_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str, store_root, experiment: str) -> str | None:
    """For the embedded SQLite store, keep artifacts next to it (else MLflow picks ./mlruns
    relative to the working directory). A server decides for itself: None."""
    if not tracking_uri.startswith("sqlite:") or store_root is None:
        return None
    return (Path(store_root).resolve() / "mlartifacts" / experiment).as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}, "l": [1, 2]} -> {"a.b": "1", "l": "[1, 2]"}; values cut to MLflow's
    param length limit (with a marker, so a cut value is never mistaken for a real one)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
            continue
        s = v if isinstance(v, str) else json.dumps(v, default=str)
        if len(s) > MAX_PARAM_LEN:
            mark = "...[truncated]"
            s = s[: MAX_PARAM_LEN - len(mark)] + mark
        out[key[:MAX_KEY_LEN]] = s
    return out


def environment_params() -> dict[str, str]:
    """Package versions and the git commit of the cat-ds checkout (if it is one)."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    out = {"env.python": platform.python_version()}
    for pkg in ("cat-ds", "torch", "transformers", "deepspeed", "mlflow", "tokenizers", "datasets", "flash-attn"):
        try:
            out[f"env.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["env.git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (installed package): no commit to record
    return out


def _number(v: Any) -> float | None:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class MlflowLogger:
    """`Logger` for MLflow. `run_dir` holds the spool/state (the run's output directory);
    `store_root` is where the default SQLite store lives (shared by runs, for `compare`).
    `resume=True` continues the MLflow run recorded in `run_dir` (checkpoint resume)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        experiment: str = "cat-ds",
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        store_root: str | os.PathLike | None = None,
        tracking_uri: str | None = None,
        resume: bool = False,
        system_metrics_s: float | None = 30.0,
        retry_s: float = 5.0,
        flush_timeout_s: float = 30.0,
        log_environment: bool = True,
    ):
        # Fail fast per request (our loop retries); MLflow's default retries block for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or resolve_tracking_uri(store_root)
        self.retry_s = retry_s
        self.flush_timeout_s = flush_timeout_s
        self.history: dict[str, list[tuple[int, float]]] = {}  # for the plots at close()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()  # close(): push what is left, then end
        self._abandon = threading.Event()  # close() timed out: leave the rest to `sync`
        self._closed = False
        self._offline_since: float | None = None
        self._sys = _SystemMetrics(system_metrics_s)

        spool = self.run_dir / SPOOL
        state = read_state(self.run_dir)
        if spool.exists() and not resume:
            # A fresh run in a used dir: keep the old spool (it may hold unpushed events).
            stamp = time.strftime("%Y%m%d-%H%M%S")
            if pending_bytes(self.run_dir) > 0:
                _say(f"{spool} had events never pushed to MLflow; kept as mlflow_spool.prev-{stamp}.jsonl "
                     "(its state file alongside): push it with `cat-ds tracking sync` on a copy of this dir")
            os.replace(spool, spool.with_name(f"mlflow_spool.prev-{stamp}.jsonl"))
            if (self.run_dir / STATE).exists():
                os.replace(self.run_dir / STATE, self.run_dir / f"mlflow_state.prev-{stamp}.json")
            state = {}
        self._fh = open(spool, "a", encoding="utf-8")
        if resume and state.get("run_id"):
            self._append({"op": "resume"})  # the run continues: RUNNING again until close()
        else:
            self._append({"op": "start", "experiment": experiment, "run_name": run_name, "tracking_uri": self.tracking_uri,
                          "tags": {k: str(v) for k, v in (tags or {}).items()},
                          "artifact_root": local_artifact_root(self.tracking_uri, store_root, experiment)})
        if log_environment:
            self._append({"op": "params", "params": environment_params()})
        self._pusher = Pusher(self.run_dir, self.tracking_uri)
        self._thread = threading.Thread(target=self._loop, name="cat-ds-mlflow", daemon=True)
        self._thread.start()

    # ----- Logger interface (all O(1) for the caller: append a line, wake the pusher) -----
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._append({"op": "params", "params": flatten(params)})

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        clean = {}
        for k, v in metrics.items():
            x = _number(v)
            if x is None:
                continue  # strings etc. are not metrics
            clean[k[:MAX_KEY_LEN]] = x
            if math.isfinite(x):
                self.history.setdefault(k, []).append((int(step), x))
        if clean:
            self._append({"op": "metrics", "step": int(step), "metrics": clean})
        sysm = self._sys.sample()
        if sysm:
            self._append({"op": "metrics", "step": int(step), "metrics": sysm})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._append({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._append({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def close(self, status: str = "FINISHED", plots: bool = True) -> None:
        if self._closed:
            return
        if plots and self.history:
            try:
                from cat_ds.tracking.plots import run_plots

                for p in run_plots(self.history, self.run_dir / "plots"):
                    self.log_artifact(p, "plots")
            except Exception as exc:  # a plot must never cost the run its status
                _say(f"could not draw the run plots ({type(exc).__name__}: {exc}); metrics are unaffected")
        self._append({"op": "end", "status": status})
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(self.flush_timeout_s)
        self._abandon.set()
        self._thread.join(self.retry_s + 5)
        self._fh.close()
        left = pending_bytes(self.run_dir)
        if self._thread.is_alive() or left > 0:
            _say(f"MLflow at {self.tracking_uri} did not take everything before the end of the run; "
                 f"nothing is lost: push the rest with `cat-ds tracking sync {self.run_dir}`")

    # ----- internals -----
    @property
    def run_id(self) -> str | None:
        return read_state(self.run_dir).get("run_id")

    def _append(self, ev: dict) -> None:
        ev.setdefault("ts", now_ms())
        with self._lock:
            if self._closed:  # a caller bug, but tracking must not kill training over it
                _say(f"ignored a {ev['op']!r} call after close() (run dir {self.run_dir})")
                return
            self._fh.write(json.dumps(ev, default=str) + "\n")
            self._fh.flush()
        self._wake.set()

    def _loop(self) -> None:
        while not self._abandon.is_set():
            self._wake.clear()  # before pushing: an append during the push wakes us again
            stopping = self._stop.is_set()
            try:
                self._pusher.push()
            except Exception as exc:  # transient: server away, network, store locked
                if self._offline_since is None:
                    self._offline_since = time.time()
                    _say(f"MLflow at {self.tracking_uri} is unreachable ({type(exc).__name__}: {str(exc)[:200]}). "
                         f"Training continues; every metric is kept in {self.run_dir / SPOOL} and retried "
                         f"every {self.retry_s:g}s (or push later with `cat-ds tracking sync {self.run_dir}`).")
                self._abandon.wait(self.retry_s)
                continue
            if self._offline_since is not None:
                _say(f"MLflow at {self.tracking_uri} is reachable again; the buffered metrics were pushed")
                self._offline_since = None
            if stopping:
                return
            self._wake.wait()


class _SystemMetrics:
    """CPU/memory (and CUDA memory) every `interval_s`, when psutil is installed."""

    def __init__(self, interval_s: float | None):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil = psutil if interval_s else None
        self.interval_s = interval_s or 0.0
        self.last = 0.0

    def sample(self) -> dict[str, float]:
        if self.psutil is None or time.time() - self.last < self.interval_s:
            return {}
        self.last = time.time()
        p = self.psutil
        out = {
            "system/cpu_utilization_percentage": float(p.cpu_percent()),
            "system/system_memory_usage_percentage": float(p.virtual_memory().percent),
            "system/process_rss_megabytes": p.Process().memory_info().rss / 2**20,
        }
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["system/gpu_max_memory_allocated_megabytes"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as exc:  # CUDA state queries must not break logging
            out["system/gpu_query_failed"] = 1.0
            del exc
        return out


def infer_task(train_paths) -> str:
    """A task name for grouping runs (`compare`): the `task` of a generated set's meta.json,
    "stg_h"/"stg" from the data path, else
    the train file's directory name ("data/gsm8k/train.jsonl" -> "gsm8k")."""
    paths = [train_paths] if isinstance(train_paths, (str, os.PathLike)) else list(train_paths or [])
    if not paths:
        return "unknown"
    meta = Path(paths[0]).parent / "meta.json"  # written by `cat-ds data stg`
    if meta.is_file():
        try:
            task = json.loads(meta.read_text()).get("task")
        except (ValueError, AttributeError):
            task = None
        if isinstance(task, str) and task:
            return task
    parts = [p.lower() for p in Path(paths[0]).parts]
    for p in parts:
        if p.startswith("stg_h"):
            return "stg_h"
    for p in parts:
        if p.startswith("stg"):
            return "stg"
    return Path(paths[0]).parent.name or Path(paths[0]).stem


def run_tags(cfg) -> dict[str, str]:
    """mode (base/cat), task and seed tags from a `cat_ds.config.Config`."""
    task = getattr(cfg.tracking, "task", None) or infer_task(cfg.data.train)
    return {"mode": "cat" if cfg.cat.enabled else "base", "task": task, "seed": str(cfg.train.seed)}
