"""slurm/*.sbatch against a real Slurm (munged, slurmctld, slurmd n1 + n2 on this machine).

No mock of sbatch or srun: the fixture in slurm_cluster.py starts the daemons. The training
tests run the tiny CPU config for a few steps, one rank per emulated node (world size 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import run_metrics, slurm_cluster, steps_so_far  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CAT_DS = str(Path(sys.executable).parent / "cat-ds")
STEPS = 24  # short, but long enough to preempt mid-run (~0.4 s per step on one core per rank)
TRAIN_SET = ["--set", f"train.max_steps={STEPS}", "train.save_every=8", "train.log_every=4", "eval.limit=10"]


def test_slurm_smoke_two_nodes(slurm_cluster, tmp_path):  # noqa: F811
    """The infrastructure itself: a 2-node batch job runs a step on n1 and n2, COMPLETED."""
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --output=%x-%j.out\n"
                      "srun --ntasks-per-node 1 bash -c 'echo step-on-$SLURMD_NODENAME'\n")
    job_id = slurm_cluster.sbatch(["--nodes", "2", "--chdir", str(tmp_path), str(script)])
    (job,) = slurm_cluster.wait(job_id, timeout=60)
    out = (tmp_path / f"hello.sbatch-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", (job, out)
    assert job["NodeList"] == "n[1-2]"
    assert sorted(line for line in out.splitlines() if line.startswith("step-on-")) == [
        "step-on-n1", "step-on-n2"], out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A submit directory like a user's checkout (configs/, ds_configs/, logs/) with STG_M and
    its tokenizer generated once, so concurrent sweep tasks do not all generate them."""
    wd = tmp_path_factory.mktemp("slurm_work")
    for name in ("configs", "ds_configs"):
        (wd / name).symlink_to(REPO / name)
    (wd / "logs").mkdir()
    vocab = json.loads((REPO / "configs/models/tiny_llama.json").read_text())["vocab_size"]
    for cmd in (["data", "stg", "--task", "stg", "--train-size", "M", "--seed", "0", "--out", "data/stg_m"],
                ["tokenizer", "train", "--data", "data/stg_m/train.jsonl", "--kind", "bpe",
                 "--vocab-size", str(vocab), "--out", "data/stg_m/tokenizer"]):
        subprocess.run([CAT_DS, *cmd], cwd=wd, check=True, capture_output=True, timeout=300)
    return wd


def _submit(cluster, wd: Path, script: str, sbatch_args: list[str], script_args: list[str],
            env: dict | None = None) -> str:
    return cluster.sbatch(["--chdir", str(wd), *sbatch_args, str(REPO / "slurm" / script), *script_args],
                          env={"CAT_DS_ROOT": str(REPO), **(env or {})})


def _log(wd: Path, name: str) -> str:
    p = wd / "logs" / name
    return p.read_text(errors="replace") if p.exists() else f"<no {p}>"


@pytest.fixture(scope="module")
def full_run(slurm_cluster, workdir):  # noqa: F811
    """One uninterrupted 2-node run: test (1), and the reference for the preemption test."""
    job_id = _submit(slurm_cluster, workdir, "train_cat.sbatch", ["--nodes", "2"],
                     ["--config", "configs/stg_tiny.yaml", *TRAIN_SET, "output_dir=runs/full"])
    (job,) = slurm_cluster.wait(job_id, timeout=400)
    return job, _log(workdir, f"cat-ds-{job_id}.out"), workdir / "runs/full"


def test_train_two_nodes_world_size_2(full_run):
    job, log, run = full_run
    assert job["JobState"] == "COMPLETED", log[-5000:]
    assert job["NodeList"] == "n[1-2]"
    # One launcher per node, and both ranks took part: ZeRO shards of ranks 0 and 1, and the
    # global batch DeepSpeed used is micro x accum x 2.
    assert "node n1: launcher" in log and "node n2: launcher" in log, log[-5000:]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    last = run / "checkpoints" / f"step_{STEPS:08d}"
    assert {p.name for p in last.glob("zero_pp_rank_*_model_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "config.json").is_file()
    steps = [r["step"] for r in run_metrics(run) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_preempt_usr1_checkpoints_requeues_and_resumes(slurm_cluster, workdir, full_run):  # noqa: F811
    """What `--signal=B:USR1@N` does before the time limit, sent now: `scancel -b -s USR1`.
    The batch script forwards it, the run checkpoints, the job requeues itself, the second run
    resumes from the checkpoint and its final metrics equal the uninterrupted run's."""
    run = workdir / "runs/preempted"
    job_id = _submit(slurm_cluster, workdir, "train_cat.sbatch", ["--nodes", "2"],
                     ["--config", "configs/stg_tiny.yaml", *TRAIN_SET, "output_dir=runs/preempted"])
    log_name = f"cat-ds-{job_id}.out"
    deadline = time.monotonic() + 300
    while True:  # signal once a few steps are done
        if steps_so_far(run) >= 3:
            break
        (job,) = slurm_cluster.job(job_id)
        assert job["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
            job, _log(workdir, log_name)[-5000:])
        time.sleep(0.3)
    slurm_cluster.scancel_batch_signal(job_id, "USR1")
    (job,) = slurm_cluster.wait(job_id, timeout=400)
    log = _log(workdir, log_name)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, log[-6000:])
    stopped = re.search(r"stop signal received: saving at step (\d+)", log)
    resumed = re.search(r"resumed from \S+ \(step (\d+)", log)
    assert stopped and resumed, log[-6000:]
    assert 3 <= int(stopped.group(1)) == int(resumed.group(1)) < STEPS, log[-6000:]
    assert "(restart 0)" in log and "(restart 1)" in log
    assert "training stopped (rc=0); requeueing" in log, log[-6000:]  # every rank exited cleanly
    # Steps continued (no restart from 0) and every logged value equals the uninterrupted run.
    got, want = run_metrics(run), run_metrics(full_run[2])
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7), (g, w)
    assert (run / "export" / "model.safetensors").is_file()


def test_sweep_two_seeds_four_runs_compare(slurm_cluster, workdir):  # noqa: F811
    """2 modes x 2 seeds as a job array; `cat-ds compare` reads all four from one experiment."""
    job_id = _submit(slurm_cluster, workdir, "sweep.sbatch", ["--array=0-3"],
                     ["--set", "train.max_steps=4", "train.warmup_steps=0", "train.save_every=0", "train.export=false",
                      "eval.limit=10"],
                     env={"SEEDS": "0 1", "SWEEP_DIR": "runs/sweep", "EXPERIMENT": "slurm-sweep",
                          "MLFLOW_TRACKING_URI": ""})
    tasks = slurm_cluster.wait(job_id, timeout=600)
    logs = "\n".join(_log(workdir, f"cat-ds-sweep-{job_id}_{i}.out")[-3000:] for i in range(4))
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), (tasks, logs)
    sweep = workdir / "runs/sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.name != "mlflow") == [
        "base-seed0", "base-seed1", "cat-seed0", "cat-seed1"]
    out = subprocess.run([CAT_DS, "compare", "--experiment", "slurm-sweep", "--store-root", str(sweep / "mlflow")],
                         capture_output=True, text=True, timeout=180, cwd=workdir,
                         env={**slurm_cluster.env, "MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| stg ")]
    assert len(rows) == 2 and all(line.count("(n=2)") == 2 for line in rows), out.stdout
