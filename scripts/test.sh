#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up .venv if needed, then run the whole
# suite. Slow multi-process tests are marked `slow` and still run here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
# One PATH for the whole suite: DeepSpeed JIT-builds an op with ninja, and two ninja builds
# (system and .venv) discard each other's records, forcing a rebuild per switch.
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# Two workers (pytest-xdist): the slow multi-process tests in order on one, the quick ones on the
# other (tests/conftest.py groups them). `-n 0` runs everything in this process.
exec .venv/bin/python -m pytest -q --timeout 900 -n 2 --dist loadgroup "$@"
