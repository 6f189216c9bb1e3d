#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (as root), for the launcher tests and for trying
# launch/pretrain.sh without a real cluster. Debian's Slurm 22.05 with munge; CPU only.
# Usage: sudo launch/local_slurm.sh [start|stop]
set -euo pipefail

action=${1:-start}
conf_dir=/etc/slurm
host=$(hostname -s)

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
}

if [[ $action == stop ]]; then
    stop
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# munge authenticates every Slurm RPC; the Debian package ships no key on some images.
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force || /usr/sbin/munged --force

mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cpus=$(nproc)
# Leave some memory to the OS; Slurm refuses a node that reports less than RealMemory.
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
# Containers have no cgroup delegation: track processes by parent PID and do no task binding.
# (22.05 has no CgroupPlugin=disabled, so there must be no cgroup.conf either.)
cat >"$conf_dir/slurm.conf" <<CONF
ClusterName=retclip-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
rm -f "$conf_dir/cgroup.conf"

stop
slurmctld
slurmd
for _ in $(seq 30); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "local_slurm.sh: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
