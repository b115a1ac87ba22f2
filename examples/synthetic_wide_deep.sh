#!/usr/bin/env bash
# Wide&Deep on the synthetic generator (Zipf IDs, planted model), 2 ranks, one table per field.
# Run from the repo root after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 HYBRIDPS_TF_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hybridps train --model wide_deep \
  --data synthetic --table-layout per_field --steps "${STEPS:-100}" --batch-size 1024 \
  --metrics-out synthetic-wide-deep-metrics.json
