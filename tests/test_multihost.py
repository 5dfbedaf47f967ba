"""cat-ds across two hosts: a real Slurm over two network namespaces (tests/multihost_cluster.py).

Each host has its own hostname, /etc/hosts, HOME (model cache) and /tmp; job output lives in
the shared directory. Ranks meet over gloo on the hosts' eth0 (GLOO_SOCKET_IFNAME=eth0)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from multihost_cluster import HOSTS, multihost_cluster  # noqa: F401  (fixture)

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
STEPS = 3
SMOL = {  # SmolLM2 with CAT under ZeRO-3 and activation checkpointing: a few short steps
    "output_dir": "runs/smol",
    "model": {"name_or_path": "smollm2-135m-instruct", "gradient_checkpointing": True},
    "data": {"max_length": 128, "chat_template": True},
    "train": {"micro_batch_size": 1, "grad_accum": 1, "max_steps": STEPS, "warmup_steps": 0, "lr": 1e-4,
              "save_every": 0, "log_every": 1, "export": True},
    "cat": {"enabled": True, "heads": "all"},
    "eval": {"every": 0, "limit": 4, "batch_size": 4, "probe_size": 0},
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
        r, lines, took = _doctor(c, "--output-dir", str(out), "--wait", "5")
    finally:
        assert c.host_run("node2", ["umount", str(out)]).returncode == 0
    print(f"[multihost] doctor (bad): {took:.0f} s")
    assert r.returncode != 0 and len(lines) == 2, (r.stdout, r.stderr)
    for line in lines:
        assert f"PROBLEM: output dir {out} is not shared: this node sees markers of 1/2 node(s)" in line, line
    assert not list(out.iterdir()) and not list(private.iterdir())  # each side cleaned its markers


# ---- direct srun, no torchrun -------------------------------------------------------------
TINY_SET = ["train.max_steps=2", "train.micro_batch_size=2", "train.save_every=0", "train.export=false",
            "eval.limit=4", "data.max_length=64"]


def _direct_script(wd: Path, name: str, env_lines: str = "", prepare: bool = True) -> Path:
    """srun starts the 4 ranks itself: `python -m cat_ds.train` with only Slurm's variables."""
    args = " ".join(["--set", f"output_dir=runs/{name}", *TINY_SET])
    script = wd / f"{name}.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --output=logs/%x-%j.out\nset -e\n" + env_lines +
        (f"srun --ntasks 2 --ntasks-per-node 1 {CAT_DS} prepare configs/stg_tiny.yaml {args}\n" if prepare else "") +
        f"srun --ntasks-per-node 2 --kill-on-bad-exit=1 {sys.executable} -m cat_ds.train "
        f"--config configs/stg_tiny.yaml --ds_config zero3 {args}\n")
    return script


def test_direct_srun_launch_across_hosts(multihost_cluster, workdir):  # noqa: F811
    c = multihost_cluster
    t0 = time.monotonic()
    job_id = c.sbatch(["--nodes", "2", "--ntasks-per-node", "2", "--chdir", str(workdir),
                       str(_direct_script(workdir, "direct"))], env=_job_env())
    (job,) = c.wait(job_id, timeout=300)
    log = _out(workdir / "logs" / f"direct.sbatch-{job_id}.out")
    print(f"[multihost] direct srun (tiny, world 4): {time.monotonic() - t0:.0f} s")
    assert job["JobState"] == "COMPLETED", log[-6000:]
    assert json.loads((workdir / "runs/direct/run.json").read_text())["world_size"] == 4
    rows = [json.loads(line) for line in (workdir / "runs/direct/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_unreachable_rendezvous_fails_fast_in_one_line(multihost_cluster, workdir):  # noqa: F811
    """MASTER_ADDR names an address nobody has: every rank gives up within CAT_DS_RDZV_TIMEOUT,
    saying where it tried to go and which variables to set. (The ranks fail before reading any
    data: no prepare step. A hang would end as TIMEOUT at the job's 4-minute limit, not FAILED.)"""
    c = multihost_cluster
    bad = "10.213.9.77"  # in the test subnet, no host
    t0 = time.monotonic()
    script = _direct_script(workdir, "badaddr", f"export MASTER_ADDR={bad} CAT_DS_RDZV_TIMEOUT=10\n", prepare=False)
    job_id = c.sbatch(["--nodes", "2", "--ntasks-per-node", "2", "--time", "4", "--chdir", str(workdir), str(script)],
                      env=_job_env())
    (job,) = c.wait(job_id, timeout=180)
    took = time.monotonic() - t0
    log = _out(workdir / "logs" / f"badaddr.sbatch-{job_id}.out")
    print(f"[multihost] unreachable rendezvous: job ended after {took:.0f} s")
    assert job["JobState"] == "FAILED", log[-4000:]
    lines = [line for line in log.splitlines() if "could not join the process group" in line]
    assert lines, log[-4000:]
    assert f"MASTER_ADDR={bad}" in lines[0] and "GLOO_SOCKET_IFNAME=eth0" in lines[0]
    assert "NCCL_SOCKET_IFNAME" in lines[0] and "within 10 s" in lines[0]
    assert "Traceback" not in log, log[-4000:]
