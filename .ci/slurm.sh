#!/usr/bin/env bash
# Start (or stop) a one-node SLURM on this machine, as root, without systemd, for the tests
# marked `slurm`. Debian's slurmctld/slurmd/slurm-client/munge packages are installed if
# missing. Daemons are stopped by the PIDs this script records.
#
#   .ci/slurm.sh start      # install if needed, configure, start, wait until the node is idle
#   .ci/slurm.sh stop
set -euo pipefail

STATE=${HEPDASK_SLURM_STATE:-/tmp/hepdask-slurm}
CPUS=${HEPDASK_SLURM_CPUS:-4}
MEMORY_MB=${HEPDASK_SLURM_MEMORY_MB:-8000}

start() {
  if command -v sinfo >/dev/null && sinfo -h -o "%T" 2>/dev/null | grep -qxE "idle|mixed|allocated"; then
    echo "SLURM is already up:"; sinfo
    return 0
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$STATE"/{spool/ctld,spool/d,log,run} /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0700 /etc/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c munged 2>/dev/null || munged --force
  fi
  host=$(hostname -s)
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=hepdask-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=$host CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld
  slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qx idle; then
      sinfo
      return 0
    fi
    sleep 1
  done
  echo "SLURM did not become idle; logs:" >&2
  tail -n 30 "$STATE"/log/*.log >&2 || true
  return 1
}

stop() {
  for pidfile in "$STATE"/run/slurmd.pid "$STATE"/run/slurmctld.pid; do
    if [ -s "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
