"""Run tracking: one small logger interface, backends behind it (JSONL, MLflow)."""

from cat_ds.tracking.base import JsonlLogger, Logger, MultiLogger, NullLogger

__all__ = ["Logger", "JsonlLogger", "MultiLogger", "NullLogger"]
