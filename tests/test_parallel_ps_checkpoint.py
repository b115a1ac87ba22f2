"""Checkpoints of the parameter-server mode and across modes, under real MPI.

One job of 2 ranks runs tests/parallel/ps_checkpoint_scenarios.py: a collective BSP run on 1
rank is the reference; PS mode runs 1 server + 1 worker (the same computing rank and batches).
Under BSP the two modes compute the same arithmetic (tests/test_parallel_ps.py), so:

* a PS run resumed from its own checkpoint equals the PS run that never stopped, exactly;
* a collective checkpoint resumed in PS mode, and a PS checkpoint resumed in collective mode,
  continue the reference run (losses, dense weights and every row and slot);
* the checkpoint PS mode writes mid-run (servers and workers meet at a consistent point) holds
  the same dense weights, Keras dense optimizer variables and rows as the collective one.

The dense optimizer is Adam: its two slots per variable and step count exercise the layout
conversion between the servers' numpy state and Keras. Numpy's and Keras' Adam round
differently in float32 (a few ulp per step), hence the tolerances across modes.
"""
import glob
import os

import numpy as np
import pytest

from tests.mpi_util import REPO, load_dumped_state, load_summary, run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = os.path.join(REPO, "tests", "parallel", "ps_checkpoint_scenarios.py")
HALF = 4
DENSE_TOL = dict(rtol=1e-4, atol=1e-5)     # Adam across numpy and Keras
ROW_TOL = dict(rtol=1e-5, atol=1e-6)       # sparse rows: the same Cython kernel in both modes


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ps_ckpt")
    run_mpi(2, [SCRIPT, directory], timeout=600)      # parts on 1, 2, then 1 of its ranks
    return str(directory)


def _assert_same_state(run_a, run_b, dense_tol, row_tol):
    weights_a, rows_a = load_dumped_state(run_a)
    weights_b, rows_b = load_dumped_state(run_b)
    assert len(weights_a) == len(weights_b) > 0
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, **dense_tol)
    assert rows_a.keys() == rows_b.keys() and len(rows_a) > 100
    keys = sorted(rows_a)
    np.testing.assert_allclose(np.stack([rows_a[k][0] for k in keys]), np.stack([rows_b[k][0] for k in keys]), **row_tol)
    np.testing.assert_allclose(np.stack([rows_a[k][1] for k in keys]), np.stack([rows_b[k][1] for k in keys]), **row_tol)


def test_ps_resume_is_exact(out):
    straight, resumed = load_summary(out, "ps-straight"), load_summary(out, "ps-from-ps")
    assert straight["mode"] == resumed["mode"] == "ps" and resumed["first_step"] == HALF
    assert any("resumed from" in m and f"step {HALF}" in m for m in resumed["resume_messages"])
    assert resumed["loss_trajectory"] == straight["loss_trajectory"][HALF:]
    exact = dict(rtol=0, atol=0)
    _assert_same_state(os.path.join(out, "ps-from-ps"), os.path.join(out, "ps-straight"), exact, exact)
    assert resumed["row_grads_pushed"] == resumed["row_grads_applied"] > 0


@pytest.mark.parametrize("name", ["ps-from-col", "col-from-ps"])
def test_resume_across_modes_continues_the_reference(out, name):
    reference, resumed = load_summary(out, "col-straight"), load_summary(out, name)
    assert resumed["first_step"] == HALF and resumed["mode"] == ("ps" if name.startswith("ps") else "collective")
    np.testing.assert_allclose(resumed["loss_trajectory"], reference["loss_trajectory"][HALF:], rtol=1e-5)
    _assert_same_state(os.path.join(out, name), os.path.join(out, "col-straight"), DENSE_TOL, ROW_TOL)
    # the second half moved the state, so agreeing at its end is not trivial
    half_weights, _ = load_dumped_state(os.path.join(out, "col-half"))
    final_weights, _ = load_dumped_state(os.path.join(out, "col-straight"))
    assert not np.allclose(half_weights[0], final_weights[0], **DENSE_TOL)


def _dense_names(manifest):
    """The saved model and optimizer variable names (hybridps's own, by position)."""
    dense = manifest["dense"]
    return ([v["name"] for v in dense["model_variables"]],
            [v["name"] for v in dense["optimizer"]["variables"]])


def test_mid_run_ps_checkpoint_matches_the_collective_one(out):
    from hybridps import checkpoint as ckpt
    ps_dir = os.path.join(out, "ckpt-ps-straight", ckpt.checkpoint_name(HALF))
    col_dir = os.path.join(out, "ckpt-col-straight", ckpt.checkpoint_name(HALF))
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt-ps-straight", "ckpt-*"))) == \
        [ckpt.checkpoint_name(HALF), ckpt.checkpoint_name(2 * HALF)]
    assert ckpt.verify_checkpoint(ps_dir) == []
    ps_manifest, col_manifest = ckpt.load_manifest(ps_dir), ckpt.load_manifest(col_dir)
    assert ps_manifest["mode"] == "ps" and ps_manifest["world_size"] == 2
    assert ps_manifest["data_state"][0] == col_manifest["data_state"][0]   # the worker's position
    assert ps_manifest["data_state"][1] is None                            # the server reads no data
    ps_model, ps_opt = ckpt.read_dense(ps_dir, ps_manifest)
    col_model, col_opt = ckpt.read_dense(col_dir, col_manifest)
    model_names, optimizer_names = _dense_names(col_manifest)
    assert _dense_names(ps_manifest) == (model_names, optimizer_names)
    assert optimizer_names == ["iteration"] + [f"{slot}_{k:04d}" for k in range(len(model_names))
                                               for slot in ("m", "v")]    # Adam, DeepFM: all trainable
    assert int(ps_opt[0]) == int(col_opt[0]) == HALF                       # Adam's step count
    for a, b in zip(ps_model + ps_opt[1:], col_model + col_opt[1:]):
        np.testing.assert_allclose(a, b, **DENSE_TOL)
    for t in range(len(col_manifest["tables"])):
        ps_rows = ckpt.read_table_rows(ps_dir, ps_manifest, t)
        col_rows = ckpt.read_table_rows(col_dir, col_manifest, t)
        order_ps, order_col = np.argsort(ps_rows["keys"]), np.argsort(col_rows["keys"])
        np.testing.assert_array_equal(ps_rows["keys"][order_ps], col_rows["keys"][order_col])
        for kind in ("values", "slots"):
            np.testing.assert_allclose(ps_rows[kind][order_ps], col_rows[kind][order_col], **ROW_TOL)
        for kind in ("hits", "update_count", "last_update_step"):
            np.testing.assert_array_equal(ps_rows[kind][order_ps], col_rows[kind][order_col])
    # in PS mode the server (rank 1) writes every row; the worker's shard is empty
    assert ps_manifest["tables"][0]["rows_per_rank"][0] == 0 < ps_manifest["tables"][0]["rows_per_rank"][1]
