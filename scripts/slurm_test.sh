#!/usr/bin/env bash
# The Slurm integration test: installs Debian's Slurm + munge when missing (needs root and the Debian
# mirror), then runs tests/test_slurm.py, which starts a private one-node cluster on localhost,
# submits launch/slurm/*.sbatch (CPU ranks, tiny model), preempts and requeues them, tears it down.
#   bash scripts/slurm_test.sh [pytest args]        (~3-5 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/slurm_cluster.sh install
export WANDB_MODE=disabled
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m pytest -q -p no:cacheprovider -m slurm tests/test_slurm.py "$@"
