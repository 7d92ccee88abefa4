#!/usr/bin/env bash
# Stop the local SLURM cluster of tools/cluster/slurm_up.sh: its slurmds, slurmctld and munged,
# by the pids in STATE/run (nothing else on the machine is signalled).
#   bash tools/cluster/slurm_down.sh [STATE]
set -uo pipefail

STATE=$(realpath -m "${1:-/tmp/tiled_hydra_slurm}")
export SLURM_CONF="$STATE/slurm.conf"
# Jobs first: a slurmd that is stopped leaves its jobs' slurmstepd processes running.
if [[ -f "$STATE/run/slurmctld.pid" ]] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null
    for _ in $(seq 30); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 1; done
fi
# Any step daemon still serving this cluster (its socket lives in STATE/spool) is killed.
python3 - "$STATE" <<'PY'
import sys, psutil
state = sys.argv[1]
for proc in psutil.process_iter(["name"]):
    try:
        if (proc.info["name"] or "").startswith("slurmstepd") and any(
                (c.laddr or "").startswith(state) for c in proc.net_connections(kind="unix")):
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
    except psutil.Error:
        pass
PY
pids=()
# slurmds first (they kill their jobs' steps), then the controller, then munge.
for file in "$STATE"/run/slurmd.*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
    [[ -f "$file" ]] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" && pids+=("$pid")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
done
echo "stopped ${#pids[@]} daemons${pids:+ (${pids[*]})}"
