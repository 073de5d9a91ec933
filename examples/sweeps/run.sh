#!/usr/bin/env bash
# One run of a W&B sweep: the `command` of every sweep in this folder starts this script with
# pretrain_neon.py and the run's parameters as Megatron-style flags (wandb's
# ${args_no_boolean_flags}), e.g.
#   bash examples/sweeps/run.sh pretrain_neon.py --config C.yaml --flaming-global-functions=16
# It gives each run its own directory (runs/sweeps/<sweep id>/<run id>: metrics, checkpoints,
# wandb files), logs to the sweep's W&B project, and starts torchrun on this machine.
#
# Environment (set by `wandb agent`): WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_PROJECT.
# Knobs: NPROC_PER_NODE (default: the GPUs nvidia-smi lists, else 1), SWEEP_RUNS_DIR (default
# runs/sweeps), SWEEP_EXTRA_ARGS (flags appended after the sweep's, e.g. a smaller --config or
# --data-path for a smoke test; later flags win).
set -euo pipefail

PROGRAM=${1:?usage: run.sh PROGRAM [flags...]}
shift
: "${WANDB_RUN_ID:?run.sh is started by wandb agent (tools/wandb_agent.sh), which sets WANDB_RUN_ID}"
: "${WANDB_PROJECT:?WANDB_PROJECT is not set (wandb agent sets it from the sweep)}"
SWEEP_ID=${WANDB_SWEEP_ID:-nosweep}
RUN_DIR=${SWEEP_RUNS_DIR:-runs/sweeps}/$SWEEP_ID/$WANDB_RUN_ID
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
mkdir -p "$RUN_DIR"
echo "run.sh: sweep $SWEEP_ID run $WANDB_RUN_ID: $NPROC_PER_NODE processes, run dir $RUN_DIR" >&2

# shellcheck disable=SC2086  # SWEEP_EXTRA_ARGS is split into flags on purpose
exec torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" "$PROGRAM" "$@" \
    --run-dir "$RUN_DIR" --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" \
    --wandb-project "$WANDB_PROJECT" --wandb-exp-name "$WANDB_RUN_ID" ${SWEEP_EXTRA_ARGS:-}
