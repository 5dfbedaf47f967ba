"""slurm/*.sbatch against a real Slurm (munged, slurmctld, slurmd n1 + n2 on this machine).

No mock of sbatch or srun: the fixture in slurm_cluster.py starts the daemons. Here: the daemons
themselves and slurm/sweep.sbatch (a job array through the engine). Training across two nodes with
slurm/train_cat.sbatch, its preemption (USR1 -> checkpoint -> requeue -> resume) and a lost node run
on two real hosts in test_multihost.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import one_cluster_per_machine, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CAT_DS = str(Path(sys.executable).parent / "cat-ds")


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


def test_a_second_cluster_waits_for_the_first_and_names_its_holder(tmp_path):
    """The machine lock (one test cluster at a time): held by another process, it is refused after
    the timeout with that process's pid; released (the holder exits), it is taken."""
    lock = tmp_path / "cluster.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "sys.path.insert(0, 'tests'); from slurm_cluster import one_cluster_per_machine; "
                               f"cm = one_cluster_per_machine(lock=Path('{lock}')); cm.__enter__(); "
                               "print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"another test Slurm cluster \(pid {holder.pid}\) held"):
            with one_cluster_per_machine(timeout=3, lock=lock):
                pass
    finally:
        holder.kill()
        holder.wait()
    with one_cluster_per_machine(timeout=5, lock=lock):
        assert lock.read_text() == str(os.getpid())


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
