"""The suite's markers hold: a test that starts MPI without the ``mpi`` marker is failed."""
import pytest

from tests import mpi_util


class _Node:
    nodeid = "tests/test_x.py::test_y"

    def __init__(self, *markers):
        self._markers = set(markers)

    def get_closest_marker(self, name):
        return name if name in self._markers else None


def test_a_launch_from_an_unmarked_test_fails_naming_the_marker():
    mpi_util.CURRENT_TEST[0] = _Node("slow")      # tests/conftest.py clears it after the test
    with pytest.raises(pytest.fail.Exception, match=r"test_x.py::test_y starts an MPI job: mark it @pytest.mark.mpi"):
        mpi_util.run_mpi(1, ["-c", "pass"])


def test_a_marked_test_may_ask_for_mpirun():
    mpi_util.CURRENT_TEST[0] = _Node("mpi")
    assert mpi_util.mpirun_available() in (True, False)


def test_the_markers_are_registered(pytestconfig):
    registered = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"mpi", "netns", "slurm", "slow"} <= registered
