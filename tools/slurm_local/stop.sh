#!/usr/bin/env bash
# Stops the cluster that start.sh started in STATE_DIR: cancels every job first (killing the
# daemons alone would leave slurmstepd and the jobs' processes running), then the daemons by
# their pid files. Safe to run on a half-started or already stopped cluster.
set -uo pipefail

STATE_DIR=${1:?usage: stop.sh STATE_DIR}
STOP_TIMEOUT=${SLURM_LOCAL_STOP_TIMEOUT:-90}
export SLURM_CONF=$STATE_DIR/slurm.conf

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$1" ] && cat "$1"; }

ctld_pid=$(pid_of "$STATE_DIR/slurmctld.pid")
if [ -f "$SLURM_CONF" ] && pid_alive "$ctld_pid"; then
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
    if [ "${#jobs[@]}" -gt 0 ]; then
        echo "stop.sh: cancelling jobs ${jobs[*]}" >&2
        scancel "${jobs[@]}" 2>/dev/null
        deadline=$((SECONDS + STOP_TIMEOUT))
        while [ -n "$(squeue -h -t all -o %A -t R,CG,CF,PD,RQ,S 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 1
        done
    fi
fi

stop_daemon() {  # pid file
    local pid
    pid=$(pid_of "$1") || return 0
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$1"
}

for node in n1 n2; do
    stop_daemon "$STATE_DIR/slurmd-$node.pid"
done
stop_daemon "$STATE_DIR/slurmctld.pid"
stop_daemon "$STATE_DIR/munged.pid"
echo "stop.sh: cluster in $STATE_DIR stopped" >&2
