"""Every bench runs its documented command on a fresh clone (no data/, no runs/: what a bench
needs it makes or finds), with tiny settings appended; BENCHMARKS.md's and the benches' own
commands name benches, flags and files that exist, and no machine-local input path."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py"))
REPO_PREFIXES = ("bench/", "configs/", "ds_configs/", "cat_ds/", "scripts/", "slurm/", "docs/", "tests/")


def fresh_clone(dest: Path) -> Path:
    """The files a `git clone` of the working tree has (tracked, and untracked but not ignored),
    symlinks kept; nothing ignored (data/, runs/, .venv/) comes along."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src, dst = REPO / rel, dest / rel
        if not (src.exists() or src.is_symlink()):  # deleted in the working tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def commands(text: str) -> list[list[str]]:
    """Each `python|deepspeed ... bench/X.py ...` command of a markdown text or docstring, as argv
    from the bench script on: code spans (they may wrap lines) and indented lines."""
    text = text.replace("\\\n", " ")  # shell line continuations
    found = [c for c in text.split("`")[1::2] if re.search(r"bench/\w+\.py", c)]
    found += [l for l in text.splitlines() if l.startswith("    ") and re.search(r"bench/\w+\.py", l)]
    cmds = []
    for c in found:
        c = c.split(" #")[0]
        if not re.search(r"(python|deepspeed)\S*\s", c):  # a mention (`bench/step_time.py`), not a command
            continue
        argv = shlex.split(c)
        i = next(i for i, a in enumerate(argv) if re.fullmatch(r"bench/\w+\.py", a))
        cmds.append(argv[i:])
    return cmds


def documented() -> list[tuple[str, list[str]]]:
    docs = [("BENCHMARKS.md", (REPO / "BENCHMARKS.md").read_text())]
    docs += [(f"bench/{b}", ast.get_docstring(ast.parse((REPO / "bench" / b).read_text()))) for b in BENCHES]
    return [(where, argv) for where, text in docs for argv in commands(text)]


def test_documented_commands_name_real_benches_flags_and_files():
    cmds = documented()
    assert {argv[0] for _, argv in cmds} >= {f"bench/{b}" for b in BENCHES}, "a bench without a documented command"
    for where, argv in cmds:
        bench = REPO / argv[0]
        assert bench.is_file(), f"{where}: {argv[0]} does not exist"
        src = bench.read_text()
        for prev, a in zip(argv, (a.strip("[]") for a in argv[1:])):  # usage lines bracket the optional
            if a.startswith("--"):
                flag = a.split("=")[0]
                assert f'"{flag}"' in src, f"{where}: {argv[0]} has no option {flag}"
            if a.startswith("/"):  # inputs never sit at a machine-local path; an output dir may
                assert prev == "--out", f"{where}: machine-local path {a} in {' '.join(argv)}"
            if a.startswith(REPO_PREFIXES) and not re.search(r"[<>{}|*]", a):
                assert (REPO / a).exists(), f"{where}: {a} does not exist (in {' '.join(argv)})"
    assert "/work/" not in (REPO / "BENCHMARKS.md").read_text()


# The documented command (BENCHMARKS.md / the bench's docstring), then the tiny settings that
# override it; and a check on its output. The default recipe of step_time.py is SmolLM2 (minutes
# per variant on 2 cores): its tiny settings take the tiny recipe, which needs a trained tokenizer too.
RUNS = {
    "data": ("bench/data.py --kind sentencepiece --json", "--records 40 --repeats 1"),
    "reattention": ("bench/reattention.py --repeat 5 --threads 1 --json",
                    "--seq-len 64 --repeat 1 --layers 2 --hidden 64 --n-heads 4 --kv-heads 2 --intermediate 128 "
                    "--vocab 256 --rows 4 --cols 4"),
    "evaluation": ("bench/evaluation.py --model smollm2-135m-instruct --records 32 --batch-sizes 1,16 --repeats 1",
                   "--records 4 --batch-sizes 1,4 --json"),
    "train_step": ("bench/train_step.py --config configs/stg_tiny.yaml --warmup 3 --steps 20 --repeats 6 "
                   "--modes cat,base",
                   "--warmup 1 --steps 1 --repeats 1 --json"),
    "step_time": ("bench/step_time.py --json",
                  "--config configs/stg_tiny.yaml --variants zero3x1 --steps 1 --warmup 0 --no-memory"),
    "stg_shortcut": ("bench/stg_shortcut.py --model smollm2-135m-instruct",
                     "--eval-records 4 --attention-records 2 --knockout-records 2"),
}
SMOLLM2 = {"evaluation", "stg_shortcut"}
TEMP_PREFIXES = ("bench_data-", "bench_eval-", "step_time-")  # the temp dirs benches make and remove


@pytest.mark.parametrize("bench", sorted(RUNS))
def test_bench_runs_on_a_fresh_clone(bench, tmp_path, request):
    cmd, tiny = RUNS[bench]
    assert shlex.split(cmd) in [argv for _, argv in documented()], f"{cmd} is not documented"
    clone = fresh_clone(tmp_path / "clone")
    assert not (clone / "data").exists()
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))  # what a bench leaves there shows below
    if bench in SMOLLM2:  # the suite's converted copy (the conversion itself is tested elsewhere)
        env["CAT_DS_MODEL_CACHE"] = str(request.getfixturevalue("smol_cache"))
    p = subprocess.run([sys.executable, *shlex.split(cmd), *shlex.split(tiny)], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd} {tiny} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    out = p.stdout
    if bench == "data":
        assert json.loads(out.splitlines()[-1])["records"] == 40
    elif bench == "reattention":
        r = json.loads(out.splitlines()[-1])
        assert r["seq_len"] == 64 and r["cat_ms"] > 0 and r["research_peak_mb"] is not None
    elif bench == "evaluation":
        r = json.loads(out[out.index("{"):])
        assert [row["batch_size"] for row in r["rows"]] == [1, 4] and r["rows"][0]["records"] == 4
    elif bench == "train_step":
        assert [r["mode"] for r in json.loads(out.splitlines()[-1])] == ["cat", "base"]
        assert (clone / "data/stg_m/train.jsonl").is_file() and (clone / "data/stg_m/tokenizer").is_dir()
    elif bench == "step_time":
        r = json.loads(out.splitlines()[-1])
        assert [row["variant"] for row in r["rows"]] == ["zero3x1"] and r["cat_over_base"] > 0 and r["startup_s"] > 0
        assert (clone / "data/stg_m/train.jsonl").is_file()
    elif bench == "stg_shortcut":
        assert re.search(r"OOD accuracy \d\.\d{4}; with consistent twins", out)
        assert out.count("teacher-forced") == 2 and "layer 29:" in out  # SmolLM2's 30 layers
        assert (clone / "data/stg_m/test_ood.jsonl").is_file()
    left = [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith(TEMP_PREFIXES)]
    assert not left, f"{cmd} left {left} in its temp dir"
