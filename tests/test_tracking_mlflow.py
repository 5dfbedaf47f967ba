"""MLflow tracking against a real `mlflow server` subprocess and the embedded SQLite store:
params/metrics/artifacts read back by the client; the server killed mid-run and restarted
loses no metric step; a server unreachable at start is caught up by `cat-ds tracking sync`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cat_ds.tracking.mlflow_logger import MlflowLogger, flatten, resolve_tracking_uri
from cat_ds.tracking.spool import SPOOL, pending_bytes
from tracking_helpers import MlflowServer

CAT_DS = str(Path(sys.executable).parent / "cat-ds")


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _train_like(logger, steps, on_step=None, sleep=0.0):
    """A simulated training loop making the engine's real calls; returns the slowest call."""
    slowest = 0.0
    for s in steps:
        t = time.perf_counter()
        logger.log_metrics(s, {"train/loss": 1.0 / s, "train/cat_loss": 0.1 / s, "train/lr": 1e-3,
                               "train/attn_ratio": 0.5 + s / 100})
        slowest = max(slowest, time.perf_counter() - t)
        if on_step:
            on_step(s)
        time.sleep(sleep)
    return slowest


def test_flatten_and_param_limit():
    flat = flatten({"model": {"name": "m", "layers": [0, 1]}, "ds": {"zero_optimization": {"stage": 3}},
                    "big": "x" * 7000, "none": None, "empty": {}})
    assert flat["model.name"] == "m" and flat["model.layers"] == "[0, 1]"
    assert flat["ds.zero_optimization.stage"] == "3" and flat["none"] == "null" and flat["empty"] == "{}"
    assert len(flat["big"]) == 6000 and flat["big"].endswith("...[truncated]")


def test_default_store_is_local_sqlite_under_root(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "runs"
    assert resolve_tracking_uri(root) == f"sqlite:///{root.resolve()}/mlflow.db"
    cfg = tmp_path / "resolved.yaml"
    cfg.write_text("model: tiny\n")
    lg = MlflowLogger(tmp_path / "run", experiment="local", run_name="r", store_root=root,
                      tags={"mode": "base", "task": "stg", "seed": 1}, system_metrics_s=0.01)
    lg.log_params({"train": {"lr": 1e-3}, "ds_config": {"zero_optimization": {"stage": 3}}})
    _train_like(lg, range(1, 6))
    lg.log_metrics(5, {"eval/iid/accuracy": 0.75, "eval/iid/n": 8})
    lg.log_artifact(cfg, "config")
    lg.close()
    client = MlflowClient(f"sqlite:///{root.resolve()}/mlflow.db")
    run = client.get_run(lg.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "base" and run.data.tags["seed"] == "1"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["ds_config.zero_optimization.stage"] == "3"
    assert "env.torch" in run.data.params and "env.transformers" in run.data.params
    assert _steps(client, lg.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert run.data.metrics["eval/iid/accuracy"] == 0.75
    assert any(k.startswith("system/") for k in run.data.metrics)  # psutil is installed here
    arts = {a.path for a in client.list_artifacts(lg.run_id, "plots")}
    assert {"plots/loss.png", "plots/attention_ratio.png", "plots/eval_accuracy.png"} <= arts
    # Artifacts live under the root, not in ./mlruns of whatever the working directory was.
    assert run.info.artifact_uri.startswith((root.resolve() / "mlartifacts").as_uri())
    assert (root / "mlartifacts" / "local" / lg.run_id / "artifacts" / "config" / "resolved.yaml").exists()
    assert "unreachable" not in capsys.readouterr().err


@pytest.mark.slow
def test_server_killed_mid_run_loses_no_step(tmp_path, capsys):
    server = MlflowServer(tmp_path / "server").start()
    try:
        pred = tmp_path / "predictions_iid.jsonl"
        pred.write_text(json.dumps({"input": "x", "target": "y", "prediction": "y", "correct": True}) + "\n")
        lg = MlflowLogger(tmp_path / "run", experiment="resilience", run_name="killed",
                          tracking_uri=server.uri, tags={"mode": "cat", "task": "stg", "seed": 0}, retry_s=0.5,
                          flush_timeout_s=60)
        lg.log_params({"train": {"lr": 0.001, "steps": 60}})

        def chaos(step):
            if step == 20:
                while pending_bytes(lg.run_dir) > 0:  # the first 20 steps reached the server
                    time.sleep(0.1)
                server.kill()
            if step == 40:
                server.start()

        slowest = _train_like(lg, range(1, 61), on_step=chaos, sleep=0.02)
        lg.log_metrics(60, {"eval/iid/accuracy": 0.5, "eval/ood/accuracy": 0.25})
        lg.log_artifact(pred, "predictions")
        lg.close()
        err = capsys.readouterr().err
        assert err.count("is unreachable") == 1, err  # told once, clearly
        assert "Training continues" in err and "cat-ds tracking sync" in err
        assert err.count("reachable again") == 1
        assert pending_bytes(lg.run_dir) == 0
        # Logging never waited on the dead server (the engine's step is not slowed down).
        assert slowest < 0.5, slowest

        client = MlflowClient(server.uri)
        run = client.get_run(lg.run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/cat_loss", "train/lr", "train/attn_ratio"):
            assert set(_steps(client, lg.run_id, key)) == set(range(1, 61)), key
        hist = {m.step: m.value for m in client.get_metric_history(lg.run_id, "train/loss")}
        assert hist[33] == pytest.approx(1 / 33)
        assert run.data.params["train.lr"] == "0.001"
        assert run.data.metrics["eval/ood/accuracy"] == 0.25
        local = tmp_path / "dl"
        got = client.download_artifacts(lg.run_id, "predictions/predictions_iid.jsonl", str(local))
        assert Path(got).read_text() == pred.read_text()
        assert "plots/loss.png" in {a.path for a in client.list_artifacts(lg.run_id, "plots")}
    finally:
        server.kill()


@pytest.mark.slow
def test_server_down_at_start_then_tracking_sync(tmp_path, capsys):
    server = MlflowServer(tmp_path / "server")  # not started: nothing listens on the port
    lg = MlflowLogger(tmp_path / "run", experiment="late", run_name="offline", tracking_uri=server.uri,
                      tags={"mode": "base", "task": "stg", "seed": 3}, retry_s=0.5, flush_timeout_s=2)
    lg.log_params({"seed": 3})
    slowest = _train_like(lg, range(1, 31))
    lg.close()
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and f"cat-ds tracking sync {tmp_path / 'run'}" in err
    assert lg.run_id is None and pending_bytes(lg.run_dir) > 0
    assert slowest < 0.5
    spool = (tmp_path / "run" / SPOOL).read_text().splitlines()
    assert sum(json.loads(x)["op"] == "metrics" for x in spool) >= 30

    # Still down: sync fails clearly and keeps everything.
    bad = subprocess.run([CAT_DS, "tracking", "sync", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "run" in bad.stderr
    assert pending_bytes(tmp_path / "run") > 0

    server.start()
    try:
        ok = subprocess.run([CAT_DS, "tracking", "sync", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert "pushed" in ok.stdout
        run_id = json.loads((tmp_path / "run" / "mlflow_state.json").read_text())["run_id"]
        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["seed"] == "3"
        assert run.info.run_name == "offline"
        assert _steps(client, run_id, "train/loss") == list(range(1, 31))
        # A second sync has nothing left to do and duplicates nothing.
        again = subprocess.run([CAT_DS, "tracking", "sync", str(tmp_path / "run")], capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and "pushed 0 event" in again.stdout
        assert _steps(client, run_id, "train/loss") == list(range(1, 31))
    finally:
        server.kill()


def test_resume_continues_the_same_run_and_fresh_start_makes_a_new_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, run_dir = tmp_path / "store", tmp_path / "run"
    kw = dict(experiment="resume", store_root=root, system_metrics_s=None, log_environment=False)
    first = MlflowLogger(run_dir, **kw)
    _train_like(first, range(1, 6))
    first.close("FAILED", plots=False)  # what the engine's `finally` does when a run dies
    run_id = first.run_id  # (the property reads the run dir's state file: capture it now)
    second = MlflowLogger(run_dir, resume=True, **kw)  # --resume auto from the step-5 checkpoint
    assert second.run_id == run_id
    _train_like(second, range(6, 11))
    second.close(plots=False)
    client = MlflowClient(resolve_tracking_uri(root))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id, "train/loss") == list(range(1, 11))
    third = MlflowLogger(run_dir, **kw)  # not a resume: a new run; the old spool is kept aside
    third.log_metrics(1, {"train/loss": 9.0})
    third.close(plots=False)
    assert third.run_id != run_id
    assert len(list(run_dir.glob("mlflow_spool.prev-*.jsonl"))) == 1
    exp = client.get_experiment_by_name("resume").experiment_id
    assert len(client.search_runs([exp])) == 2
