"""cat-ds across two hosts: a real Slurm over two network namespaces (tests/multihost_cluster.py).

Each host has its own hostname, /etc/hosts, HOME (model cache) and /tmp; job output lives in
the shared directory. Ranks meet over gloo on the hosts' eth0 (GLOO_SOCKET_IFNAME=eth0)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from multihost_cluster import HOSTS, multihost_cluster  # noqa: F401  (fixture)
from slurm_cluster import TERMINAL, run_metrics, steps_so_far

pytestmark = [pytest.mark.multihost, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CAT_DS = str(VENV_BIN / "cat-ds")
NET_ENV = {"GLOO_SOCKET_IFNAME": "eth0", "CAT_DS_ROOT": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _out(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<no {path}>"


def test_two_hosts_own_names_homes_and_a_shared_dir(multihost_cluster):  # noqa: F811
    """The cluster itself: one step per host, each with its own name, address, HOME and /tmp,
    both writing into the shared directory; node names resolve to the hosts' addresses."""
    c = multihost_cluster
    shared = c.shared / "smoke"
    shared.mkdir()
    probe = ("import os, socket, pathlib, tempfile; h = socket.gethostname(); "
             "pathlib.Path(os.path.expanduser('~/mark')).write_text(h); "
             "pathlib.Path(tempfile.gettempdir(), 'mark').write_text(h); "
             f"pathlib.Path('{shared}', h).write_text(socket.gethostbyname(h) + ' ' + "
             "' '.join(socket.gethostbyname(n) for n in ('node1', 'node2')))")
    script = shared / "hello.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={shared}/%j.out\n"
                      f"srun --ntasks-per-node 1 {sys.executable} -c \"{probe}\"\n")
    job_id = c.sbatch(["--nodes", "2", str(script)])
    (job,) = c.wait(job_id, timeout=60)
    assert job["JobState"] == "COMPLETED", (job, _out(shared / f"{job_id}.out"), c.daemon_logs())
    want = " ".join(HOSTS.values())
    assert {p.name: p.read_text() for p in shared.iterdir() if p.name in HOSTS} == {
        n: f"{a} {want}" for n, a in HOSTS.items()}
    for node in HOSTS:  # HOME and /tmp are the host's own
        assert (c.host_dir(node) / "home" / "mark").read_text() == node
        assert (c.host_dir(node) / "tmp" / "mark").read_text() == node
    assert not (Path.home() / "mark").exists()


# ---- training across the hosts ------------------------------------------------------------
STEPS = 1
SMOL = {  # SmolLM2 with CAT under ZeRO-3 and activation checkpointing: a few short steps
    "output_dir": "runs/smol",
    "model": {"name_or_path": "smollm2-135m-instruct", "gradient_checkpointing": True},
    "data": {"max_length": 96, "chat_template": True},
    "train": {"micro_batch_size": 1, "grad_accum": 1, "max_steps": STEPS, "warmup_steps": 0, "lr": 1e-4,
              "save_every": 0, "log_every": 1, "export": True},
    "cat": {"enabled": True, "heads": "all"},
    "eval": {"every": 0, "limit": 1, "batch_size": 1, "probe_size": 0, "attention_records": 0},
    "tracking": {"mlflow": False},
}


def _job_env() -> dict:
    """What a user's shell passes to sbatch: no model cache override (each host uses its HOME's)."""
    return {**NET_ENV, "CAT_DS_MODEL_CACHE": ""}


@pytest.fixture(scope="module")
def workdir(multihost_cluster, stg_dir):  # noqa: F811
    """A submit directory on the shared file system, like a user's checkout."""
    import yaml

    wd = multihost_cluster.shared / "work"
    (wd / "logs").mkdir(parents=True)
    for name in ("configs", "ds_configs"):
        (wd / name).symlink_to(REPO / name)
    cfg = {**SMOL, "data": {**SMOL["data"], "train": str(stg_dir / "train.jsonl"),
                            "eval": {"iid": str(stg_dir / "test_iid.jsonl")}}}
    (wd / "smol.yaml").write_text(yaml.safe_dump(cfg))
    return wd


@pytest.fixture(scope="module")
def smol_run(multihost_cluster, workdir):  # noqa: F811
    """`sbatch --nodes 2 slurm/train_cat.sbatch`, 2 ranks per node (world 4) over gloo on eth0."""
    c = multihost_cluster
    t0 = time.monotonic()
    job_id = c.sbatch(["--nodes", "2", "--cpus-per-task", "2", "--chdir", str(workdir),
                       str(REPO / "slurm" / "train_cat.sbatch"), "--config", "smol.yaml"],
                      env={**_job_env(), "NPROC_PER_NODE": "2"})
    (job,) = c.wait(job_id, timeout=600)
    elapsed = time.monotonic() - t0
    print(f"[multihost] SmolLM2 world-4 job: {elapsed:.0f} s")
    return job, _out(workdir / "logs" / f"cat-ds-{job_id}.out"), workdir / "runs" / "smol", elapsed


def test_sbatch_trains_smollm2_across_two_hosts(multihost_cluster, smol_run):  # noqa: F811
    job, log, run, _ = smol_run
    assert job["JobState"] == "COMPLETED", log[-6000:]
    assert job["NodeList"] == "node[1-2]"
    assert "node node1: launcher" in log and "node node2: launcher" in log, log[-6000:]
    # Each host converted the model into its own HOME before the ranks met; node1 also tokenised.
    for node in HOSTS:
        assert f"[cat-ds] prepared {node}: model " in log, log[-6000:]
        home = multihost_cluster.host_dir(node) / "home"
        assert list(home.glob(".cache/cat_ds/models/*/config.json")), f"no converted model in {node}'s HOME"
    assert "training records tokenised" in log
    assert "activation checkpointing on)" in log and "world 4;" in log, log[-6000:]
    # ZeRO-3 loaded the real model (GQA 9/3 heads, tied embeddings) sharded: rank 0 holds a quarter.
    total, local = (int(g.replace(",", "")) for g in
                    re.search(r"model: ([\d,]+) parameters; rank 0 holds ([\d,]+)", log).groups())
    assert total == 134_515_008 and local <= total // 4 + 100_000, (total, local)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["zero_optimization"]["stage"] == 3
    last = run / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in last.glob("zero_pp_rank_*_model_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert all(r["cat_loss"] != 0 for r in rows if "loss" in r)
    assert any(k.startswith("eval/") or k.startswith("iid") for r in rows for k in r), rows[-1]
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "config.json").is_file()


def test_the_exported_model_predicts_what_the_trained_engine_predicted(smol_run, stg_dir):
    """Reloaded from export/ and evaluated standalone (`cat-ds eval --chat-template`), the model gives
    the in-engine evaluation's prediction, token for token, on the same record."""
    from cat_ds.evaluation.standalone import evaluate_model_dir

    job, log, run, _ = smol_run
    assert job["JobState"] == "COMPLETED", log[-6000:]
    (engine_preds,) = (run / "eval").glob("step_*/iid.jsonl")
    engine = [json.loads(line) for line in engine_preds.read_text().splitlines()]
    assert len(engine) == 1 and engine[0]["input"].startswith("<|im_start|>")  # templated prompts
    data = run.parent / "iid1.jsonl"  # eval.limit 1: the first record, as written (not yet templated)
    data.write_text((stg_dir / "test_iid.jsonl").read_text().splitlines(keepends=True)[0])
    res = evaluate_model_dir(run / "export", [str(data)], batch_size=1, chat_template=True)
    assert [p.prediction for p in res.predictions] == [p["prediction"] for p in engine]


# ---- cat-ds doctor ------------------------------------------------------------------------
def _doctor(c, *args: str, timeout: float = 120):
    t0 = time.monotonic()
    r = c.host_run("node1", ["srun", "--nodes", "2", "--ntasks-per-node", "1", CAT_DS, "doctor", *args],
                   cwd=c.shared, env=_job_env(), timeout=timeout)
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("node"))
    return r, lines, time.monotonic() - t0


def test_doctor_good_cluster(multihost_cluster, workdir, smol_run):  # noqa: F811
    """After the training job: both nodes reach node1's rendezvous port, see each other's marker
    in the shared output directory, and have the model in their own cache."""
    r, lines, took = _doctor(multihost_cluster, "--config", str(workdir / "smol.yaml"),
                             "--output-dir", str(workdir / "runs" / "doctor"))
    print(f"[multihost] doctor (good): {took:.0f} s")
    assert r.returncode == 0 and len(lines) == 2, (r.stdout, r.stderr)
    for node, line in zip(HOSTS, lines):
        assert line.startswith(f"{node}: torch ") and line.endswith("-> OK"), line
        assert f"GLOO_SOCKET_IFNAME=eth0: {HOSTS[node]}" in line, line
        assert "shared (2/2 nodes seen)" in line and "rendezvous node1:" in line, line
        assert f"model {Path.home()}/.cache/cat_ds/models/" in line, line  # this host's own HOME
    assert "reached by 1/1 node(s)" in lines[0] and "reachable" in lines[1]
    assert not list((workdir / "runs" / "doctor").glob(".cat-ds-doctor-*"))  # markers cleaned up


def test_doctor_names_a_node_without_the_shared_directory(multihost_cluster):  # noqa: F811
    """node2 mounts an empty private directory over the shared path: both nodes say the output
    directory is not shared, the doctor exits 1."""
    c = multihost_cluster
    out = c.shared / "doctor_bad"
    out.mkdir()
    private = c.host_dir("node2") / "private"
    private.mkdir()
    mount = c.host_run("node2", ["mount", "--bind", str(private), str(out)])
    assert mount.returncode == 0, mount.stderr
    try:
        r, lines, took = _doctor(c, "--output-dir", str(out), "--wait", "3")
    finally:
        assert c.host_run("node2", ["umount", str(out)]).returncode == 0
    print(f"[multihost] doctor (bad): {took:.0f} s")
    assert r.returncode != 0 and len(lines) == 2, (r.stdout, r.stderr)
    for line in lines:
        assert f"PROBLEM: output dir {out} is not shared: this node sees markers of 1/2 node(s)" in line, line
    assert not list(out.iterdir()) and not list(private.iterdir())  # each side cleaned its markers


# ---- the tiny model: direct srun, preemption, a lost node, a stale `latest` -------------------
TINY_STEPS, TINY_SAVE = 10, 4
TINY_SET = [f"train.max_steps={TINY_STEPS}", "train.micro_batch_size=2", "train.warmup_steps=2",
            f"train.save_every={TINY_SAVE}", "train.keep_last=3", "train.log_every=1", "train.export=true",
            "eval.limit=2", "eval.batch_size=2", "eval.probe_size=0", "eval.attention_records=0",
            "data.max_length=64"]


def _direct_script(wd: Path, name: str, env_lines: str = "", per_node: int = 2) -> Path:
    """srun starts the ranks itself: `python -m cat_ds.train` with only Slurm's variables, and no
    `cat-ds prepare` step: the ranks' own set-up makes the data and tokenizer (rank 0)."""
    args = " ".join(["--set", f"output_dir=runs/{name}", *TINY_SET])
    script = wd / f"{name}.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --output=logs/%x-%j.out\nset -e\n" + env_lines +
        f"srun --ntasks-per-node {per_node} --kill-on-bad-exit=1 {sys.executable} -m cat_ds.train "
        f"--config configs/stg_tiny.yaml --ds_config zero3 {args}\n")
    return script


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def direct_run(multihost_cluster, workdir):  # noqa: F811
    """`srun --nodes 2 --ntasks-per-node 2 python -m cat_ds.train`: the uninterrupted world-4 reference."""
    c = multihost_cluster
    t0 = time.monotonic()
    job_id = c.sbatch(["--nodes", "2", "--ntasks-per-node", "2", "--chdir", str(workdir),
                       str(_direct_script(workdir, "direct"))], env=_job_env())
    (job,) = c.wait(job_id, timeout=300)
    print(f"[multihost] direct srun (tiny, world 4, {TINY_STEPS} steps): {time.monotonic() - t0:.0f} s")
    return job, _out(workdir / "logs" / f"direct.sbatch-{job_id}.out"), workdir / "runs" / "direct"


def test_direct_srun_launch_across_hosts(direct_run):
    job, log, run = direct_run
    assert job["JobState"] == "COMPLETED", log[-6000:]
    assert json.loads((run / "run.json").read_text())["world_size"] == 4
    assert [r["step"] for r in run_metrics(run) if "loss" in r] == list(range(1, TINY_STEPS + 1))
    assert (run / "export" / "model.safetensors").is_file()


def _until(c, job_id: str, log: Path, pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        (job,) = c.job(job_id)
        assert job["JobState"] not in TERMINAL and time.monotonic() < end, (what, job, _out(log)[-6000:])
        time.sleep(0.3)


def test_preemption_node_loss_and_stale_latest_resume_bit_exact(multihost_cluster, workdir, direct_run):  # noqa: F811
    """One tiny world-4 run through slurm/train_cat.sbatch (torchrun per node), three lives:
    1. USR1 to the batch shell after step 1 (what `--signal=B:USR1@300` does before the time
       limit): checkpoint at step 2, the job requeues itself and resumes from step 2;
    2. after step 6 (checkpoint at 4) every process of node2 is killed, while the ranks wait
       entering step 7: the job ends within 60 s, one line names the lost ranks and host;
    3. resubmitted on both hosts, with node2 seeing a stale `latest` (step 2; a bind mount in its
       mount namespace, as a network file system's cached view): every rank resumes from rank 0's
       step 4, losing steps 5-6 only. The final weights equal the uninterrupted run's, bit for bit."""
    c, run = multihost_cluster, workdir / "runs" / "chain"
    submit = ["--nodes", "2", "--chdir", str(workdir), str(REPO / "slurm" / "train_cat.sbatch"),
              "--config", "configs/stg_tiny.yaml", "--set", "output_dir=runs/chain", *TINY_SET]
    env = {**_job_env(), "NPROC_PER_NODE": "2"}
    job_id = c.sbatch(submit, env={**env, "CAT_DS_TEST_FAULTS": "pause_at=1:5,6:3"})
    log_path = workdir / "logs" / f"cat-ds-{job_id}.out"

    # 1. preemption
    _until(c, job_id, log_path, lambda: steps_so_far(run) >= 1, 300, "step 1")
    c.scancel_batch_signal(job_id, "USR1")
    _until(c, job_id, log_path, lambda: "(restart 1)" in _out(log_path) and steps_so_far(run) >= 6, 300,
           "the requeued run's step 6")
    log = _out(log_path)
    assert c.job(job_id)[0]["Restarts"] == "1", log[-6000:]
    assert "stop signal received: saving at step 2" in log and "training stopped (rc=0); requeueing" in log, log
    assert "resumed from step_00000002 (step 2" in log, log[-6000:]

    # 2. node2 lost
    killed_at = time.monotonic()
    assert c.kill_host("node2")
    (job,) = c.wait(job_id, timeout=180, until=lambda jobs: jobs[0]["JobState"] != "RUNNING")
    ended = time.monotonic() - killed_at
    log = _out(log_path)
    print(f"[multihost] node2 killed entering step 7: job {job['JobState']} after {ended:.1f} s")
    assert ended <= 60 and job["JobState"] in TERMINAL | {"COMPLETING"}, (job, log[-6000:])
    lost = [line for line in log.splitlines() if "lost contact with" in line]
    assert len(lost) == 1, log[-6000:]
    assert lost[0].startswith("cat-ds: lost contact with ranks 2, 3 (node2, 10.213.9.2) during step 7;"), lost
    assert lost[0].endswith("resume continues from step_00000004"), lost
    c.restart_host("node2")

    # 3. resubmitted, node2 with a stale `latest`
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004" and (root / "step_00000002" / "COMPLETE").is_file()
    stale = c.host_dir("node2") / "stale_latest"
    stale.write_text("step_00000002")
    assert c.host_run("node2", ["mount", "--bind", str(stale), str(root / "latest")]).returncode == 0
    try:
        seen = c.host_run("node2", ["cat", str(root / "latest")]).stdout
        assert seen == "step_00000002", seen  # node2's view really is stale
        t0 = time.monotonic()
        job2_id = c.sbatch(submit, env=env)
        (job2,) = c.wait(job2_id, timeout=300)
    finally:
        c.host_run("node2", ["umount", str(root / "latest")])
    log2 = _out(workdir / "logs" / f"cat-ds-{job2_id}.out")
    print(f"[multihost] resubmitted after node loss: {time.monotonic() - t0:.0f} s; steps lost: 5-6 "
          f"(resumed from step {TINY_SAVE} after step 6 had finished)")
    assert job2["JobState"] == "COMPLETED", log2[-6000:]
    assert re.findall(r"resumed from (\S+) \(step (\d+)", log2) == [("step_00000004", "4")], log2[-6000:]
    got, want = run_metrics(run), run_metrics(direct_run[2])
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7), (g, w)
    mine, ref = _weights(run), _weights(direct_run[2])
    assert mine.keys() == ref.keys() and all(torch_equal(mine[k], ref[k]) for k in ref)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_unreachable_rendezvous_fails_fast_in_one_line(multihost_cluster, workdir):  # noqa: F811
    """MASTER_ADDR names an address nobody has: every rank (one per node) gives up within
    CAT_DS_RDZV_TIMEOUT, saying where it tried to go and which variables to set. (A hang would
    end as TIMEOUT at the job's 4-minute limit, not FAILED.)"""
    c = multihost_cluster
    bad = "10.213.9.77"  # in the test subnet, no host
    t0 = time.monotonic()
    script = _direct_script(workdir, "badaddr", f"export MASTER_ADDR={bad} CAT_DS_RDZV_TIMEOUT=5\n", per_node=1)
    job_id = c.sbatch(["--nodes", "2", "--ntasks-per-node", "1", "--time", "4", "--chdir", str(workdir), str(script)],
                      env=_job_env())
    (job,) = c.wait(job_id, timeout=180)
    took = time.monotonic() - t0
    log = _out(workdir / "logs" / f"badaddr.sbatch-{job_id}.out")
    print(f"[multihost] unreachable rendezvous: job ended after {took:.0f} s")
    assert job["JobState"] == "FAILED", log[-4000:]
    lines = [line for line in log.splitlines() if "could not join the process group" in line]
    assert lines, log[-4000:]
    assert f"MASTER_ADDR={bad}" in lines[0] and "GLOO_SOCKET_IFNAME=eth0" in lines[0]
    assert "NCCL_SOCKET_IFNAME" in lines[0] and "within 5 s" in lines[0]
    assert "Traceback" not in log, log[-4000:]
