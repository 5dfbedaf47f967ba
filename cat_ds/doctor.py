"""`cat-ds doctor`: can the nodes of this allocation train together? One line per node.

Run on every node (`srun --nodes N --ntasks-per-node 1 cat-ds doctor --config C`). Each node
reports its torch build and accelerator, the interface and address its collectives would use,
whether it reaches the head node's rendezvous port (the head listens for a bounded time, the
others dial it), whether the output directory is shared (each node writes a marker file for
this job step and waits, bounded, to see every node's) and whether the model is in its cache.
The first problem found is named on the line and the node exits 1.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SIOCGIFADDR = 0x8915


@dataclass
class Report:
    host: str
    parts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = f"PROBLEM: {self.problems[0]}" if self.problems else "OK"
        return f"{self.host}: " + "; ".join(self.parts) + f" -> {verdict}"


def iface_addr(name: str) -> str | None:
    """IPv4 address of interface `name` (None: no such interface, or no address)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def iface_of(addr: str) -> str | None:
    return next((n for _, n in socket.if_nameindex() if iface_addr(n) == addr), None)


def _torch(rep: Report) -> bool:
    import torch

    on_gpu = torch.cuda.is_available()
    acc = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if on_gpu else "cpu"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else "-"
    rep.parts.append(f"torch {torch.__version__} on {acc}, CUDA {torch.version.cuda or '-'}, NCCL {nccl}")
    return on_gpu


def _address(rep: Report, on_gpu: bool, nodes: int) -> None:
    """What gloo/NCCL bind: the interface the variable names, else the hostname's address."""
    var = "NCCL_SOCKET_IFNAME" if on_gpu else "GLOO_SOCKET_IFNAME"
    names = os.environ.get(var, "")
    if names and not names.startswith(("^", "=")):  # NCCL's exclusion / exact-match forms: not checked
        name = names.split(",")[0]
        addr = iface_addr(name)
        rep.parts.append(f"{var}={names}: {addr or 'no address'}")
        if addr is None:
            rep.problems.append(f"{var}={names}: this node has no interface {name} with an IPv4 address "
                                f"(it has: {', '.join(n for _, n in socket.if_nameindex())})")
        return
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        rep.parts.append(f"hostname {host}: does not resolve")
        rep.problems.append(f"hostname {host} does not resolve; set {var} to the cluster network's interface")
        return
    rep.parts.append(f"{iface_of(addr) or '?'} {addr} (hostname; {var} unset)")
    if nodes > 1 and ipaddress.ip_address(addr).is_loopback:
        rep.problems.append(f"hostname {host} resolves to {addr}: peers on other nodes would dial their own "
                            f"loopback; set {var} to the cluster network's interface")


def _rendezvous(rep: Report, head: str, port: int, is_head: bool, peers: int, wait_s: float, out: list) -> None:
    """Head: listen on the port until every other node connected (or wait_s). Others: dial it."""
    end = time.monotonic() + wait_s
    if is_head:
        try:
            srv = socket.create_server(("", port))
        except OSError as e:
            out.append((f"rendezvous port {port}: cannot listen", f"port {port} on the head node: {e.strerror}"))
            return
        seen = set()
        with srv:
            srv.settimeout(0.5)
            while len(seen) < peers and time.monotonic() < end:
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    try:
                        seen.add(conn.recv(256).decode(errors="replace").strip())
                    except OSError:
                        pass
        msg = f"rendezvous {head}:{port} served, reached by {len(seen)}/{peers} node(s)"
        out.append((msg, None if len(seen) >= peers else f"only {len(seen)}/{peers} other node(s) reached "
                    f"{head}:{port} within {wait_s:.0f} s"))
        return
    err = "no attempt"
    while time.monotonic() < end:
        try:
            with socket.create_connection((head, port), timeout=max(0.5, min(5.0, end - time.monotonic()))) as c:
                c.sendall(rep.host.encode())
                out.append((f"rendezvous {head}:{port} reachable", None))
                return
        except OSError as e:
            err = e.strerror or type(e).__name__
            time.sleep(0.5)
    out.append((f"rendezvous {head}:{port} unreachable",
                f"cannot reach the head node's rendezvous {head}:{port} within {wait_s:.0f} s ({err}); check "
                "MASTER_ADDR / the head node's name and firewalls"))


def _shared_dir(rep: Report, out_dir: Path, nodes: int, is_head: bool, tag: str, wait_s: float) -> None:
    """Every node writes <out_dir>/.cat-ds-doctor-<job.step>/<host>; all must see all (bounded)."""
    d = out_dir / f".cat-ds-doctor-{tag}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / rep.host).write_text(rep.host)
    except OSError as e:
        rep.parts.append(f"output dir {out_dir}: not writable")
        rep.problems.append(f"output dir {out_dir}: cannot write ({e.strerror})")
        return
    end = time.monotonic() + wait_s
    seen = lambda: {p.name for p in d.iterdir() if not p.name.endswith(".done")}  # noqa: E731
    while len(seen()) < nodes and time.monotonic() < end:
        time.sleep(0.2)
    got = seen()
    (d / f"{rep.host}.done").touch()
    if is_head:  # remove the markers once every node has looked (bounded)
        while len(list(d.glob("*.done"))) < nodes and time.monotonic() < end + wait_s:
            time.sleep(0.2)
        shutil.rmtree(d, ignore_errors=True)
    elif len(got) < nodes:  # a private view: nobody else will clean it
        shutil.rmtree(d, ignore_errors=True)
    rep.parts.append(f"output dir {out_dir} {'shared' if len(got) >= nodes else 'NOT shared'} "
                     f"({len(got)}/{nodes} nodes seen)")
    if len(got) < nodes:
        rep.problems.append(f"output dir {out_dir} is not shared: this node sees markers of {len(got)}/{nodes} "
                            f"node(s) ({', '.join(sorted(got))}) after {wait_s:.0f} s; it must be on a file system "
                            "every node mounts at the same path")


def _model(rep: Report, cfg) -> None:
    from cat_ds.config import ConfigError
    from cat_ds.engine.model import model_source

    if cfg is None or not cfg.model.name_or_path:
        rep.parts.append("model: -")
        return
    try:
        src = model_source(cfg)
    except ConfigError as e:
        rep.parts.append("model: not in this node's cache")
        rep.problems.append(f"{e}; run `srun --ntasks-per-node 1 cat-ds prepare CONFIG` first")
        return
    ok = Path(src).is_dir() or "/" in src  # a directory, or a hub id (fetched at load)
    rep.parts.append(f"model {src}" if ok else f"model {src}: ?")


def doctor(cfg=None, output_dir: str | None = None, wait_s: float = 20.0) -> Report:
    """This node's report (see the module docstring)."""
    from cat_ds.engine.distributed import first_host, job_port

    env = os.environ
    rep = Report(env.get("SLURMD_NODENAME") or socket.gethostname())
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    node_id = int(env.get("SLURM_NODEID", "0"))
    on_gpu = _torch(rep)
    _address(rep, on_gpu, nodes)
    n_addr = len(rep.problems)  # problems are named in check order
    out = []
    rdzv = None
    if nodes > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        head = env.get("MASTER_ADDR") or first_host(nodelist)
        port = int(env.get("MASTER_PORT") or job_port(env.get("SLURM_JOB_ID", "0")))
        rdzv = threading.Thread(target=_rendezvous, args=(rep, head, port, node_id == 0, nodes - 1, wait_s, out))
        rdzv.start()
    out_dir = output_dir or (cfg.output_dir if cfg is not None else None)
    if out_dir:
        tag = f"{env.get('SLURM_JOB_ID', os.getpid())}.{env.get('SLURM_STEP_ID', 0)}"
        _shared_dir(rep, Path(out_dir), nodes, node_id == 0, tag, wait_s)
    else:
        rep.parts.append("output dir: - (give --output-dir or --config)")
    if rdzv is not None:
        rdzv.join()
        msg, problem = out[0]
        rep.parts.insert(2, msg)
        if problem:
            rep.problems.insert(n_addr, problem)
    _model(rep, cfg)
    return rep
