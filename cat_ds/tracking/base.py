"""The logger interface the engine talks to. Only global rank 0 gets a real logger;
other ranks get `NullLogger`, so "who logs" is decided once, at construction."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol


class Logger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """What non-zero ranks get: every call is a no-op."""

    def log_params(self, params):
        pass

    def log_metrics(self, step, metrics):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def close(self, status="FINISHED"):
        pass


class JsonlLogger:
    """Appends one JSON object per `log_metrics` call to `path` (e.g. metrics.jsonl).

    Lines are flushed immediately so a killed run loses nothing it logged. On resume the
    caller passes `truncate_after_step` so steps after the checkpoint are dropped and the
    file reads as if the run had never been interrupted."""

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a", encoding="utf-8")

    def log_params(self, params):
        pass  # the resolved config is saved as a file by the engine

    def log_metrics(self, step, metrics):
        self._fh.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._fh.flush()

    def log_artifact(self, path, artifact_path=None):
        pass

    def close(self, status="FINISHED"):
        if not self._fh.closed:
            self._fh.close()


class MultiLogger:
    """Fans every call out to several loggers (e.g. metrics.jsonl and MLflow)."""

    def __init__(self, *loggers: Logger):
        self.loggers = list(loggers)

    def log_params(self, params):
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, step, metrics):
        for lg in self.loggers:
            lg.log_metrics(step, metrics)

    def log_artifact(self, path, artifact_path=None):
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def close(self, status="FINISHED"):
        for lg in self.loggers:
            lg.close(status)


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so json.dumps never fails mid-run."""
    if hasattr(v, "item"):
        return v.item()
    return v


def run_logger(cfg, *, is_main: bool, start_step: int, resumed: bool) -> Logger:
    """A training run's logger: rank 0 writes OUTPUT_DIR/metrics.jsonl (cut after `start_step` on
    resume) and, with `tracking.mlflow`, the MLflow run; every other rank a NullLogger."""
    if not is_main:
        return NullLogger()
    jsonl = JsonlLogger(Path(cfg.output_dir) / "metrics.jsonl", truncate_after_step=start_step)
    if not cfg.tracking.mlflow:
        return jsonl
    from cat_ds.tracking.mlflow_logger import MlflowLogger, run_tags

    store = cfg.tracking.store_root or str(Path(cfg.output_dir).resolve().parent / "mlflow")
    mlflow = MlflowLogger(cfg.output_dir, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                          store_root=store, tracking_uri=cfg.tracking.tracking_uri, resume=resumed,
                          tags={**run_tags(cfg), "cat.enabled": cfg.cat.enabled})  # mode/task/seed: for compare
    return MultiLogger(jsonl, mlflow)
