#!/usr/bin/env bash
# Stop the local SLURM cluster of tools/cluster/slurm_up.sh: its slurmds, slurmctld and munged,
# by the pids in STATE/run (nothing else on the machine is signalled).
#   bash tools/cluster/slurm_down.sh [STATE]
set -uo pipefail

STATE=$(realpath -m "${1:-/tmp/tiled_hydra_slurm}")
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
