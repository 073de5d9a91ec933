#!/usr/bin/env bash
# Starts a private Slurm cluster on this machine: munged, slurmctld and two slurmd "nodes"
# (n1, n2) on loopback, all state, logs and sockets under STATE_DIR. Used by the test suite
# (tests/launch/test_slurm.py) and handy to try the sbatch scripts in examples/slurm/ by hand:
#
#   tools/slurm_local/install.sh                # once, as root (Debian packages)
#   tools/slurm_local/start.sh /tmp/neon-slurm  # prints the SLURM_CONF to export
#   export SLURM_CONF=/tmp/neon-slurm/slurm.conf
#   sbatch -N2 --wait examples/slurm/pretrain_dense.sbatch
#   tools/slurm_local/stop.sh /tmp/neon-slurm
#
# Knobs (environment): SLURM_LOCAL_CTLD_PORT (controller port, default 16817),
# SLURM_LOCAL_NODE_PORT (n1 listens there, n2 on the next port; default 16818),
# SLURM_LOCAL_CPUS (CPUs each node claims, default 2), SLURM_LOCAL_KILL_WAIT (seconds between
# SIGTERM and SIGKILL when a job is cancelled, requeued or preempted; default 60),
# SLURM_LOCAL_CRED_EXPIRE (seconds a requeued job waits before it starts again; default 5).
set -euo pipefail

STATE_DIR=${1:?usage: start.sh STATE_DIR}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
NODE_PORT=${SLURM_LOCAL_NODE_PORT:-16818}
CPUS=${SLURM_LOCAL_CPUS:-2}
KILL_WAIT=${SLURM_LOCAL_KILL_WAIT:-60}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-5}
START_TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-60}

for cmd in munged mungekey slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; run tools/slurm_local/install.sh" >&2; exit 1; }
done
if [ -e "$STATE_DIR/slurmctld.pid" ]; then
    echo "start.sh: $STATE_DIR already holds a cluster; run stop.sh $STATE_DIR first" >&2
    exit 1
fi

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
HOST=$(hostname -s)
mkdir -p "$STATE_DIR"/{munge,ctld,log,spool/n1,spool/n2}
chmod 700 "$STATE_DIR/munge"

# munge: a fresh key and a private socket, so nothing clashes with a system munged.
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket
mungekey --create --force --keyfile="$STATE_DIR/munge/munge.key"
chmod 600 "$STATE_DIR/munge/munge.key"
munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
    --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munged.seed"

cat >"$STATE_DIR/slurm.conf" <<CONF
# Written by tools/slurm_local/start.sh: a two-node Slurm cluster on loopback for tests.
ClusterName=neonlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Finished jobs leave squeue after 5 s: sbatch --wait and the tests see the end sooner.
MinJobAge=5
# Schedule every 2 s (defaults: 60 s main loop, 30 s backfill): a requeued job starts soon after
# its BeginTime instead of up to a minute later.
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=$KILL_WAIT
JobRequeue=1
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORT CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((NODE_PORT + 1)) CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$STATE_DIR/slurm.conf
slurmctld -c -f "$SLURM_CONF"  # -c: start from a clean state (no jobs from an earlier cluster)
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2

# Ready when both nodes are idle.
deadline=$((SECONDS + START_TIMEOUT))
until [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$' || true)" = 2 ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "start.sh: the nodes did not become idle within ${START_TIMEOUT}s; logs in $STATE_DIR/log" >&2
        sinfo -N >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "export SLURM_CONF=$SLURM_CONF" >"$STATE_DIR/env.sh"
echo "start.sh: cluster up (nodes n1 n2); export SLURM_CONF=$SLURM_CONF"
