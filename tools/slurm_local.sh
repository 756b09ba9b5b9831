#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for testing the sbatch launcher (launch/slurm.sbatch,
# tests/e2e/test_slurm.py). This host is both controller and the only compute node (partition `debug`); no
# accounting, no cgroups, no systemd needed. Needs root (Debian/Ubuntu: installs munge + slurm with apt).
# Idempotent: re-running installs nothing new, rewrites the config, and only starts daemons that are not running.
# cred_expire=30 (default 120): a requeued job may start again after about that long (tests/e2e/test_slurm.py
# waits for a requeued job to run).
#
#   sudo tools/slurm_local.sh && sbatch --wait launch/slurm.sbatch --config configs/quickstart.yaml
set -euo pipefail
[[ $(id -u) -eq 0 ]] || { echo "slurm_local.sh: needs root" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client
fi

# munge: shared key (one node, so any key will do) and its daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || runuser -u munge -- munged

HOST=$(hostname -s)
MEM_MB=$(($(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >/etc/slurm/slurm.conf.new <<EOF
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=30
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=${HOST} CPUs=$(nproc) RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF

changed=0
cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf || changed=1
mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf

running() { pgrep -x -r R,S,D "$1" >/dev/null; } # zombies of an earlier start do not count
if ((changed)) && running slurmctld; then # restart: some settings (AuthInfo) are read only when a daemon starts
  scontrol shutdown || true                 # jobs' processes (slurmstepd) keep running
  for _ in $(seq 30); do
    running slurmctld || running slurmd || break
    sleep 1
  done
fi
running slurmctld || slurmctld
running slurmd || slurmd

for _ in $(seq 60); do
  state=$(sinfo -h -n "${HOST}" -o %T 2>/dev/null || true)
  if [[ ${state} == idle* || ${state} == mixed* || ${state} == allocated* ]]; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "slurm_local.sh: node ${HOST} not idle after 60 s (state: ${state:-no answer}); see /var/log/slurm/" >&2
exit 1
