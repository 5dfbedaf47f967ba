"""`cat-ds demo --quick`: the README's main job, end to end through the real engine."""

import subprocess

import mlflow
import pytest

from conftest import VENV_BIN


@pytest.mark.slow
def test_demo_quick_logs_both_modes_and_compares(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([str(VENV_BIN / "cat-ds"), "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| stg | eval/ood/accuracy |" in p.stdout and "CAT − base" in p.stdout
    assert (out / "compare" / "compare.md").read_text().strip() in p.stdout
    assert (out / "compare" / "compare.png").stat().st_size > 1000
    # Progress is visible while the engine runs: the trainer's step lines reach the console.
    assert "    step 8/8 (100%) loss" in p.stdout and p.stdout.count("    step 12/12 (100%) loss") == 2, p.stdout[-3000:]
    # Each run's log is its raw output: progress-bar frames keep their "\r" instead of becoming a line each.
    with open(out / "runs" / "pretrain_quick.log", newline="") as fh:
        raw = fh.read()
    assert "[cat-ds] step 8/8 " in raw and "\r" in raw

    client = mlflow.MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cat-ds-demo")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("mode") for r in runs) == ["base", "cat"]
    for r in runs:
        assert r.info.status == "FINISHED"
        for k in ("eval/iid/accuracy", "eval/ood/accuracy"):
            assert 0.0 <= r.data.metrics[k] <= 1.0, (k, r.data.metrics)
        assert r.data.metrics["eval/iid/n"] == 40

    # The labels stay whole tokens: a tokenizer fed mostly pre-training text split " Low" into
    # " L" "o" "w", and CAT gained nothing from it (docs/demo_recipe.md, "Tokenizer").
    from cat_ds.data.tokenizers import load_tokenizer

    tok = load_tokenizer(out / "data" / "stg_M" / "tokenizer")
    for label in (" Low Risk", " High Risk"):
        assert len(tok.tokenize(label)) == 2, tok.tokenize(label)


def test_demo_refuses_an_out_dir_from_the_earlier_tokenizer(tmp_path):
    # An earlier demo's tokenizer split the labels; reusing it (and the models trained with it)
    # would silently reproduce the old results: refuse, and say what to do.
    tok = tmp_path / "demo" / "data" / "stg_M" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    p = subprocess.run([str(VENV_BIN / "cat-ds"), "demo", "--quick", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "earlier cat-ds demo" in p.stderr and "pass a fresh --out" in p.stderr, p.stderr[-2000:]


def test_a_failed_run_names_its_log_and_shows_its_tail(tmp_path, capsys):
    # A run that fails must stop the demo with the log's last lines, not a bare exit code.
    import click

    from cat_ds.demo import RunProgress, run_training

    log = tmp_path / "broken.log"
    with pytest.raises(click.ClickException) as err:
        run_training(tmp_path / "no_such_config.yaml", [], 1, log, RunProgress("[demo] broken"))
    msg = err.value.format_message()
    assert f"last lines of {log}" in msg and "training failed (exit" in msg
    assert "no_such_config.yaml" in log.read_text() and "no_such_config.yaml" in msg
    assert "[demo] broken ..." in capsys.readouterr().out


def test_a_log_tail_shows_the_last_frame_of_each_progress_line(tmp_path):
    from cat_ds.demo import log_tail

    log = tmp_path / "run.log"
    log.write_bytes(b"start\n\rtokenise 10%\rtokenise 100%\r\n[cat-ds] step 1/2\r\nboom: bad \xff byte\n")
    assert log_tail(log) == "start\ntokenise 100%\n[cat-ds] step 1/2\nboom: bad \ufffd byte"
    assert log_tail(log, n=2) == "[cat-ds] step 1/2\nboom: bad \ufffd byte"


def test_demo_refuses_an_out_dir_pretrained_with_another_model_shape(tmp_path):
    # Its fine-tuning runs would resume (--resume auto) from checkpoints of the other shape.
    import json

    from conftest import REPO

    out = tmp_path / "demo"
    export = out / "runs" / "pretrain_quick" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text((REPO / "configs" / "models" / "demo_llama.json").read_text())
    wide = REPO / "configs" / "models" / "demo_llama_wide.json"
    p = subprocess.run([str(VENV_BIN / "cat-ds"), "demo", "--quick", "--out", str(out), "--model-config", str(wide)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "another model shape (hidden_size 128" in p.stderr and "pass a fresh --out" in p.stderr, p.stderr[-2000:]
    assert json.loads(wide.read_text())["hidden_size"] == 256
