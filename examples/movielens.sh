#!/usr/bin/env bash
# Your own features and your own model on a CSV, 2 ranks: a MovieLens-style file (a user column,
# a movie column, a multi-hot genres column, a sequence of recently liked movies, dense columns),
# the schema in examples/movielens/config.yaml, the model in examples/movielens/model.py.
# Run from the repo root after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 HYBRIDPS_TF_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[ -f movielens.csv ] || .venv/bin/python examples/movielens/make_data.py movielens.csv
mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hybridps train \
  --config examples/movielens/config.yaml --steps "${STEPS:-300}" --metrics-out movielens-metrics.json
