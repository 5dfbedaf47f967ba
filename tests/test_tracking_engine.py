"""Engine-level tracking: a real 2-rank ZeRO-3 training run (torchrun, gloo) logging to a real
`mlflow server` that is SIGKILLed mid-run and restarted. Training must finish, tell the user
once, and the run must end up complete: every step's metrics, IID/OOD eval metrics, the
probe's per-layer attention ratio, params (config + ds_config), tags, artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cat_ds.tracking.spool import SPOOL, pending_bytes, read_state
from tracking_helpers import MlflowServer, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 60


def _spool_steps(run_dir: Path) -> int:
    p = run_dir / SPOOL
    if not p.exists():
        return 0
    return sum('"loss"' in line for line in p.read_text().splitlines())


@pytest.mark.slow
def test_training_survives_mlflow_server_kill(tmp_path):
    from cat_ds.data.stg import write_stg

    write_stg(tmp_path / "data", task="stg", train_size=64, seed=0, test_size=8)
    out = tmp_path / "runs" / "cat"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""output_dir: {out}
model:
  config: {REPO / 'configs/models/tiny_llama.json'}
  tokenizer: {tmp_path / 'tok'}
  train_tokenizer: bpe
data:
  train: {tmp_path / 'data/train.jsonl'}
  eval:
    iid: {tmp_path / 'data/test_iid.jsonl'}
    ood: {tmp_path / 'data/test_ood.jsonl'}
  max_length: 128
train:
  micro_batch_size: 8
  grad_accum: 1
  lr: 3.0e-3
  max_steps: {STEPS}
  log_every: 10
  export: false
cat:
  enabled: true
eval:
  every: 30
  batch_size: 8
  best_metric: eval/ood/accuracy
tracking:
  mlflow: true
  experiment: engine
""")
    server = MlflowServer(tmp_path / "server").start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                             "--master_port", str(free_port()), "-m", "cat_ds.train", "--config", str(cfg),
                             "--ds_config", str(REPO / "ds_configs/zero3.json")],
                            cwd=tmp_path, env=env, stdout=open(tmp_path / "train.log", "w"), stderr=subprocess.STDOUT)
    # (a file, not a pipe: an unread pipe fills up and blocks the training processes)
    try:
        deadline = time.time() + 400
        client = MlflowClient(server.uri)
        killed_at = None
        while proc.poll() is None and time.time() < deadline:
            run_id = read_state(out).get("run_id") if out.exists() else None
            if killed_at is None and run_id and len(client.get_metric_history(run_id, "loss")) >= 3:
                server.kill()
                killed_at = _spool_steps(out)
            if killed_at is not None and server.proc is None and _spool_steps(out) >= killed_at + 5:
                server.start()  # training went on while the server was away
            time.sleep(0.3)
        proc.wait(timeout=max(1, deadline - time.time()))
        log = (tmp_path / "train.log").read_text()
        assert proc.returncode == 0, log[-6000:]
        assert killed_at is not None and killed_at < STEPS, "the server was never killed mid-run"
        assert log.count("is unreachable") == 1, log[-4000:]
        if server.proc is None:
            server.start()
        if pending_bytes(out) > 0:  # the run ended before the pusher caught up: the documented path
            sync = subprocess.run([str(BIN / "cat-ds"), "tracking", "sync", str(out)], capture_output=True, text=True,
                                  timeout=120)
            assert sync.returncode == 0, sync.stderr
        run = client.get_run(read_state(out)["run_id"])
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["mode"] == "cat" and run.data.tags["task"] == "stg" and run.data.tags["seed"] == "0"
        for key in ("loss", "lm_loss", "cat_loss", "lr", "grad_norm", "tokens_per_s", "attn_ratio"):
            assert sorted({m.step for m in client.get_metric_history(rid, key)}) == list(range(1, STEPS + 1)), key
        for key in ("eval/iid/accuracy", "eval/ood/accuracy", "eval/ood/n", "probe/attn_ratio/layer_3"):
            assert sorted(m.step for m in client.get_metric_history(rid, key)) == [30, 60], key
        assert run.data.metrics["eval/ood/n"] == 8
        assert run.data.params["cat.enabled"] == "true" and run.data.params["ds_config.zero_optimization.stage"] == "3"
        assert "env.torch" in run.data.params
        arts = set()
        for d in ("config", "plots", "predictions/step_60"):
            arts |= {a.path for a in client.list_artifacts(rid, d)}
        assert {"config/config.yaml", "config/ds_config.json", "plots/loss.png", "plots/attention_ratio_layers.png",
                "plots/eval_accuracy.png", "predictions/step_60/iid.jsonl", "predictions/step_60/ood.jsonl"} <= arts
        local = client.download_artifacts(rid, "predictions/step_60/ood.jsonl", str(tmp_path / "dl"))
        lines = [json.loads(x) for x in Path(local).read_text().splitlines()]
        assert len(lines) == 8 and sum(x["correct"] for x in lines) == run.data.metrics["eval/ood/correct"]
        # Best checkpoint by eval/ood/accuracy: one kept, from the first eval reaching the max.
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, "eval/ood/accuracy"))
        best_step = max(hist, key=lambda sv: (sv[1], -sv[0]))[0]
        best_root = out / "best" / "checkpoints"
        tags = [d.name for d in best_root.iterdir() if d.is_dir()]
        assert tags == [f"step_{best_step:08d}"], (tags, hist)
        state = json.loads((best_root / tags[0] / "client_state.json").read_text())
        assert state["step"] == best_step and (best_root / tags[0] / "hf" / "config.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.kill()
