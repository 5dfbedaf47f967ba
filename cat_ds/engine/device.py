"""Which device a run trains on, and whether the GPU path can work at all: one owner.

`CAT_DS_DEVICE` (environment, inherited by every rank a launcher starts) chooses:
- `auto` (default): CUDA when torch sees a GPU, else CPU;
- `cpu`: CPU and gloo even where there are GPUs (fp32, exact; more ranks than GPUs; the tests);
- `cuda`: CUDA and NCCL, and an error when torch cannot use a GPU.
Precision follows the device (`cat_ds.choices.uses_bf16`).

`check_gpu_ready` runs before any rank starts (`cat-ds train`, and `cat_ds/train.py` for a direct
`srun`/`torchrun` launch): a node where GPUs are allocated but torch is a CPU build (a venv made on
a login node) would otherwise train on CPU with gloo and fp32, silently. Torch-free unless asked
to probe the driver: the launcher reads torch's build from its version file, in milliseconds.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

from cat_ds.choices import DEVICES
from cat_ds.config import ConfigError

ENV = "CAT_DS_DEVICE"


class GpuNotReady(ConfigError):
    """GPUs are meant for this run, but torch cannot use them."""


def device_choice(env=None) -> str:
    env = os.environ if env is None else env
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in DEVICES:
        raise ConfigError(f"{ENV}={env[ENV]}: expected one of {', '.join(DEVICES)}")
    return choice


def device_env(choice: str) -> dict[str, str]:
    """Environment that makes a new process (and the DeepSpeed in it, which picks its accelerator
    at import) train on `choice`."""
    if choice not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {choice!r}")
    return {ENV: choice, **({"DS_ACCELERATOR": choice} if choice != "auto" else {})}


def pick(cuda_available: bool, env=None) -> str:
    """"cuda" or "cpu" for this process, by the choice and what torch sees."""
    choice = device_choice(env)
    if choice == "cuda" and not cuda_available:
        raise GpuNotReady(f"{ENV}=cuda, but torch.cuda.is_available() is False in this process")
    return "cuda" if choice != "cpu" and cuda_available else "cpu"


def gpus_allocated(env=None) -> str | None:
    """Why this node is expected to train on GPUs (Slurm's allocation, a visible NVIDIA device), or None."""
    env = os.environ if env is None else env
    n = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if n and n != "0":
        return f"Slurm allocated GPUs to this node (SLURM_GPUS_ON_NODE={n})"
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(var, "").strip():
            return f"Slurm allocated GPUs to this job ({var}={env[var]})"
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None  # GPUs hidden on purpose
    if Path("/dev/nvidia0").exists():
        return "this machine has an NVIDIA GPU (/dev/nvidia0)"
    return None


def torch_build() -> tuple[str, str | None]:
    """(torch.__version__, torch.version.cuda) of the installed torch, read from its version file
    without importing torch (~2 s saved in the launcher). ("not installed", None) without torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "not installed", None
    values = {}
    try:
        tree = ast.parse(Path(list(spec.submodule_search_locations)[0], "version.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError):  # an unusual build: ask torch itself
        import torch

        return torch.__version__, torch.version.cuda
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
            values[target.id] = node.value.value
    return str(values.get("__version__", "unknown")), values.get("cuda")


def check_gpu_ready(env=None, *, build: tuple[str, str | None] | None = None, probe: bool = False) -> None:
    """One line (GpuNotReady) when GPUs are meant for this run (CAT_DS_DEVICE=cuda, or allocated on
    this node) but torch is a CPU build, or (probe=True: imports torch) sees no GPU."""
    env = os.environ if env is None else env
    choice = device_choice(env)
    if choice == "cpu":
        return
    why = f"{ENV}=cuda" if choice == "cuda" else gpus_allocated(env)
    if why is None:
        return
    version, cuda = build or torch_build()
    on_purpose = f"or set {ENV}=cpu to train on CPU on purpose"
    if cuda is None:
        raise GpuNotReady(f"{why}, but torch {version} is a CPU build (torch.version.cuda is None): this run "
                          "would train on CPU with gloo and fp32; install the CUDA build into the venv "
                          f"(CAT_DS_TORCH=cuda bash scripts/setup_venv.sh), {on_purpose}")
    if probe:
        import torch

        if not torch.cuda.is_available():
            raise GpuNotReady(f"{why}, but torch {version} (CUDA {cuda}) sees no GPU (torch.cuda.is_available() "
                              f"is False: driver too old, or CUDA_VISIBLE_DEVICES?); {on_purpose}")
