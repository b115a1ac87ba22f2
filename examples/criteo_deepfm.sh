#!/usr/bin/env bash
# DeepFM on the bundled Criteo sample (200 rows), 2 ranks. Point --data at a full Criteo
# train.txt to train on real data. Run from the repo root after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 HYBRIDPS_TF_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
SAMPLE=$(.venv/bin/python -c "from hybridps.data import SAMPLE_CRITEO_CSV; print(SAMPLE_CRITEO_CSV)")
mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hybridps train --model deepfm \
  --data "${DATA:-$SAMPLE}" --steps "${STEPS:-30}" --batch-size 16 --dim 8 --hidden 32,16 \
  --learning-rate 0.05 --metrics-out criteo-deepfm-metrics.json
