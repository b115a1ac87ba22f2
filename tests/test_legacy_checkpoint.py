"""A checkpoint written by an older hybridps (tests/data/legacy_checkpoint_v1) still restores.

The checkpoint was written on 2 ranks after 3 of 6 steps by the code before the redesign; the
same run's final state (``--dump-state`` after step 6) and loss trajectory were saved beside it
(see the README there). Resuming it and training the remaining 3 steps must reproduce that
state: BSP resume is exact up to floating-point reassociation. (On 2 ranks: table 0 admits keys
after 2 hits, and a key's hits are counted once per rank and step, so admission, and with it
the training, differs between 1 and 2 ranks.) ``hybridps inspect`` verifies every file.
"""
import json
import os
import shutil

import numpy as np
import pytest

from tests.mpi_util import REPO, load_dumped_state, run_mpi

pytestmark = pytest.mark.mpi

DATA = os.path.join(REPO, "tests", "data", "legacy_checkpoint_v1")
RTOL = 1e-5


def test_legacy_checkpoint_resumes_and_reproduces_the_old_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(DATA, "ckpt"), ckpt)
    inspect = run_mpi(1, ["-m", "hybridps.cli", "inspect", ckpt / "ckpt-0000000003"], timeout=120)
    assert "verification (every sha256): OK" in inspect.stdout
    # the old run's dense optimizer was the default of its day: its sparse optimizer and rate
    proc = run_mpi(2, ["-m", "hybridps.cli", "train", "--config", os.path.join(DATA, "legacy.yaml"),
                       "--dense-optimizer", "adagrad", "--dense-learning-rate", "0.05",
                       "--checkpoint-dir", ckpt, "--resume",
                       "--dump-state", tmp_path / "dump", "--metrics-out", tmp_path / "m.json",
                       "--no-progress"], timeout=300)
    assert "resumed from" in proc.stderr and "step 3" in proc.stderr
    with open(os.path.join(DATA, "metrics.json")) as fh:
        old = json.load(fh)
    with open(tmp_path / "m.json") as fh:
        new = json.load(fh)
    assert new["first_step"] == 3 and new["global_batch_size"] == old["global_batch_size"] == 32
    np.testing.assert_allclose(new["loss_trajectory"], old["loss_trajectory"][3:], rtol=RTOL)
    old_weights, old_rows = load_dumped_state(os.path.join(DATA, "dump"))
    new_weights, new_rows = load_dumped_state(tmp_path / "dump")
    assert len(old_weights) == len(new_weights)
    for a, b in zip(new_weights, old_weights):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)
    assert new_rows.keys() == old_rows.keys() and len(old_rows) > 100
    for key, (value, slots) in old_rows.items():
        np.testing.assert_allclose(new_rows[key][0], value, rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(new_rows[key][1], slots, rtol=RTOL, atol=1e-7)
    # admission candidates (min_count 2 on table 0) and counters came back too
    assert new["table_counters"] == old["table_counters"]
