"""Write-ahead spool for MLflow: nothing logged is ever lost, and nothing blocks training.

Every logger call is first appended (one JSON line, flushed) to `<run_dir>/mlflow_spool.jsonl`;
a `Pusher` replays the lines to MLflow in order and records how far it got (a byte offset)
in `<run_dir>/mlflow_state.json`, written atomically after each successful push. So:
- server down at start or mid-run: lines accumulate, the pusher retries, nothing is lost;
- process killed: the next `Pusher` (same run dir) continues where the offset says;
- `cat-ds tracking sync RUN_DIR` is just a `Pusher` run to completion, after the fact.

A push interrupted after the server stored it but before the offset was written is replayed:
MLflow then holds that metric step twice with the same value (history only; the value is
the same). Params are idempotent. Events MLflow *rejects* (4xx, e.g. a param re-logged with
another value) are written to `mlflow_rejected.jsonl` and skipped, never retried forever.

Event lines: {"op": "start", experiment, run_name, tags, artifact_root?}, {"op": "params",
params}, {"op": "metrics", step, ts, metrics}, {"op": "artifact", path, artifact_path},
{"op": "tags", tags}, {"op": "resume"} (a resumed run is RUNNING again), {"op": "end", status}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

SPOOL = "mlflow_spool.jsonl"
STATE = "mlflow_state.json"
REJECTED = "mlflow_rejected.jsonl"

# Error codes that mean "this request will never succeed": skip it, do not retry.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
              "MALFORMED_REQUEST", "PERMISSION_DENIED"}
_MAX_METRICS = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_MAX_PARAMS = 100  # MAX_PARAMS_TAGS_PER_BATCH


def is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True  # an artifact deleted before it could be uploaded: retrying cannot help
    code = getattr(exc, "error_code", None)
    return code in _PERMANENT


def read_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(run_dir) / STATE
    return json.loads(p.read_text()) if p.exists() else {}


def write_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    p = Path(run_dir) / STATE
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, p)  # atomic: a kill never leaves half a state file


def pending_bytes(run_dir: str | os.PathLike) -> int:
    spool = Path(run_dir) / SPOOL
    if not spool.exists():
        return 0
    return spool.stat().st_size - int(read_state(run_dir).get("offset", 0))


class Pusher:
    """Replays a run dir's spool to MLflow. Not thread-safe: one pusher per run dir."""

    def __init__(self, run_dir: str | os.PathLike, tracking_uri: str):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.state = read_state(self.run_dir)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def _read_pending(self) -> list[tuple[int, dict]]:
        """(end offset, event) for every complete line after the pushed offset."""
        spool = self.run_dir / SPOOL
        if not spool.exists():
            return []
        offset = int(self.state.get("offset", 0))
        with open(spool, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        out, pos = [], offset
        for line in data.split(b"\n")[:-1]:  # the part after the last "\n" is incomplete
            pos += len(line) + 1
            if line.strip():
                out.append((pos, json.loads(line)))
        return out

    def push(self) -> int:
        """Push every complete pending event; return how many. Raises on transient errors
        (the offset then says what is still pending); skips permanently rejected events."""
        events = self._read_pending()
        done = 0
        i = 0
        while i < len(events):
            end, ev = events[i]
            j = i + 1
            if ev["op"] == "metrics":  # coalesce consecutive metric events into one log_batch
                n = len(ev["metrics"])
                while j < len(events) and events[j][1]["op"] == "metrics" and n + len(events[j][1]["metrics"]) <= _MAX_METRICS:
                    n += len(events[j][1]["metrics"])
                    j += 1
                end = events[j - 1][0]
            try:
                self._apply([e for _, e in events[i:j]])
            except Exception as exc:
                if not is_permanent(exc):
                    raise
                with open(self.run_dir / REJECTED, "a", encoding="utf-8") as fh:
                    for _, e in events[i:j]:
                        fh.write(json.dumps({"error": str(exc)[:500], "event": e}) + "\n")
            self.state["offset"] = end
            write_state(self.run_dir, self.state)
            done += j - i
            i = j
        return done

    def _apply(self, evs: list[dict]) -> None:
        op = evs[0]["op"]
        if op == "start":
            self._start(evs[0])
            return
        if self.run_id is None:
            raise RuntimeError(f"{self.run_dir / SPOOL}: events before the 'start' event")
        c = self.client
        if op == "metrics":
            from mlflow.entities import Metric

            ms = [Metric(k, float(v), int(e["ts"]), int(e["step"])) for e in evs for k, v in e["metrics"].items()]
            c.log_batch(self.run_id, metrics=ms, synchronous=True)
        elif op == "params":
            from mlflow.entities import Param

            items = [Param(k, str(v)) for k, v in evs[0]["params"].items()]
            for s in range(0, len(items), _MAX_PARAMS):
                c.log_batch(self.run_id, params=items[s:s + _MAX_PARAMS], synchronous=True)
        elif op == "tags":
            from mlflow.entities import RunTag

            c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in evs[0]["tags"].items()], synchronous=True)
        elif op == "artifact":
            path = Path(evs[0]["path"])
            if not path.exists():
                raise FileNotFoundError(f"artifact {path} no longer exists; it cannot be uploaded")
            if path.is_dir():
                c.log_artifacts(self.run_id, str(path), evs[0].get("artifact_path"))
            else:
                c.log_artifact(self.run_id, str(path), evs[0].get("artifact_path"))
        elif op == "resume":
            c.update_run(self.run_id, status="RUNNING")
        elif op == "end":
            c.set_terminated(self.run_id, status=evs[0]["status"], end_time=int(evs[0]["ts"]))
        else:
            raise ValueError(f"{self.run_dir / SPOOL}: unknown event op {op!r}")

    def _start(self, ev: dict) -> None:
        if self.run_id is not None:
            return  # the run already exists (resumed run, or a replay after a kill)
        c = self.client
        exp = c.get_experiment_by_name(ev["experiment"])
        if exp is None:
            kw = {"artifact_location": ev["artifact_root"]} if ev.get("artifact_root") else {}
            try:
                exp_id = c.create_experiment(ev["experiment"], **kw)
            except Exception as exc:  # created concurrently by another run: use that one
                if not is_permanent(exc):
                    raise
                exp_id = c.get_experiment_by_name(ev["experiment"]).experiment_id
        else:
            exp_id = exp.experiment_id
        run = c.create_run(exp_id, start_time=int(ev["ts"]), tags=ev.get("tags") or {}, run_name=ev.get("run_name"))
        self.state.update(run_id=run.info.run_id, experiment_id=exp_id, tracking_uri=self.tracking_uri)
        write_state(self.run_dir, self.state)


def now_ms() -> int:
    return int(time.time() * 1000)


def spool_tracking_uri(run_dir: str | os.PathLike) -> str | None:
    """The URI a run dir was logging to: its state, else its spool's start event."""
    uri = read_state(run_dir).get("tracking_uri")
    spool = Path(run_dir) / SPOOL
    if uri is None and spool.exists():
        with open(spool, encoding="utf-8") as fh:
            first = fh.readline()
        if first.strip():
            uri = json.loads(first).get("tracking_uri")
    return uri


def sync(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> tuple[int, str | None]:
    """Push everything a run dir's spool still holds (`cat-ds tracking sync`). Returns
    (events pushed, run id). Raises if the server is still unreachable (nothing is lost)."""
    run_dir = Path(run_dir)
    if not (run_dir / SPOOL).exists():
        raise FileNotFoundError(f"{run_dir / SPOOL}: no MLflow spool here (is this a cat-ds run directory?)")
    uri = tracking_uri or spool_tracking_uri(run_dir) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"{run_dir}: no tracking URI recorded; pass --tracking-uri")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    pusher = Pusher(run_dir, uri)
    return pusher.push(), pusher.run_id
