"""`cat-ds demo --quick`: the README's main job, end to end on the real SmolLM2 through the engine."""

import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from conftest import VENV_BIN


@pytest.mark.slow
@pytest.mark.single_rank
def test_demo_quick_fine_tunes_smollm2_logs_both_modes_and_compares(tmp_path, smol_cache):
    out = tmp_path / "demo"
    env = {**os.environ, "CAT_DS_MODEL_CACHE": str(smol_cache)}
    p = subprocess.run([str(VENV_BIN / "cat-ds"), "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "fine-tuning smollm2-135m-instruct" in p.stdout
    assert "| stg | eval/ood/accuracy |" in p.stdout and "CAT − base" in p.stdout
    assert (out / "compare" / "compare.md").read_text().strip() in p.stdout
    # The masks are shown with the model's own tokenizer (SmolLM2's 49,152-token BPE).
    assert f"--tokenizer {smol_cache}" in p.stdout
    # Progress comes from the runs' metrics while they train: step counts, then an ETA.
    assert "step 1/12" in p.stdout and "demo ETA" in p.stdout, p.stdout[-3000:]
    for mode in ("base", "cat"):
        assert f"{mode} seed 0: done in" in p.stdout
        assert "[cat-ds] step 12/12 " in (out / "runs" / f"stg_M_quick_{mode}_s0.log").read_text()

    client = mlflow.MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cat-ds-demo-quick").experiment_id])
    assert sorted(r.data.tags.get("mode") for r in runs) == ["base", "cat"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["model.name_or_path"] == "smollm2-135m-instruct"
        for k in ("eval/iid/accuracy", "eval/ood/accuracy"):
            assert 0.0 <= r.data.metrics[k] <= 1.0, (k, r.data.metrics)
        assert r.data.metrics["eval/iid/n"] == 50
        # Where the answer looks, base vs CAT, logged to the run it belongs to.
        assert {"shares.png", "attention.html", "attention.json"} <= \
            {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "attention")}
    # ... and drawn by the demo: per-record PNGs, the per-field chart, the HTML page, their table.
    att = out / "compare" / "attention" / "stg_s0"
    for name in ("shares.png", "attention.html", "attention.md"):
        assert f"[demo] attention: {att / name}" in p.stdout
    table = json.loads((att / "attention.json").read_text())
    assert list(table["models"]) == ["base", "cat"] and table["problems"] == []
    assert len(table["records"]) == 8 and len(list(att.glob("record_*.png"))) == 8
    for mode in ("base", "cat"):  # the three causal values, their three twins, the two irrelevant fields
        assert {"causal", "Smoking", "Yellow fingers", "Clothing size", "Hormones", "Room size"} <= \
            set(table["summary"][mode])
    assert "Yellow fingers (twin of Smoking)" in (att / "attention.md").read_text()

    # A second demo in the same --out reuses the finished runs instead of training them again.
    t0 = time.time()
    p2 = subprocess.run([str(VENV_BIN / "cat-ds"), "demo", "--quick", "--out", str(out)],
                        capture_output=True, text=True, timeout=300, env=env)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert p2.stdout.count("finished earlier, reusing") == 2 and "| stg | eval/ood/accuracy |" in p2.stdout
    assert time.time() - t0 < 120


def test_a_failed_run_names_its_log_and_shows_its_tail(tmp_path, capsys, monkeypatch, stg_dir, bpe_tokenizer):
    # A run that fails inside its rank must stop the demo with the log's last lines, not a bare exit code.
    import click

    from cat_ds.demo import RunProgress, run_one
    from engine_helpers import write_config

    cfg = write_config(tmp_path, "run", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path)
    monkeypatch.setenv("CAT_DS_TEST_FAULTS", "raise_at=0:1")  # rank 0 raises at step 1
    log = tmp_path / "broken.log"
    with pytest.raises(click.ClickException) as err:
        run_one(cfg, [], log, RunProgress("[demo] broken", tmp_path / "run", 0, None))
    msg = err.value.format_message()
    assert f"last lines of {log}" in msg and "training failed (exit" in msg
    assert "rank 0 fails at step 1" in log.read_text() and "rank 0 fails at step 1" in msg
    assert "[demo] broken ..." in capsys.readouterr().out


def test_a_config_error_stops_the_demo_before_any_rank_starts(tmp_path):
    import click

    from cat_ds.demo import RunProgress, run_one
    from conftest import REPO

    log = tmp_path / "never.log"
    with pytest.raises(click.ClickException) as err:
        run_one(REPO / "configs" / "stg_tiny.yaml", ["train.lr=-1"], log, RunProgress("[demo] x", tmp_path, 0, None))
    assert "config error" in err.value.format_message() and "train.lr" in err.value.format_message()
    assert not log.exists()


def test_progress_reads_metrics_lines_as_they_are_written_and_projects_an_eta(tmp_path):
    import json

    from cat_ds.demo import RunProgress

    prog = RunProgress("[demo] t", tmp_path, runs_after=1, eval_s=10.0)
    prog.poll()
    assert prog.step == 0 and prog.eta() is None  # nothing written yet: no guess
    (tmp_path / "run.json").write_text(json.dumps({"total_steps": 10}))
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.0}) + "\n")
        fh.write('{"step": 3, "lo')  # half a line: read on a later poll
    prog.poll()
    assert (prog.step, prog.total, prog.metrics["loss"]) == (2, 10, 1.0)
    prog.t_first, prog.t_last_step, prog.t0 = 100.0, 102.0, 90.0  # 2 s per step, 10 s to the first step
    # this run: 8 steps x 2 s + 10 s eval; one more run: 10 s start + 10 x 2 s + 10 s eval
    assert prog.eta() == pytest.approx(26.0 + 40.0)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('ss": 0.5}\n' + json.dumps({"step": 10, "eval/iid/accuracy": 0.75}) + "\n")
    prog.poll()
    assert prog.step == 3 and prog.metrics["eval/iid/accuracy"] == 0.75


def test_a_log_tail_shows_the_last_frame_of_each_progress_line(tmp_path):
    from cat_ds.demo import log_tail

    log = tmp_path / "run.log"
    log.write_bytes(b"start\n\rtokenise 10%\rtokenise 100%\r\n[cat-ds] step 1/2\r\nboom: bad \xff byte\n")
    assert log_tail(log) == "start\ntokenise 100%\n[cat-ds] step 1/2\nboom: bad \ufffd byte"
    assert log_tail(log, n=2) == "[cat-ds] step 1/2\nboom: bad \ufffd byte"
