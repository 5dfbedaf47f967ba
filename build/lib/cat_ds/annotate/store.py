"""Input reading, stable record ids, and the append-only output that makes runs resumable.

A record's id is its `id` field, else its `idx` field, else a hash of input + target. Ids
are counted, not just collected: if the input holds the same id n times (identical
records), its first k occurrences are done when the output holds it k times. Output lines
are written whole, each in one unbuffered append, so a killed run leaves at most one torn
last line; `load_done` cuts it off before the rerun appends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from cat_ds.data.records import load_records, normalize_target


def read_raw_records(path: str | Path) -> list[dict[str, Any]]:
    """The input objects exactly as written (key order, number targets), after the
    project's loader has validated them (its errors name file, line and field)."""
    n = len(load_records(path))
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        raw = json.loads(text)
    else:
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    if len(raw) != n:  # both readers see the same file; a mismatch is a bug, not bad data
        raise RuntimeError(f"{path}: read {len(raw)} objects but the loader saw {n} records")
    return raw


def record_id(obj: dict[str, Any]) -> str:
    for field in ("id", "idx"):
        if obj.get(field) is not None:
            return f"{field}:{json.dumps(obj[field], sort_keys=True, ensure_ascii=False)}"
    target = normalize_target(obj.get("target"), "")
    payload = json.dumps([obj.get("input"), target], ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()[:24]


def load_done(out_path: str | Path) -> tuple[Counter, int]:
    """Ids already in the output (with multiplicity), and how many torn bytes were cut."""
    path = Path(out_path)
    if not path.exists():
        return Counter(), 0
    data = path.read_bytes()
    cut = 0
    if data and not data.endswith(b"\n"):
        # A run killed mid-write: drop the partial last line, it is redone.
        keep = data.rfind(b"\n") + 1
        cut = len(data) - keep
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    done: Counter = Counter()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno}: existing output line is not valid JSON ({e.msg}); "
                "fix or remove it before resuming"
            ) from None
        done[record_id(obj)] += 1
    return done, cut


def pending_indices(raw: list[dict[str, Any]], done: Counter) -> tuple[list[int], list[str]]:
    """Indices of records still to annotate, and every record's id."""
    ids = [record_id(o) for o in raw]
    seen: Counter = Counter()
    todo = []
    for i, rid in enumerate(ids):
        seen[rid] += 1
        if seen[rid] > done.get(rid, 0):
            todo.append(i)
    return todo, ids


class OutputLocked(RuntimeError):
    pass


class JsonlAppender:
    """One JSON object per line, each line one unbuffered write (flushed per record).

    With `lock`, an exclusive advisory lock is held while open, so two runs can never
    interleave lines in one file (the OS drops it when the process dies, even on SIGKILL)."""

    def __init__(self, path: str | Path, mode: str = "ab", lock: bool = False):
        self._fh = open(path, mode, buffering=0)
        if lock:
            import fcntl

            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._fh.close()
                raise OutputLocked(f"{path}: another process (a second cat-ds annotate?) is writing this file") from None

    def write(self, obj: dict[str, Any]) -> None:
        data = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        while data:
            n = self._fh.write(data)
            data = data[n:]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_rejects_path(out_path: str | Path) -> Path:
    p = Path(out_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".rejects.jsonl")


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False
