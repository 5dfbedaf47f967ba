"""A real two-node Slurm cluster on this machine, for tests.

munged, slurmctld and two slurmd daemons (`-N n1`, `-N n2`) run in the foreground from a
generated slurm.conf in a temporary directory; clients find it through SLURM_CONF, which
sbatch passes on to the job, so srun inside a batch script finds it too. The packages are
installed with apt-get when missing (root only). Without accounting there is no sacct: job
state comes from `scontrol show job -o`.

Use the `slurm_cluster` fixture (import it into the test module).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm/munge are missing and cannot be installed here."""


def ensure_installed() -> None:
    """apt-get install the daemons and clients if any binary is missing (idempotent)."""
    if os.geteuid() != 0:  # SlurmUser/SlurmdUser=root, munged via runuser, /etc/hosts
        raise SlurmUnavailable("the test cluster's daemons must be started as root")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm/munge binaries are missing and there is no apt-get to "
                               f"install them: apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_hosts() -> None:
    """Head node names from `scontrol show hostnames` must resolve (MASTER_ADDR)."""
    hosts = Path("/etc/hosts")
    names = set()
    for line in hosts.read_text().splitlines():
        parts = line.split("#")[0].split()
        if parts and parts[0] == "127.0.0.1":
            names.update(parts[1:])
    if not set(NODES) <= names:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)}\n")


def _munge_works() -> bool:
    if not shutil.which("munge"):
        return False
    enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if enc.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=enc.stdout, capture_output=True,
                          timeout=10).returncode == 0


def _node_resources() -> tuple[int, int]:
    """Split this machine between the two emulated nodes: (CPUs, RealMemory MB) per node.
    On the 2-core CI machine each node gets one CPU: a 2-node job runs one rank per core."""
    cpus = max(1, (os.cpu_count() or 2) // 2)
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return cpus, max(512, mem_mb // 2 - 512)


class SlurmCluster:
    """Daemons + client helpers. The node list, the controller's address, CPUs per node and how
    each slurmd is started are parameters: tests/multihost_cluster.py runs the same daemons with
    each slurmd inside its own network namespace."""

    def __init__(self, root: Path, nodes: dict[str, str] | None = None, ctld_addr: str = "127.0.0.1",
                 cpus_per_node: int | None = None):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.nodes = nodes or {n: "127.0.0.1" for n in NODES}  # NodeName -> NodeAddr
        self.ctld_addr = ctld_addr
        self.cpus_per_node = cpus_per_node
        # Bind to the address the host's name resolves to, not to all: two slurmds share this host.
        self.comm_params = "NoCtldInAddrAny,NoInAddrAny"
        self._procs: dict[str, subprocess.Popen] = {}
        self._files = []

    # ---- lifecycle ---------------------------------------------------------------------
    def write_conf(self) -> None:
        cpus, mem = _node_resources()
        cpus = self.cpus_per_node or cpus
        host = socket.gethostname().split(".")[0]
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
        r = self.root
        node_ports = [_free_port() for _ in self.nodes]
        lines = [
            "ClusterName=catds",
            f"SlurmctldHost={host}({self.ctld_addr})",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # A requeued job may start only after the job credential expired (default 120 s
            # + 1): keep the preemption test short.
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            # Settings measured to work in a container without systemd/cgroups.
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            f"CommunicationParameters={self.comm_params}",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true", "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=600", "KillWait=10", "ReturnToService=2", "InactiveLimit=0",
            "JobRequeue=1",
        ]
        for (n, addr), port in zip(self.nodes.items(), node_ports):
            # NodeHostname: what the node's own gethostname() says (this machine's name, unless
            # the node runs in its own UTS namespace named after the node).
            hostname = host if addr == "127.0.0.1" else n
            lines.append(f"NodeName={n} NodeAddr={addr} NodeHostname={hostname} Port={port} "
                         f"CPUs={cpus} RealMemory={mem} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def prepare_hosts(self) -> None:
        """Make the node names resolve (the head node's name becomes MASTER_ADDR)."""
        _ensure_hosts()

    def slurmd_command(self, node: str) -> list[str]:
        """How node's slurmd starts (foreground); a subclass wraps it in the node's namespaces."""
        return ["slurmd", "-D", "-N", node, "-f", str(self.conf)]

    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        self.prepare_hosts()
        self.write_conf()
        if not _munge_works():
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            # -F: foreground, so we own the process and can end it.
            self._procs["munged"] = subprocess.Popen(
                ["runuser", "-u", "munge", "--", "munged", "-F"],
                stdout=subprocess.DEVNULL, stderr=self._errfile("munged"))
            self._wait(_munge_works, timeout, "munged to answer")
        self._procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
            stdout=subprocess.DEVNULL, stderr=self._errfile("slurmctld"))
        self._wait(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
                   timeout, "slurmctld to answer `scontrol ping`")
        for n in self.nodes:
            self._procs[f"slurmd-{n}"] = subprocess.Popen(
                self.slurmd_command(n), env=self.env,
                stdout=subprocess.DEVNULL, stderr=self._errfile(f"slurmd-{n}"))
        self._wait(self._nodes_idle, timeout, f"nodes {' and '.join(self.nodes)} to be idle")

    @contextlib.contextmanager
    def running(self):
        """The cluster up for the `with` body, alone on the machine, and down after, also on failure."""
        with one_cluster_per_machine():
            try:
                self.start()
                yield self
            finally:
                self.stop()

    def stop(self) -> None:
        """Cancel what still runs (a failed test), stop the daemons, end stray job processes."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run(["scancel", "--partition=debug"], check=False)
            end = time.monotonic() + 30
            # squeue lists pending, running and completing jobs only.
            while time.monotonic() < end and self._run(["squeue", "-h", "-o", "%i"],
                                                       check=False).stdout.strip():
                time.sleep(1)
        for name in reversed(list(self._procs)):
            p = self._procs.pop(name)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self._kill_stray_job_processes()
        for f in self._files:
            f.close()

    def _kill_stray_job_processes(self) -> None:
        """Job processes (slurmstepd, the batch shell, launchers, ranks) left behind: every one
        of them carries SLURM_CONF=<our conf> in its environment, nothing else does."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                env = (pid_dir / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _errfile(self, name: str):
        f = open(self.root / f"{name}.err", "w")
        self._files.append(f)
        return f

    # ---- helpers -----------------------------------------------------------------------
    def _run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=kw.pop("timeout", 30), **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}"
                               f"\n{self.daemon_logs()}")
        return r

    def _wait(self, pred, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            for name, p in self._procs.items():
                if p.poll() is not None:
                    err = self.root / f"{name}.err"
                    err = err.read_text(errors="replace")[-3000:] if err.exists() else ""
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for "
                                       f"{what}\n{err}\n{self.daemon_logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.daemon_logs()}")

    def _nodes_idle(self) -> bool:
        r = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def daemon_logs(self, tail: int = 30) -> str:
        out = []
        # *.log only: the daemons' stderr (*.err) repeats their log files in -D mode.
        for f in sorted(self.root.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                out.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    # ---- jobs --------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path | None = None,
               env: dict | None = None) -> str:
        """Submit, return the job id (for an array, the array's master id)."""
        r = self._run(["sbatch", "--parsable", *args], cwd=cwd,
                      env={**self.env, **(env or {})})
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts: one per job (several for an array)."""
        r = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        jobs = []
        for line in r.stdout.splitlines():
            # Values hold no spaces except Command/WorkDir paths in odd set-ups; good enough.
            jobs.append(dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line)))
        return jobs

    def wait(self, job_id: str, timeout: float = 300,
             until=lambda jobs: all(j["JobState"] in TERMINAL for j in jobs)) -> list[dict]:
        end = time.monotonic() + timeout
        while True:
            jobs = self.job(job_id)
            if jobs and until(jobs):
                return jobs
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} not done after {timeout}s: "
                                   f"{[(j['JobId'], j['JobState']) for j in jobs]}\n"
                                   f"{self.daemon_logs()}")
            time.sleep(1)

    def scancel_batch_signal(self, job_id: str, sig: str) -> None:
        """Signal only the batch shell, as `--signal=B:SIG@N` does before the time limit."""
        self._run(["scancel", "--batch", f"--signal={sig}", str(job_id)])


MACHINE_LOCK = Path("/run/lock/cat-ds-test-slurm.lock")


@contextlib.contextmanager
def one_cluster_per_machine(timeout: float = 1200, lock: Path = MACHINE_LOCK):
    """Held while a test cluster lives. munged's socket, the /etc/hosts lines and the two-host
    cluster's bridge and namespaces are machine-wide: a second cluster starting beside a live one
    (another pytest process, a second CI job on the machine) would take them from it, and its
    jobs would lose their controller without a word. The lock goes with its process, however it ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    f.seek(0)
                    raise RuntimeError(f"another test Slurm cluster (pid {f.read().strip() or '?'}) held "
                                       f"{lock} for {timeout:.0f} s") from None
                time.sleep(2)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        if os.environ.get("CI"):  # in CI these tests must run, never skip
            pytest.fail(str(e))
        pytest.skip(str(e))
    # A short root path: slurm.conf lines and socket paths stay well under their limits.
    with SlurmCluster(tmp_path_factory.mktemp("slurm")).running() as cluster:
        yield cluster


# ---- reading a run's metrics.jsonl while a job writes it (test_slurm.py, test_multihost.py) ----
TIMING = {"tokens_per_s", "step_time_s"}  # wall-clock fields: differ between any two runs


def run_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without the wall-clock fields (what two identical runs share)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def steps_so_far(run_dir: Path) -> int:
    """Last optimizer step in a metrics.jsonl being written (a half-written line is skipped)."""
    path, last = run_dir / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        last = max(last, row["step"] if "loss" in row else 0)
    return last
