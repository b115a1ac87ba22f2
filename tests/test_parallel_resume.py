"""Checkpoint/resume through the Trainer under real MPI (2 ranks).

Resume is exact under BSP: 2N steps straight equal N steps, a stop, and a resumed run of N
more (loss of every step, dense weights, every embedding row), data position included (the
Criteo reader's position is saved and restored). Under SSP the pipeline is fenced for
mid-run checkpoints and a resumed run continues from the last one.
"""
import glob
import os

import numpy as np
import pytest

from tests.mpi_util import REPO, load_dumped_state as _state, load_summary as _summary, run_mpi

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume")
    run_mpi(2, [os.path.join(REPO, "tests", "parallel", "resume_scenarios.py"), directory], timeout=400)
    return str(directory)


def test_bsp_resume_is_exact(out):
    straight, first, second = (_summary(out, n) for n in ("straight", "split-1", "split-2"))
    n = first["steps"]
    assert second["first_step"] == n and straight["first_step"] == 0
    assert first["loss_trajectory"] + second["loss_trajectory"] == straight["loss_trajectory"]
    weights_a, rows_a = _state(os.path.join(out, "straight"))
    weights_b, rows_b = _state(os.path.join(out, "split"))
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    assert rows_a.keys() == rows_b.keys() and len(rows_a) > 100
    for key, (value, slots) in rows_a.items():
        np.testing.assert_array_equal(value, rows_b[key][0])
        np.testing.assert_array_equal(slots, rows_b[key][1])
    assert second["table_counters"] == straight["table_counters"]


def test_ssp_checkpoints_at_fences_and_resumes(out):
    first, second = _summary(out, "ssp-1"), _summary(out, "ssp-2")
    checkpoints = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt-ssp", "ckpt-*")))
    # mid-run fences at 3 and 6, the end of the first run at 7, the resumed run's end at 10; keep 3
    assert checkpoints == ["ckpt-0000000006", "ckpt-0000000007", "ckpt-0000000010"]
    assert second["first_step"] == first["steps"] == 7
    assert len(second["loss_trajectory"]) == 3 and second["staleness_max"] <= 1
    assert second["row_grads_pushed"] == second["row_grads_applied"]
