#!/bin/bash
# One per node, started by slurm/train_cat.sbatch through `srun --ntasks-per-node 1`: runs
# torchrun (c10d rendezvous on HEAD_NODE:MASTER_PORT), which starts this node's training
# processes. Arguments go to cat_ds/train.py. Needs HEAD_NODE, MASTER_PORT, NPROC_PER_NODE,
# TORCHRUN and CAT_DS_ROOT in the environment (the batch script exports them).
#
# USR1 (the batch script's, forwarded by srun) means: checkpoint and exit. The training
# processes do that in their USR1 handler, which exists only once the training loop runs.
# So: torchrun and its children start with USR1 ignored (torchrun would die on it and orphan
# its workers; a worker still loading data would die), and on USR1 this script sends USR1 to
# each training process as soon as that process catches it (SigCgt in /proc/PID/status), and
# only once: a late one could arrive after Python reset its handlers at exit, and kill it.
# (Slurm may also deliver srun's USR1 to every process of the step: same effect.)
set -uo pipefail
echo "[cat-ds] node $SLURMD_NODENAME: launcher $SLURM_NODEID of $SLURM_JOB_NUM_NODES starting"
is_host=0; [[ $SLURM_NODEID == 0 ]] && is_host=1   # the head node serves the rendezvous store
(trap "" USR1; exec "$TORCHRUN" --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-conf "is_host=$is_host" --max-restarts 0 "$CAT_DS_ROOT/cat_ds/train.py" "$@") &
launcher=$!

stop=0
declare -A signalled=()
trap 'stop=1' USR1
usr1_caught() {  # does process $1 have a handler for USR1 (signal 10, bit 9 of SigCgt)?
    local line
    line=$(grep -m1 '^SigCgt:' "/proc/$1/status" 2>/dev/null) || return 1
    (( 0x${line##*[[:space:]]} & (1 << 9) ))
}
while kill -0 "$launcher" 2>/dev/null; do
    if ((stop)); then
        for pid in $(pgrep -P "$launcher"); do
            if [[ -z ${signalled[$pid]:-} ]] && usr1_caught "$pid"; then
                kill -USR1 "$pid" 2>/dev/null && signalled[$pid]=1
            fi
        done
    fi
    sleep 1 & wait $! || true   # `wait`, unlike `sleep`, returns as soon as USR1 arrives
done
wait "$launcher"; rc=$?
# The head node's result, for the batch script: it stops waiting for srun soon after (a lost node
# never answers srun, which would otherwise wait for it until Slurm declares the node down).
[[ $SLURM_NODEID == 0 && -n ${CAT_DS_HEAD_EXIT:-} ]] && echo "$rc" > "$CAT_DS_HEAD_EXIT"
exit "$rc"
