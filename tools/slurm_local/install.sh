#!/usr/bin/env bash
# Installs what the local test cluster needs from Debian's packages: Slurm's controller
# (slurmctld), node daemon (slurmd), client commands (sbatch, srun, scontrol, ...) and munge.
# Nothing is started here (see start.sh). Safe to run again: returns at once when installed.
#
# Exit codes: 0 installed, 10 not root, 11 no apt-get (the test suite skips on these two),
# anything else: apt failed.
set -euo pipefail

have_all() {
    command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged && command -v mungekey
} >/dev/null 2>&1

if have_all; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: Slurm is not installed and installing it needs root (run: sudo $0)" >&2
    exit 10
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: Slurm is not installed and there is no apt-get to install it with;" \
        "install slurmctld, slurmd, the Slurm client commands and munge by hand" >&2
    exit 11
fi

export DEBIAN_FRONTEND=noninteractive
echo "install.sh: apt-get update" >&2
apt-get update -q
echo "install.sh: apt-get install slurmctld slurmd slurm-client munge" >&2
# policy-rc.d may print "denied execution of start": harmless, start.sh runs the daemons itself.
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
have_all || { echo "install.sh: packages installed but a Slurm or munge command is still missing" >&2; exit 1; }
