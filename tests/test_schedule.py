"""The optimizer-step schedule at a world size (cat_ds/schedule.py): its numbers, its refusals,
every shipped recipe at the scale its header names (and at 1 GPU and 2 x 8 GPUs), and `cat-ds plan`
answering for every recipe offline."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cat_ds.config import RECIPES_DIR, load_config
from cat_ds.schedule import check_schedule, schedule, schedule_problems
from conftest import REPO

CAT_DS = str(Path(sys.executable).with_name("cat-ds"))
OLD_8B = ["train.micro_batch_size=16", "train.grad_accum=4"]  # the recipe before issue 27


def test_the_8b_recipe_before_the_fix_is_refused_at_8_and_16_gpus():
    cfg = load_config("llama3.1_8b_m", OLD_8B)
    s = schedule(cfg, 8, 800)
    assert (s.global_batch, s.steps_per_epoch, s.total_steps, s.warmup_steps, s.dropped_per_epoch) == (512, 1, 10, 20, 288)
    problems = schedule_problems(s, cfg)
    assert len(problems) == 2 and "warmup_steps 20 is not shorter than the run (10 steps" in problems[0]
    assert "288 of 800 training records (36 %)" in problems[1] and "train.allow_dropped_records" in problems[1]
    # The explicit key allows the dropped tail, not the warm-up.
    assert len(schedule_problems(s, load_config("llama3.1_8b_m", [*OLD_8B, "train.allow_dropped_records=true"]))) == 1
    s16 = schedule(cfg, 16, 800)
    assert s16.steps_per_epoch == 0 and s16.total_steps == 0
    (only,) = schedule_problems(s16, cfg)
    assert only.startswith("an epoch has no optimizer step: 800 training records < global batch 1024")
    with pytest.raises(Exception, match=r"^x.yaml: schedule at world size 16: an epoch has no optimizer step") as e:
        check_schedule(s16, cfg, src="x.yaml")
    assert "\n" not in str(e.value)


def test_max_steps_sets_the_length_and_a_run_shorter_than_an_epoch_drops_nothing():
    cfg = load_config("stg_tiny", ["train.max_steps=4", "train.warmup_steps=0", "train.micro_batch_size=30"])
    s = schedule(cfg, 1, 100)
    assert (s.steps_per_epoch, s.total_steps, s.dropped_per_epoch) == (3, 4, 10)
    assert schedule_problems(s, cfg) == []  # 10 % exactly is allowed
    cfg = load_config("stg_tiny", ["train.max_steps=2", "train.warmup_steps=0", "train.micro_batch_size=64"])
    assert "36 of 100 training records (36 %)" in schedule_problems(schedule(cfg, 1, 100), cfg)[0]
    cfg = load_config("stg_tiny", ["train.max_steps=1", "train.warmup_steps=0", "train.micro_batch_size=40"])
    assert schedule_problems(schedule(cfg, 1, 100), cfg) == []  # 1 step of a 2-step epoch: no tail is dropped


def scale(recipe: Path) -> tuple[int, int]:
    m = re.search(r"^# scale: (\d+) nodes? x (\d+) (GPUs?|CPU ranks?)\b", recipe.read_text(), re.M)
    assert m, f"{recipe.name}: its header names no scale (# scale: N node(s) x G GPUs)"
    return int(m[1]), int(m[2])


# recipe -> verdict at (its stated scale, 1 GPU, 2 nodes x 8 GPUs)
VERDICTS = {
    "llama3.1_8b_m": ("ok", "ok", "ok"),
    "llama3.2_1b_m": ("ok", "ok", "ok"),
    "tinyllama_1b_m": ("ok", "ok", "ok"),
    "qwen2.5_1.5b_h": ("ok", "ok", "ok"),
    "smollm2_stg": ("ok", "ok", "ok"),
    "stg_tiny": ("ok", "ok", "warm-up"),  # 3 steps per epoch on 16 ranks: 9 steps, 10 of warm-up
}


def test_every_shipped_recipe_passes_at_its_stated_scale():
    from cat_ds.plan import run_schedule

    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert sorted(p.stem for p in recipes) == sorted(VERDICTS)
    for path in recipes:
        cfg = load_config(path)
        nodes, gpus = scale(path)
        for world, want in zip((nodes * gpus, 1, 16), VERDICTS[path.stem]):
            s, why = run_schedule(cfg, world)
            assert s is not None, why
            problems = schedule_problems(s, cfg)
            got = "ok" if not problems else "warm-up" if "warmup_steps" in problems[0] else problems[0]
            assert got == want, f"{path.stem} at world {world}: {s.describe()}: {problems}"
            if world == nodes * gpus:  # at its scale: a real run, not a token one
                assert s.steps_per_epoch >= 10 and s.dropped_fraction <= 0.05 and s.warmup_steps < s.total_steps / 4


# Public parameter counts of the recipes' models (the shipped config.json must reproduce them).
PARAMS = {"llama3.1_8b_m": 8_030_261_248, "llama3.2_1b_m": 1_235_814_400, "tinyllama_1b_m": 1_100_048_384,
          "qwen2.5_1.5b_h": 1_543_714_304, "smollm2_stg": 134_515_008}


def test_plan_answers_offline_at_once_for_every_recipe(tmp_path):
    """One process plans every recipe at its scale with the hub unreachable; each plan after the first
    (which pays for the imports) answers in seconds."""
    script = tmp_path / "plan_all.py"
    script.write_text(
        "import sys, time\nfrom cat_ds.config import load_config\nfrom cat_ds.plan import plan\n"
        "for name, nodes, gpus in [a.split(':') for a in sys.argv[1:]]:\n"
        "    t = time.perf_counter(); out = plan(load_config(name), int(nodes), int(gpus), 80, 512)\n"
        "    print(f'@@ {name} {time.perf_counter() - t:.2f}'); print(out)\n")
    args = ["stg_tiny:1:2"] + [f"{p.stem}:{':'.join(map(str, scale(p)))}" for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAT_DS_MODEL_CACHE": str(tmp_path / "no_models"),
           "HF_HOME": str(tmp_path / "hf"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = re.split(r"^@@ ", p.stdout, flags=re.M)[1:]
    assert len(parts) == len(args)
    for part in parts[1:]:
        head, out = part.split("\n", 1)
        name, secs = head.split()
        assert float(secs) < 15, f"{name}: plan took {secs} s"
        assert "schedule verdict: ok" in out, out
        if name in PARAMS:
            assert f"model: {PARAMS[name]:,} parameters" in out


def test_plan_cli_refuses_a_degenerate_schedule_in_one_line():
    p = subprocess.run([CAT_DS, "plan", "stg_tiny", "--nodes", "2", "--gpus-per-node", "8"], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1
    assert "schedule: 800 records, world 16: global batch 256" in p.stdout and "| zero3 |" in p.stdout
    assert "schedule verdict: refused: train.warmup_steps 10 is not shorter than the run (9 steps" in p.stdout
    err = [ln for ln in p.stderr.splitlines() if "WARNING" not in ln]
    assert err == ["Error: config error: stg_tiny: schedule at world size 16: train.warmup_steps 10 is not shorter "
                   "than the run (9 steps: train.epochs 3 x 3 steps/epoch); lower train.warmup_steps or lengthen "
                   "the run"], p.stderr
