#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, for mifo's Slurm tests and for trying
# `mifo engine start --executor slurm` without a real cluster.
#
# What it does, in order (each step is skipped when already done, so running it twice is safe):
#   1. installs Debian's `slurm-wlm` and `munge` packages when `sbatch` is absent (needs root or sudo);
#   2. creates a munge key and starts `munged` (Slurm's authentication daemon);
#   3. writes /etc/slurm/slurm.conf for one node named after this host, with all its CPUs, one
#      partition `debug`, the linuxproc process tracker and no task plugin (nothing needs cgroups);
#   4. starts `slurmctld` (the controller) and `slurmd` (the node daemon), both as root;
#   5. waits until `sinfo` reports the node idle (or mixed/allocated: already in use).
# Jobs run as the user who submits them. Stop it with: pkill slurmd; pkill slurmctld; pkill munged.
set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
conf=/etc/slurm/slurm.conf
node="$(hostname -s)"
cpus="$(nproc)"

# 1. Packages.
if ! command -v sbatch >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1; then
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. Munge: a key readable only by the munge user, and its daemon.
if [ ! -s /etc/munge/munge.key ]; then
    $sudo mkdir -p /etc/munge
    $sudo dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$sudo chown munge:munge /etc/munge/munge.key
$sudo chmod 400 /etc/munge/munge.key
$sudo mkdir -p /run/munge /var/log/munge /var/lib/munge
$sudo chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
    $sudo -u munge /usr/sbin/munged 2>/dev/null || $sudo runuser -u munge -- /usr/sbin/munged
fi

# 3. slurm.conf: one node, one partition.
$sudo mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
want="$(cat <<CONF
# Written by mifo's scripts/slurm-local.sh: a one-node cluster on this machine.
ClusterName=mifo-local
SlurmctldHost=${node}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=30
NodeName=${node} CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
)"
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
    printf '%s\n' "$want" | $sudo tee "$conf" >/dev/null
    # A running cluster rereads its configuration.
    if pgrep -x slurmctld >/dev/null; then $sudo scontrol reconfigure || true; fi
fi

# 4. Daemons.
pgrep -x slurmctld >/dev/null || $sudo /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || $sudo /usr/sbin/slurmd

# 5. Wait for the node.
for _ in $(seq 1 60); do
    state="$(sinfo -h -n "$node" -o '%T' 2>/dev/null || true)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) echo "slurm-local: node ${node} ${state}"; exit 0 ;;
        down*|drain*) $sudo scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm-local: node ${node} did not become ready (sinfo: ${state:-no answer}); see /var/log/slurm/" >&2
exit 1
