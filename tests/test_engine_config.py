"""Run configs: strict typed loading, --set overrides, ds_config "auto" filling and batch
arithmetic, and clear errors before any model is loaded. Fast (no DeepSpeed run)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cat_ds.config import ConfigError, load_config
from cat_ds.engine.ds_config import fill_ds_config, load_ds_config, unresolved_auto

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
output_dir: runs/x
model:
  config: configs/models/tiny_llama.json
  tokenizer: tok/
data:
  train: data/x.jsonl
train:
  micro_batch_size: 4
  grad_accum: 2
  lr: 1e-4
cat:
  enabled: true
  heads: 2
"""


def _write(tmp_path, text, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_types_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["train.lr=3e-4", "cat.layers=last 2", "data.eval.iid=a.jsonl",
                                              "train.max_steps=7", "cat.granularity=layer"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML "1e-4"-style strings coerced
    assert cfg.train.max_steps == 7 and cfg.cat.heads == 2 and cfg.cat.layers == "last 2"
    assert cfg.data.train == ["data/x.jsonl"] and cfg.data.eval == {"iid": "a.jsonl"}
    assert cfg.cat.granularity == "layer" and load_config(_write(tmp_path, GOOD, "d.yaml")).cat.granularity == "all"


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = _write(tmp_path, GOOD.replace("  lr: 1e-4", "  lr: 1e-4\n  learning_rate: 1e-4"))
    with pytest.raises(ConfigError, match=r"c\.yaml:11: unknown key 'train\.learning_rate'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'cat\.head'"):
        load_config(_write(tmp_path, GOOD, "d.yaml"), ["cat.head=3"])


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, GOOD.replace("micro_batch_size: 4", "micro_batch_size: four"))
    with pytest.raises(ConfigError, match=r"c\.yaml:8: train\.micro_batch_size: expected an integer, got 'four'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"cat\.enabled: expected a boolean"):
        load_config(_write(tmp_path, GOOD, "d.yaml"), ["cat.enabled=maybe"])
    with pytest.raises(ConfigError, match=r"cat\.normalization: expected one of micro, global"):
        load_config(_write(tmp_path, GOOD, "e.yaml"), ["cat.normalization=macro"])
    with pytest.raises(ConfigError, match=r"cat\.granularity: expected one of all, layer, head"):
        load_config(_write(tmp_path, GOOD, "f.yaml"), ["cat.granularity=row"])


def test_ds_config_auto_filling_and_batch_arithmetic(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    ds = fill_ds_config(load_ds_config(REPO / "ds_configs/zero3.json"), cfg, world_size=2, total_steps=100,
                        hidden_size=64)
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam compile on CPU
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    assert fill_ds_config(ds, cfg, world_size=2, on_gpu=True)["bf16"]["enabled"] is False  # already filled
    assert fill_ds_config(load_ds_config(REPO / "ds_configs/zero3.json"), cfg, world_size=2,
                          on_gpu=True)["bf16"]["enabled"] is True
    # No warm-up (GOOD): the scheduler starts past DeepSpeed's minimal 2-step warm-up, its end moved as much.
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["last_batch_iteration"]) == (102, 2) and unresolved_auto(ds) == []
    bad = {**load_ds_config(REPO / "ds_configs/zero3.json"), "train_batch_size": 12}
    with pytest.raises(ConfigError, match=r"train_batch_size = 12 disagrees .* micro_batch_size 4 x grad_accum 2 x "
                                          r"world_size 2 = 16"):
        fill_ds_config(bad, cfg, world_size=2)


def test_train_entry_rejects_bad_config_before_loading_anything(tmp_path):
    """Inconsistent batch sizes through the real entry point: exit 2, a clear message, and no
    model, data or process group touched (the model path does not even exist)."""
    cfg = _write(tmp_path, GOOD.replace("config: configs/models/tiny_llama.json", "config: /nonexistent/model.json"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**load_ds_config(REPO / "ds_configs/zero3.json"), "train_batch_size": 7}))
    t0 = time.time()
    p = subprocess.run([sys.executable, "cat_ds/train.py", "--config", str(cfg), "--ds_config", str(ds)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "config error" in p.stderr and "train_batch_size = 7 disagrees" in p.stderr
    assert "nonexistent" not in p.stderr and "Traceback" not in p.stderr
    assert time.time() - t0 < 60
    p = subprocess.run([sys.executable, "cat_ds/train.py", "--config", str(cfg), "--set", "train.lr=fast"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "train.lr: expected a number, got 'fast'" in p.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    for ds_path in sorted((REPO / "ds_configs").glob("*.json")):
        for world in (1, 2, 8):
            ds = fill_ds_config(load_ds_config(ds_path), cfg, world_size=world, total_steps=10, hidden_size=64)
            assert unresolved_auto(ds) == [], (path.name, ds_path.name)
    assert cfg.cat.enabled in (True, False)


def test_cli_train_rejects_bad_config_before_launching(tmp_path):
    from click.testing import CliRunner

    from cat_ds.cli import main

    res = CliRunner().invoke(main, ["train", str(_write(tmp_path, GOOD)), "--nproc", "2",
                                    "--set", "train.grad_accum=0"])
    assert res.exit_code != 0
    assert "config error" in res.output and "train.grad_accum: must be >= 1, got 0" in res.output


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    from cat_ds.engine.preflight import check

    cfg = load_config(_write(tmp_path, GOOD), [f"output_dir={tmp_path / 'run'}"])
    ds = str(REPO / "ds_configs/zero3.json")
    check(cfg, ds, 2, resume="none")  # empty dir: fine
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000003")
    with pytest.raises(ConfigError, match="already holds checkpoints .* --resume auto"):
        check(cfg, ds, 2, resume="none")
    check(cfg, ds, 2, resume="auto")


def test_exit_process_flushes_stdio_and_keeps_the_exit_code():
    # Piped stdout is block-buffered and os._exit skips Python's own flush: without the explicit
    # flush a rank's last lines (the summary, "run finished") would be lost.
    code = ("import sys; print('last line'); print('to stderr', file=sys.stderr)\n"
            "from cat_ds.engine.distributed import exit_process\nexit_process(3)\nprint('never')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3
    assert p.stdout == "last line\n" and "to stderr" in p.stderr


def test_a_wrong_cat_layers_is_a_config_error_before_any_rank_starts(tmp_path):
    """`cat.layers` in a form no model accepts (config.validate), or naming a layer the model does not
    have (preflight, from the model's config.json): exit 2 from the rank entry point, one line, before
    any process group, data or model; `cat-ds train` says the same and starts nothing."""
    from click.testing import CliRunner

    from cat_ds.cli import main

    model = tmp_path / "two_layers.json"
    model.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4}))
    cfg = _write(tmp_path, GOOD.replace("config: configs/models/tiny_llama.json", f"config: {model}")
                 .replace("output_dir: runs/x", f"output_dir: {tmp_path / 'run'}"))
    with pytest.raises(ConfigError, match=r"c\.yaml.*: cat\.layers: expected 'all', 'last N' or a list of ints"):
        load_config(cfg, ["cat.layers=first 2"])
    for sets, message in ((["cat.layers=first 2"], "cat.layers: expected 'all', 'last N' or a list of ints, got 'first 2'"),
                          (["cat.layers=[0, 5]"], "cat.layers: index 5 out of range for a model with 2 layers"),
                          (["cat.layers=last 3"], "cat.layers: 'last N' needs 1 <= N <= 2, got 'last 3'"),
                          (["cat.heads=5"], "cat.heads: K must be in [1, 4], got 5")):
        t0 = time.time()
        p = subprocess.run([sys.executable, "cat_ds/train.py", "--config", str(cfg), "--set", *sets],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "run").exists() and time.time() - t0 < 60
        res = CliRunner().invoke(main, ["train", str(cfg), "--nproc", "2", "--set", *sets])
        assert res.exit_code != 0 and message in res.output and "+ " not in res.output, res.output
    from cat_ds.engine.preflight import check

    check(load_config(cfg, ["cat.layers=[0, -1]", "cat.heads=4"]), str(REPO / "ds_configs/zero3.json"), 2, "none")


def test_every_enumerated_value_is_checked_by_the_config():
    from cat_ds.choices import SCORER_NAMES
    from cat_ds.evaluation.scorers import SCORERS

    assert tuple(SCORERS) == SCORER_NAMES  # the config's vocabulary is the evaluator's
    with pytest.raises(ConfigError, match="eval.scorer: expected one of exact, gsm8k, numeric, got 'fuzzy'"):
        load_config(REPO / "configs/stg_tiny.yaml", ["eval.scorer=fuzzy"])
