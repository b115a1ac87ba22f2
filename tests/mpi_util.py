"""Launch real MPI jobs from pytest, each under a timeout so a hang fails instead of blocking.

Oversubscribed runs on small machines need the settings of docs/clusters.md ("Running on a
small machine"); they are set here for every launch. Output is captured and returned for assertions.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MPI_ENV = {
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMP_NUM_THREADS": "1",
    "HYBRIDPS_TF_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PYTHONUNBUFFERED": "1",
}


# The test now running (set by tests/conftest.py), so a launch can check the test's markers.
CURRENT_TEST = [None]


def require_marker(name, what):
    """Fail the running test unless it carries marker NAME (what `make test-fast` selects on)."""
    node = CURRENT_TEST[0]
    if node is not None and node.get_closest_marker(name) is None:
        pytest.fail(f"{node.nodeid} {what}: mark it @pytest.mark.{name} (or `pytestmark = "
                    f"pytest.mark.{name}` in its module), so `make test-fast` leaves it out")


def mpirun_available():
    """Whether mpirun is on PATH; asked only by tests that start MPI jobs (marked ``mpi``)."""
    require_marker("mpi", "starts an MPI job")
    return shutil.which("mpirun") is not None


def run_mpi(num_ranks, args, timeout=240, check=True, env=None):
    """Run ``mpirun -np N python ARGS...``; returns the CompletedProcess.

    Raises a pytest failure with the job's output on a non-zero exit (when ``check``) or on a
    timeout (always: a hang is a failure).
    """
    require_marker("mpi", "starts an MPI job")
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    full_env = dict(os.environ, **MPI_ENV, **(env or {}))
    command = ["mpirun", "-np", str(num_ranks), "--oversubscribe", "--bind-to", "none",
               sys.executable] + [str(a) for a in args]
    try:
        proc = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"MPI job timed out after {timeout}s (hang?): {' '.join(command)}\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"MPI job failed with exit code {proc.returncode}: {' '.join(command)}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def load_summary(directory, name):
    """The metrics summary a scenario wrote to DIRECTORY/NAME.json."""
    import json
    with open(os.path.join(directory, f"{name}.json")) as fh:
        return json.load(fh)


def load_dumped_state(run_dir):
    """A Trainer's --dump-state output: (dense weights, {(table, key): (row, optimizer slots)}).

    Merges every rank's shard of every table; a key held by two shards fails the test.
    """
    import glob
    import numpy as np
    with np.load(os.path.join(run_dir, "dense.npz")) as dense:
        weights = [dense[f"arr_{i}"] for i in range(len(dense.files))]
    rows = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "table*.rank*.npz"))):
        table = os.path.basename(path).split(".")[0]
        with np.load(path) as shard:
            for key, value, slots in zip(shard["keys"].tolist(), shard["values"], shard["slots"]):
                assert (table, key) not in rows, f"key {key} of {table} held by two shards"
                rows[(table, key)] = (value, slots)
    return weights, rows
