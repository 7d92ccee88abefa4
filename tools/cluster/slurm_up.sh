#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, to run and test the submitit launcher.
#
#   bash tools/cluster/slurm_up.sh [STATE]       # as root; installs slurmctld, slurmd and munge (apt) if missing
#   export SLURM_CONF=STATE/slurm.conf           # sbatch, squeue, scontrol and submitit find the cluster
#   bash tools/cluster/slurm_down.sh [STATE]
#
# munged, slurmctld and one slurmd per node run as root from STATE (default /tmp/tiled_hydra_slurm):
# their own munge key and socket, config, spool, logs and pid files, so nothing in /etc is changed
# and a system SLURM or munge is left alone. No systemd and no cgroups: processes are tracked by
# parent pid (proctrack/linuxproc), tasks are not bound (task/none). Two nodes, n1 and n2, each a
# slurmd with its own port and SLURM_CPUS_PER_NODE CPUs (default 1); Debian's slurmd runs several
# on one host. Ports: SLURM_PORT (default 16817) for slurmctld, the next ones for the slurmds.
# There is no accounting database (slurmdbd): sacct answers "accounting storage is disabled";
# submitit then reads each job's result from its folder.
set -euo pipefail

STATE=$(realpath -m "${1:-/tmp/tiled_hydra_slurm}")
PORT=${SLURM_PORT:-16817}
CPUS=${SLURM_CPUS_PER_NODE:-1}
NODES=${SLURM_NODES:-2}
HOST=$(hostname -s)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    echo "installing slurmctld, slurmd, slurm-client and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
if [[ -f "$STATE/run/slurmctld.pid" ]] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null; then
    echo "a cluster is already running in $STATE (bash tools/cluster/slurm_down.sh $STATE)" >&2
    exit 1
fi

mkdir -p "$STATE"/{munge,log,run,spool/ctld}
chmod 700 "$STATE/munge"
[[ -f "$STATE/munge/munge.key" ]] || head -c 1024 /dev/urandom > "$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
SOCKET="$STATE/munge/munge.socket"

node_names=()
for ((k = 1; k <= NODES; k++)); do node_names+=("n$k"); done
all_nodes=$(IFS=,; echo "${node_names[*]}")

{
    cat <<EOF
# Written by tools/cluster/slurm_up.sh: a local test cluster.
ClusterName=tiledhydra
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued or cancelled job's processes get SIGTERM, then SIGKILL after KillWait seconds.
KillWait=5
SlurmdTimeout=60
MinJobAge=3600
EOF
    for ((k = 1; k <= NODES; k++)); do
        echo "NodeName=n$k NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + k)) CPUs=$CPUS RealMemory=4096 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$all_nodes Default=YES MaxTime=INFINITE State=UP"
} > "$STATE/slurm.conf"
export SLURM_CONF="$STATE/slurm.conf"

munged --force --socket="$SOCKET" --key-file="$STATE/munge/munge.key" --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
slurmctld -f "$SLURM_CONF"
for node in "${node_names[@]}"; do
    mkdir -p "$STATE/spool/$node"
    slurmd -f "$SLURM_CONF" -N "$node"
done

# Ready when every node is idle.
for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o "%N" 2>/dev/null | sort -u | wc -l)
    [[ "$idle" -ge "$NODES" ]] && break
    sleep 1
done
sinfo -N -o "%N %T %c %P"
if [[ "$idle" -lt "$NODES" ]]; then
    echo "only $idle of $NODES nodes came up idle; see $STATE/log/" >&2
    exit 1
fi
echo "SLURM cluster up: export SLURM_CONF=$SLURM_CONF"
