#!/bin/bash
# Runs pretrain_neon.py on every node of a Slurm allocation: srun starts one torchrun per node,
# each torchrun starts one process per GPU (or NEON_DEVICE=cpu: CPU_PROCS_PER_NODE gloo ranks).
#
# Not submitted by itself: the sbatch scripts beside it set the knobs (environment) and call
#   exec bash "$NEON_DIR/examples/slurm/launch.sh" <pretrain_neon.py flags>
# so that this process is the job's batch shell and receives Slurm's signals:
#   - SIGUSR1 (#SBATCH --signal=B:USR1@T, T seconds before the time limit, or by hand with
#     `scancel --batch --signal=USR1 JOBID`): every rank is told to save a checkpoint and exit
#     (SIGTERM, which torchrun forwards on every torch version), then the job requeues itself
#     and the next run resumes from that checkpoint (--load).
#   - SIGTERM (scancel, preemption, `scontrol requeue`): Slurm signals the ranks itself; this
#     shell waits for them to save. Slurm requeues a preempted job (--requeue) on its own.
set -euo pipefail

: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm job: submit an sbatch script from examples/slurm/}"
: "${NEON_DIR:?}" "${RUN_DIR:?}" "${TRAIN_SCRIPT:?}" "${NEON_DEVICE:?}"
TORCHRUN=${TORCHRUN:-torchrun}
SHUTDOWN_SECONDS=${SHUTDOWN_SECONDS:-240}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}

case "$NEON_DEVICE" in
    gpu) NPROC=${GPUS_PER_NODE:?} ;;
    cpu)
        NPROC=${CPU_PROCS_PER_NODE:?}
        # No GPU visible: megatron_plugins.cpu_runtime then runs megatron-core on the CPU with gloo.
        export CUDA_VISIBLE_DEVICES=""
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        ;;
    *)
        echo "launch.sh: NEON_DEVICE=$NEON_DEVICE: expected gpu or cpu" >&2
        exit 2
        ;;
esac

# Rendezvous on the first node of the allocation. Its NodeAddr is the address other nodes reach
# it by (equal to the node name on most clusters; not on clusters with made-up node names).
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
# A port per job (a requeued run keeps its job id and so its port), away from the ephemeral range.
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
NNODES=$SLURM_JOB_NUM_NODES
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$RUN_DIR/logs/job$SLURM_JOB_ID-run$RESTART
mkdir -p "$LOG_DIR"

echo "launch.sh: job $SLURM_JOB_ID run $RESTART: $NNODES nodes x $NPROC processes ($NEON_DEVICE)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT ($FIRST_NODE), run dir $RUN_DIR, per-rank logs $LOG_DIR"

SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
if [ -n "$CONTAINER_IMAGE" ]; then
    SRUN+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$NEON_DIR")
    if [ -n "$CONTAINER_MOUNTS" ]; then
        SRUN+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
fi

# Runs on each node: the node rank is that node's SLURM_NODEID (static rendezvous keeps the node
# order, unlike c10d). --shutdown-timeout (newer torch) gives ranks time to save after a signal.
# shellcheck disable=SC2016  # expanded by the bash on each node, not here
NODE_CMD='cd "$1" && shift
torchrun=$1 && shift
extra=()
if "$torchrun" --help 2>/dev/null | grep -q -- --shutdown-timeout; then extra+=(--shutdown-timeout="$SHUTDOWN_SECONDS"); fi
exec "$torchrun" --node_rank="$SLURM_NODEID" "${extra[@]}" "$@"'

# Set before srun starts: an untrapped SIGUSR1 would end this shell at once.
SAVE_AND_REQUEUE=0
# shellcheck disable=SC2329  # called by the traps below
on_usr1() {
    if [ "$SAVE_AND_REQUEUE" = 0 ]; then
        SAVE_AND_REQUEUE=1
        echo "launch.sh: SIGUSR1: asking every rank to save a checkpoint and exit, then requeueing job $SLURM_JOB_ID"
        scancel --signal=TERM "$SLURM_JOB_ID" || true  # the job's steps, not this shell
    fi
}
# shellcheck disable=SC2329
on_term() {
    echo "launch.sh: SIGTERM: waiting for the ranks to save and exit"
}
trap on_usr1 USR1
trap on_term TERM

export SHUTDOWN_SECONDS
"${SRUN[@]}" bash -c "$NODE_CMD" node-launch "$NEON_DIR" "$TORCHRUN" \
    --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --log-dir="$LOG_DIR" --redirects=3 --tee=3 \
    "$TRAIN_SCRIPT" "$@" &
SRUN_PID=$!


# `wait` returns early when a trapped signal arrives: keep waiting until srun has exited.
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID" || true
done
rc=0
wait "$SRUN_PID" || rc=$?

if [ "$SAVE_AND_REQUEUE" = 1 ]; then
    echo "launch.sh: ranks exited ($rc) after the save request; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "launch.sh: training exited with status $rc"
exit "$rc"
