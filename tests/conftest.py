"""pytest hooks of the whole suite: the markers that `make test-fast` selects on are held true.

A test that starts an MPI job through tests.mpi_util must carry the ``mpi`` marker (registered in
pytest.ini with ``netns``, ``slurm`` and ``slow``): tests.mpi_util refuses to launch for a test
without it, so `make test-fast` (``-m "not mpi and not netns and not slurm and not slow"``) never
starts one by accident. The running test is recorded before any of its fixtures is set up, so a
module-scoped fixture that launches jobs is checked against the test that first asks for it.
"""
from tests import mpi_util


def pytest_runtest_setup(item):
    mpi_util.CURRENT_TEST[0] = item


def pytest_runtest_teardown(item):
    mpi_util.CURRENT_TEST[0] = None
