#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up .venv if needed, then run the whole suite.
#
# Two pytest processes side by side: the multi-process tests (marked `slow` or `multihost`:
# several ranks, Slurm daemons, the two-host cluster) one after another in the foreground, as in
# a serial run; meanwhile in the background the tests that keep one core busy (the quick
# in-process ones, and the `single_rank` slow ones), their report printed at the end. One pytest
# alone left half the machine idle. Arguments go to both (`--durations=0`, a test file: a half
# that selects nothing passes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
# One PATH for the whole suite: DeepSpeed JIT-builds an op with ninja, and two ninja builds
# (system and .venv) discard each other's records, forcing a rebuild per switch.
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
pytest=(.venv/bin/python -m pytest -q --timeout 900)
quick_log=$(mktemp -t cat-ds-quick-tests.XXXXXX)
trap 'rm -f "$quick_log"; kill "${quick_pid:-}" 2>/dev/null || true' EXIT

multi="(slow or multihost) and not single_rank"
"${pytest[@]}" -m "not ($multi)" "$@" >"$quick_log" 2>&1 &
quick_pid=$!
slow_rc=0
"${pytest[@]}" -m "$multi" "$@" || slow_rc=$?
quick_rc=0
wait "$quick_pid" || quick_rc=$?
unset quick_pid
echo "=== the one-core tests (ran alongside) ==="
cat "$quick_log"
# 5: no test selected in that half (a file of only quick or only slow tests was named).
if [[ $slow_rc == 5 && $quick_rc == 5 ]]; then exit 5; fi
for rc in "$slow_rc" "$quick_rc"; do
    [[ $rc == 0 || $rc == 5 ]] || exit 1
done
