#!/usr/bin/env bash
# What tests/test_cluster.py (pytest -m cluster) and the local clusters of docs/cluster-ray.md and
# docs/cluster-slurm.md need: the package with its ray and slurm extras, and SLURM with munge
# from the distribution (Debian/Ubuntu, as root; no systemd needed: slurm_up.sh starts the daemons).
#   bash tools/cluster/install.sh && python -m pytest -n 0 -m cluster tests/test_cluster.py
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install -q -e ".[dev,ray,slurm]"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
echo "ray $(python -c 'import ray; print(ray.__version__)'), $(slurmd -V), munge $(munged -V 2>&1 | head -1 | awk '{print $2}')"
