#!/usr/bin/env bash
# Starts a W&B sweep agent for a sweep made from examples/sweeps/ (on a cloud VM, a cluster node,
# or inside the Neon container):
#
#   wandb sweep --project neon-flaming examples/sweeps/flaming_moe_global_bank.yaml
#   tools/wandb_agent.sh ENTITY/PROJECT/SWEEP_ID [--count N]
#
# The API key is read ONLY from the environment (WANDB_API_KEY) or from a file that only its
# owner can read (WANDB_API_KEY_FILE, default ~/.config/wandb/api_key; chmod 600). It is never
# taken as an argument: arguments are visible to every user of the machine (ps, /proc).
# A key file that the group or others can read, or that another user owns, is refused.
#
# The agent runs from the Neon checkout this script lives in (NEON_DIR to change it), so the
# sweeps' commands (bash examples/sweeps/run.sh pretrain_neon.py ...) find their files.
set -euo pipefail

usage() {
    echo "usage: $0 ENTITY/PROJECT/SWEEP_ID [--count N]   (API key from WANDB_API_KEY or WANDB_API_KEY_FILE)" >&2
    exit 2
}
[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; esac
for arg in "$@"; do
    case "$arg" in
        *[Kk][Ee][Yy]*)
            echo "wandb_agent.sh: refusing argument '${arg%%=*}...': pass the API key in WANDB_API_KEY or a" \
                "key file (WANDB_API_KEY_FILE), never on the command line" >&2
            exit 2
            ;;
    esac
done

if [ -z "${WANDB_API_KEY:-}" ]; then
    KEY_FILE=${WANDB_API_KEY_FILE:-$HOME/.config/wandb/api_key}
    if [ ! -f "$KEY_FILE" ]; then
        echo "wandb_agent.sh: no API key: set WANDB_API_KEY, or put the key in $KEY_FILE" \
            "(chmod 600) or in the file named by WANDB_API_KEY_FILE" >&2
        exit 3
    fi
    mode=$(stat -L -c %a "$KEY_FILE")
    owner=$(stat -L -c %u "$KEY_FILE")
    if [ "$owner" != "$(id -u)" ]; then
        echo "wandb_agent.sh: refusing $KEY_FILE: owned by uid $owner, not by you ($(id -u))" >&2
        exit 4
    fi
    if [ $((8#$mode & 8#077)) -ne 0 ]; then
        echo "wandb_agent.sh: refusing $KEY_FILE: mode $mode lets the group or others read it;" \
            "fix: chmod 600 $KEY_FILE" >&2
        exit 4
    fi
    WANDB_API_KEY=$(tr -d '[:space:]' <"$KEY_FILE")
    if [ -z "$WANDB_API_KEY" ]; then
        echo "wandb_agent.sh: $KEY_FILE is empty" >&2
        exit 3
    fi
    echo "wandb_agent.sh: API key read from $KEY_FILE" >&2
else
    echo "wandb_agent.sh: API key taken from WANDB_API_KEY" >&2
fi
export WANDB_API_KEY

NEON_DIR=${NEON_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$NEON_DIR"
if [ -n "${WANDB_AGENT_DRY_RUN:-}" ]; then  # for tests: show what would run, do not contact W&B
    echo "wandb_agent.sh: would run in $NEON_DIR with a ${#WANDB_API_KEY}-character key: wandb agent $*"
    exit 0
fi
exec wandb agent "$@"
