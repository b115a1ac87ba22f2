"""Checkpoints written under one TensorFlow stack restore under the other (tests/fixtures/tf_stacks).

The fixtures were written by tests/fixtures/tf_stacks/write_fixtures.sh under TF 2.15 (Keras 2,
numpy 1.26; ``tf2.15/``) and TF 2.18 (Keras 3, numpy 2; ``tf2.18/``): a collective run on 2
ranks and a PS run (1 worker, 1 server) of stack.yaml (DeepFM, Adam), each keeping its
checkpoint after step 3 of 6, its ``--dump-state`` after step 6 and its metrics. Whatever stack
runs these tests restores every fixture:

* fast: the manifests name variables alike on both stacks and in both modes (hybridps's
  position names), and the dense weights and Adam state load into this stack's model and Keras
  optimizer with the values dense.npz holds (read here with numpy);
* mpi: resuming each fixture for the remaining 3 steps reproduces the writing stack's loss
  trajectory and final state (--dump-state), up to float32 rounding.
"""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from tests.mpi_util import REPO, load_dumped_state, run_mpi

FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_stacks")
STACKS = ("tf2.15", "tf2.18")
MODES = ("collective", "ps")
CASES = [(stack, mode) for stack in STACKS for mode in MODES]
HALF = 3
# Another TensorFlow build computes the gradients (float32 rounding differs by a few ulp), and
# the dense update is Keras 2's, Keras 3's or numpy's (PS servers) Adam: rows and weights agree
# up to that rounding.
TOL = dict(rtol=1e-4, atol=1e-6)


def _ckpt_dir(stack, mode):
    return os.path.join(FIXTURES, stack, mode, "ckpt", f"ckpt-{HALF:010d}")


def _manifest(stack, mode):
    with open(os.path.join(_ckpt_dir(stack, mode), "manifest.json")) as fh:
        return json.load(fh)


def _names_and_shapes(manifest):
    dense = manifest["dense"]
    return ([(v["name"], v["shape"]) for v in dense["model_variables"]],
            [(v["name"], v["shape"]) for v in dense["optimizer"]["variables"]])


def test_manifests_name_variables_alike_on_both_stacks_and_modes():
    from hybridps.dense.optimizer_state import state_names
    reference = _names_and_shapes(_manifest("tf2.15", "collective"))
    model, optimizer = reference
    assert [name for name, _ in model] == [f"model_{i:04d}" for i in range(len(model))]
    assert [name for name, _ in optimizer] == state_names("adam", len(model))   # DeepFM: all trainable
    for stack, mode in CASES:
        manifest = _manifest(stack, mode)
        assert manifest["mode"] == mode and manifest["step"] == HALF
        assert _names_and_shapes(manifest) == reference, (stack, mode)


@pytest.mark.parametrize("stack, mode", CASES)
def test_fixture_restores_dense_state_on_this_stack(stack, mode):
    from hybridps import checkpoint as ckpt
    from hybridps.dense.optimizer_state import optimizer_state
    from hybridps.dense.sync import make_dense_optimizer
    from hybridps.export.saved_model import build_model_from_manifest
    from hybridps.tf_compat import model_weights
    from hybridps._hashtable import EmbeddingHashTable
    path = _ckpt_dir(stack, mode)
    assert ckpt.verify_checkpoint(path) == []
    manifest = ckpt.load_manifest(path)
    model, _ = build_model_from_manifest(manifest)
    optimizer = make_dense_optimizer("adam", 0.01)
    tables = [EmbeddingHashTable(dim=t["dim"], optimizer="adam", learning_rate=0.01, seed=5,
                                 table_id=i, min_count=1) for i, t in enumerate(manifest["tables"])]
    report = ckpt.restore_checkpoint(path, tables=tables, model=model, optimizer=optimizer)
    assert report.step == HALF
    with np.load(os.path.join(path, "dense.npz")) as saved:
        model_values = [saved[f"model_{i:04d}"] for i in range(len(manifest["dense"]["model_variables"]))]
        opt_values = [saved[f"optimizer_{i:04d}"]
                      for i in range(len(manifest["dense"]["optimizer"]["variables"]))]
    weights = model_weights(model)
    assert len(weights) == len(model_values)
    for variable, value in zip(weights, model_values):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert int(optimizer.iterations.numpy()) == int(opt_values[0]) == HALF
    restored = optimizer_state(optimizer, model.trainable_variables)
    assert len(restored) == len(opt_values)
    for a, b in zip(restored, opt_values):
        np.testing.assert_array_equal(a, b)
    assert sum(t.size for t in tables) == sum(t["rows"] for t in manifest["tables"]) > 0


@pytest.mark.mpi
@pytest.mark.parametrize("stack, mode", CASES)
def test_fixture_resumes_and_reproduces_the_writing_stacks_run(tmp_path, stack, mode):
    source = os.path.join(FIXTURES, stack, mode)
    shutil.copytree(os.path.join(source, "ckpt"), tmp_path / "ckpt")
    proc = run_mpi(2, ["-m", "hybridps.cli", "train", "--config", os.path.join(FIXTURES, "stack.yaml"),
                       "--mode", mode, "--checkpoint-dir", tmp_path / "ckpt", "--resume",
                       "--dump-state", tmp_path / "dump", "--metrics-out", tmp_path / "m.json",
                       "--no-progress"], timeout=300)
    assert "resumed from" in proc.stderr
    with open(os.path.join(source, "metrics.json")) as fh:
        old = json.load(fh)
    with open(tmp_path / "m.json") as fh:
        new = json.load(fh)
    assert new["first_step"] == HALF and new["mode"] == mode
    np.testing.assert_allclose(new["loss_trajectory"], old["loss_trajectory"][HALF:], **TOL)
    old_weights, old_rows = load_dumped_state(os.path.join(source, "dump"))
    new_weights, new_rows = load_dumped_state(tmp_path / "dump")
    assert len(old_weights) == len(new_weights) > 0
    for a, b in zip(new_weights, old_weights):
        np.testing.assert_allclose(a, b, **TOL)
    assert new_rows.keys() == old_rows.keys() and len(old_rows) > 100
    for key, (value, slots) in old_rows.items():
        np.testing.assert_allclose(new_rows[key][0], value, **TOL)
        np.testing.assert_allclose(new_rows[key][1], slots, **TOL)
    assert not glob.glob(os.path.join(source, "ckpt", "ckpt-*6"))   # the fixture keeps step 3 only
