"""`cat-ds compare` on runs made here (base and CAT, two seeds, two tasks), logged through the
real MlflowLogger, read back from the local SQLite store and from a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cat_ds.tracking.mlflow_logger import MlflowLogger
from tracking_helpers import MlflowServer

CAT_DS = str(Path(sys.executable).parent / "cat-ds")

# (task, mode, seed) -> (iid, ood)
RUNS = {
    ("stg", "base", 0): (0.60, 0.50), ("stg", "base", 1): (0.70, 0.40),
    ("stg", "cat", 0): (0.80, 0.90), ("stg", "cat", 1): (0.90, 0.70),
    ("stg_h", "base", 0): (0.25, 0.20), ("stg_h", "cat", 0): (0.50, 0.55),
}


def _make_runs(tmp_path, **where):
    for (task, mode, seed), (iid, ood) in RUNS.items():
        lg = MlflowLogger(tmp_path / f"{task}_{mode}_{seed}", experiment="cmp", tags={"task": task, "mode": mode, "seed": seed},
                          system_metrics_s=None, log_environment=False, **where)
        for step in (10, 20):  # the last value counts: the first one is a decoy
            scale = 0.5 if step == 10 else 1.0
            lg.log_metrics(step, {"eval/iid/accuracy": iid * scale, "eval/ood/accuracy": ood * scale})
        lg.close(plots=False)
    # A failed run must not count.
    lg = MlflowLogger(tmp_path / "failed", experiment="cmp", tags={"task": "stg", "mode": "cat", "seed": 2},
                      system_metrics_s=None, log_environment=False, **where)
    lg.log_metrics(5, {"eval/iid/accuracy": 0.0, "eval/ood/accuracy": 0.0})
    lg.close("FAILED", plots=False)


def _compare(args, env=None):
    proc = subprocess.run([CAT_DS, "compare", "--experiment", "cmp", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _check(out: str):
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in out.splitlines() if line.startswith("| stg")}
    iid = lines[("stg", "eval/iid/accuracy")]
    assert "65.00 ± 7.07 (n=2)" in iid and "85.00 ± 7.07 (n=2)" in iid and "+20.00" in iid
    ood = lines[("stg", "eval/ood/accuracy")]
    assert "45.00 ± 7.07 (n=2)" in ood and "80.00 ± 14.14 (n=2)" in ood and "+35.00" in ood
    h = lines[("stg_h", "eval/ood/accuracy")]
    assert "20.00 ± - (n=1)" in h and "55.00 ± - (n=1)" in h and "+35.00" in h
    header = out.splitlines()[0]
    assert header.index("base") < header.index("cat")


def test_compare_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "runs"
    _make_runs(tmp_path, store_root=root)
    out = _compare(["--store-root", str(root), "--out", str(tmp_path / "cmp")], env={"MLFLOW_TRACKING_URI": ""})
    _check(out)
    assert out == (tmp_path / "cmp" / "compare.md").read_text() + "\n"  # the same table, as a file
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # One metric only, and explicit run ids.
    one = _compare(["--store-root", str(root), "--metric", "eval/ood/accuracy"], env={"MLFLOW_TRACKING_URI": ""})
    assert "eval/iid/accuracy" not in one and "80.00 ± 14.14" in one
    bad = subprocess.run([CAT_DS, "compare", "--store-root", str(root), "--experiment", "nope"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert bad.returncode != 0 and "no experiment named 'nope'" in bad.stderr


@pytest.mark.slow
def test_compare_against_server(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        _make_runs(tmp_path, tracking_uri=server.uri)
        _check(_compare(["--tracking-uri", server.uri]))
        _check(_compare([], env={"MLFLOW_TRACKING_URI": server.uri}))
    finally:
        server.kill()
