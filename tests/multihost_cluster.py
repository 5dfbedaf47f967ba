"""Two hosts on this machine, for tests: a real Slurm across two network namespaces.

How the test cluster is built (root only; `multihost_cluster` fixture, one per test module):
- Network: a bridge `catds-br0` in the root namespace with address 10.213.9.254/24 (a private
  subnet the fixture creates and deletes) and, per host, a network namespace `node1`/`node2`
  joined to the bridge by a veth pair whose inside end is `eth0` (10.213.9.1, 10.213.9.2).
  A bridge rather than one veth between the two hosts: slurmctld and the clients (sbatch,
  scontrol) stay in the root namespace and must reach both slurmds, as on a real cluster's
  management network. Traffic goes only to these addresses; everything is deleted at the end
  (also after a failure), and at start if a crashed run left it.
- Each host's processes also run in their own UTS namespace (hostname node1/node2) and mount
  namespace, where bind mounts give the host its own /etc/hosts (node1, node2 and the
  controller on their 10.213.9.x addresses: the hostname must not resolve to 127.0.0.1, or
  peers dial their own loopback), its own HOME (so its own ~/.cache/cat_ds/models) and its
  own /tmp. Shared by both hosts, as a cluster's shared file system and software install:
  pytest's base temp directory (job output, checkpoints, the slurm.conf), the repository,
  the Python installation and DeepSpeed's compiled-op cache (~/.cache/torch_extensions).
- slurmctld and munged run in the root namespace; each slurmd runs inside its host's
  namespaces, bound to its address (NodeAddr), so every job step it starts inherits them.
  Each host claims all of the machine's CPUs (two ranks per host on a 2-core machine).
- The root namespace resolves node1/node2 too: lines appended to /etc/hosts, which is
  restored byte for byte afterwards.

Helpers: `sbatch`/`wait`/`job` (from SlurmCluster), `host_run(node, cmd)` (a command inside a
host, e.g. `srun` from node1 as from a login node), `host_pids(node)` and `kill_host(node)`
(every process of a host: a lost node), `restart_host(node)` (the host back, fresh namespaces).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

SUBNET = "10.213.9"
HOSTS = {"node1": f"{SUBNET}.1", "node2": f"{SUBNET}.2"}
CTLD_ADDR = f"{SUBNET}.254"
BRIDGE = "catds-br0"
HOSTS_FILE = Path("/etc/hosts")
REPO = Path(__file__).resolve().parents[1]
HOSTS_MARK = "# cat-ds multihost test"
HOSTS_LINES = "".join(f"{a} {n} {HOSTS_MARK}\n" for n, a in HOSTS.items())


def _veth(node: str) -> str:
    return f"catds-v{node[-1]}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_pids(node: str) -> list[int]:
    r = _ip("netns", "pids", node, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def teardown_network() -> None:
    """Delete what setup_network makes (idempotent): processes left in the namespaces, the
    namespaces (their veth ends go with them), the bridge, and the /etc/hosts lines."""
    for node in HOSTS:
        for _ in range(3):  # bounded: a process may fork while we kill
            pids = netns_pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        _ip("netns", "del", node, check=False)
        _ip("link", "del", _veth(node), check=False)
    _ip("link", "del", BRIDGE, check=False)
    _restore_hosts_file()


def _restore_hosts_file(original: str | None = None) -> None:
    """Write in place (it may be a bind mount, so no rename): the original text, or without our lines."""
    text = HOSTS_FILE.read_text()
    want = original if original is not None else "".join(
        line for line in text.splitlines(keepends=True) if HOSTS_MARK not in line)
    if want != text:
        with HOSTS_FILE.open("r+") as f:
            f.write(want)
            f.truncate()


def setup_network() -> None:
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{CTLD_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for node, addr in HOSTS.items():
        _ip("netns", "add", node)
        _ip("link", "add", _veth(node), "type", "veth", "peer", "name", "eth0", "netns", node)
        _ip("link", "set", _veth(node), "master", BRIDGE)
        _ip("link", "set", _veth(node), "up")
        _ip("-n", node, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", node, "link", "set", "eth0", "up")
        _ip("-n", node, "link", "set", "lo", "up")


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "the two-host cluster needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"the two-host cluster needs `{tool}` (iproute2 / util-linux)"
    return None


class MultiHostCluster(SlurmCluster):
    def __init__(self, root: Path, shared_root: Path):
        super().__init__(root, nodes=dict(HOSTS), ctld_addr=CTLD_ADDR, cpus_per_node=os.cpu_count() or 2)
        self.shared_root = shared_root  # visible at the same path on every host
        self.shared = root / "shared"  # job output and checkpoints
        self.home = Path.home()
        # slurmctld listens on all addresses of the root namespace (its hostname resolves to
        # 127.0.0.1, which the hosts cannot reach); slurmd and srun bind their host's address.
        self.comm_params = "NoInAddrAny"
        self._hosts_original: str | None = None

    def host_dir(self, node: str) -> Path:
        """The host's private files, as the root namespace sees them (HOME is <this>/home)."""
        return self.root / "hosts" / node

    # ---- lifecycle ---------------------------------------------------------------------
    def prepare_hosts(self) -> None:
        teardown_network()  # a crashed earlier run (running()'s machine lock rules out a live one)
        self._hosts_original = HOSTS_FILE.read_text()
        setup_network()
        with HOSTS_FILE.open("a") as f:
            f.write(HOSTS_LINES)
        self.shared.mkdir(parents=True, exist_ok=True)
        # The software every host shares: the interpreter (if under HOME) and compiled ops.
        (self.home / ".cache" / "torch_extensions").mkdir(parents=True, exist_ok=True)
        for node in HOSTS:
            d = self.host_dir(node)
            for sub in ("home", "tmp"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in HOSTS.items())
                + f"{CTLD_ADDR} {os.uname().nodename.split('.')[0]}\n")

    def _visible(self) -> list[Path]:
        """What every host sees at its usual path through its private HOME and /tmp: the shared
        directory, the repository and the Python installation (a clone or venv may live in either)."""
        paths = sorted({self.shared_root.resolve(), REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()})
        return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]  # outermost only

    def slurmd_command(self, node: str) -> list[str]:
        d, home = self.host_dir(node), self.home
        steps = [f"hostname {node}", f"mount --bind {d / 'hosts'} /etc/hosts"]
        for private, root in ((d / "home", home), (d / "tmp", Path("/tmp"))):
            shown = [root / ".cache" / "torch_extensions"] if root == home else []  # compiled ops, shared
            for path in shown + [p for p in self._visible() if p.is_relative_to(root)]:
                inner = shlex.quote(str(private / path.relative_to(root)))
                steps += [f"mkdir -p {inner}", f"mount --bind {shlex.quote(str(path))} {inner}"]
            steps.append(f"mount --rbind {shlex.quote(str(private))} {shlex.quote(str(root))}")
        script = " && ".join(steps) + ' && exec "$@"'
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs /sys/fs/cgroup.
        return ["nsenter", f"--net=/run/netns/{node}", "--", "unshare", "--uts", "--mount", "--propagation",
                "private", "--", "sh", "-c", script, "sh", *super().slurmd_command(node)]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            teardown_network()
            if self._hosts_original is not None:
                _restore_hosts_file(self._hosts_original)

    # ---- inside a host -----------------------------------------------------------------
    def slurmd_pid(self, node: str) -> int:
        return self._procs[f"slurmd-{node}"].pid  # nsenter/unshare/sh exec into slurmd: one pid

    def host_command(self, node: str, cmd: list[str], cwd: Path | str = "/") -> list[str]:
        """cmd inside node's network, UTS and mount namespaces (those of its slurmd)."""
        return ["nsenter", "-t", str(self.slurmd_pid(node)), "-n", "-u", "-m", f"--wd={cwd}", *cmd]

    def host_run(self, node: str, cmd: list[str], cwd: Path | str = "/", env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.host_command(node, cmd, cwd), env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def host_pids(self, node: str) -> list[int]:
        return netns_pids(node)

    def kill_host(self, node: str, sig: int = signal.SIGKILL) -> list[int]:
        """Every process of the host (slurmd, slurmstepd, launchers, ranks): a lost node."""
        pids = self.host_pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def restart_host(self, node: str, timeout: float = 60) -> None:
        """A lost host back (after kill_host): a fresh slurmd in fresh namespaces, and every node idle."""
        old = self._procs.pop(f"slurmd-{node}", None)
        if old is not None:
            old.wait(timeout=10)
        self._procs[f"slurmd-{node}"] = subprocess.Popen(
            self.slurmd_command(node), env=self.env, stdout=subprocess.DEVNULL,
            stderr=self._errfile(f"slurmd-{node}-restarted"))
        self._wait(self._nodes_idle, timeout, f"{node} to be idle again")


@pytest.fixture(scope="module")
def multihost_cluster(tmp_path_factory):
    reason = missing_requirements()
    try:
        if reason is None:
            ensure_installed()
    except SlurmUnavailable as e:
        reason = str(e)
    if reason:
        if os.environ.get("CI"):  # in CI these tests must run, never skip
            pytest.fail(reason)
        pytest.skip(reason)
    with MultiHostCluster(tmp_path_factory.mktemp("mh"), tmp_path_factory.getbasetemp()).running() as cluster:
        yield cluster
