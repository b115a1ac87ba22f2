"""Checkpoints in one process: round trips (every optimizer, dense + Keras optimizer state),
the manifest and the on-disk layout, keep-last-K and the latest pointer, each kind of damage,
resume fallback, a save killed half-way, inspect, and SavedModel + delta export.

Expected values come from the tables' and models' own state before the save (exports,
variables), from hashlib over the files, and from an independent numpy splitmix64; the
exported model is checked against build_model + rows gathered by hand.
"""
import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from hybridps import checkpoint as ckpt
from hybridps.backends.base import BackendState
from hybridps.comm import SingleProcessComm
from hybridps.dense.optimizer_state import optimizer_state, state_names
from hybridps.tf_compat import model_weights
from hybridps.schema import build_schema
from hybridps.sparse import routing
from hybridps._hashtable import EmbeddingHashTable
from hybridps.config import config_hash, make_config
from hybridps.errors import CheckpointError, HybridPSError
from tests.mpi_util import REPO
from tests.reference import mix64_array as splitmix64

OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
EXPORT_KINDS = ("keys", "values", "slots", "hits", "last_update_step", "update_count")






def table_groups(config):
    """Field indices of each table of the Criteo preset (hybridps.schema)."""
    from hybridps.schema import criteo_field_groups
    return criteo_field_groups(config, config.num_fields)

def make_table(optimizer, dim=6, table_id=0, min_count=2):
    return EmbeddingHashTable(dim=dim, optimizer=optimizer, learning_rate=0.05, seed=5,
                              table_id=table_id, min_count=min_count)


def filled_table(optimizer, dim=6, table_id=0, n=3000, seed=0):
    """A table with admitted rows updated at several steps, candidates, and evictions."""
    rng = np.random.default_rng(seed)
    table = make_table(optimizer, dim, table_id)
    keys = np.unique(rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64))
    table.lookup_or_insert(keys, step=1)
    admitted = keys[: len(keys) * 3 // 4]
    table.lookup_or_insert(admitted, step=2)
    table.lookup_or_insert(admitted[:200], step=2)          # more hits on some keys
    for step in range(3, 8):
        touched = admitted[rng.random(len(admitted)) < 0.4]
        table.apply_gradients(touched, rng.standard_normal((len(touched), dim)).astype(np.float32),
                              step=step)
    table.evict_to_budget(max(table.size - 10, 0), "lfu")
    return table


def sorted_export(table):
    out = table.export()
    order, cand_order = np.argsort(out["keys"]), np.argsort(out["candidate_keys"])
    return {k: v[cand_order if k.startswith("candidate") else order] for k, v in out.items()}


def assert_tables_equal(a, b):
    ea, eb = sorted_export(a), sorted_export(b)
    for kind in ea:
        np.testing.assert_array_equal(eb[kind], ea[kind], err_msg=kind)


def ckpt_dir_of(root, step):
    return os.path.join(root, ckpt.checkpoint_name(step))


def flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


# ---------------------------------------------------------------------------- ownership
def test_owner_is_bucket_mod_world_size_and_matches_plain_modulo_when_world_divides_buckets():
    keys = np.random.default_rng(0).integers(-2**63, 2**63 - 1, size=20000, dtype=np.int64)
    mixed = splitmix64(keys)
    np.testing.assert_array_equal(routing.bucket_ids(keys, 4096), (mixed % np.uint64(4096)).astype(np.int64))
    for world in (1, 2, 4, 8):
        np.testing.assert_array_equal(routing.owner_ranks(keys, world, 4096),
                                      (mixed % np.uint64(world)).astype(np.int32))
    three = routing.owner_ranks(keys, 3, 4096)
    np.testing.assert_array_equal(three, ((mixed % np.uint64(4096)) % np.uint64(3)).astype(np.int32))
    assert np.any(three != (mixed % np.uint64(3)).astype(np.int32))   # differs from mix64 % 3
    owned = np.concatenate([routing.buckets_of_rank(r, 3, 4096) for r in range(3)])
    assert sorted(owned.tolist()) == list(range(4096))
    assert np.bincount(three, minlength=3).min() > 6400            # balanced


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_round_trip_restores_rows_slots_counters_and_candidates(tmp_path, optimizer):
    table = filled_table(optimizer)
    assert table.num_candidates > 500 and table.size > 2000 and table.evicted_rows == 10
    ckpt.save_checkpoint(tmp_path, 7, tables=[table], num_buckets=64)
    fresh = make_table(optimizer)
    report = ckpt.restore_checkpoint(tmp_path, tables=[fresh])
    assert_tables_equal(table, fresh)
    assert report.rows == [table.size] and report.candidates == [table.num_candidates]
    assert report.counters[0]["evicted_rows"] == 10
    assert report.counters[0]["applied_row_updates"] == table.applied_row_updates
    # the restored table behaves identically afterwards (hidden state such as Adam's count)
    keys = sorted_export(table)["keys"][:300]
    grads = np.random.default_rng(9).standard_normal((300, 6)).astype(np.float32)
    table.apply_gradients(keys, grads, step=8)
    fresh.apply_gradients(keys, grads, step=8)
    assert_tables_equal(table, fresh)


def test_empty_tables_and_several_tables_round_trip(tmp_path):
    tables = [make_table("adagrad", dim=3, table_id=0), filled_table("adam", dim=4, table_id=1, n=500)]
    ckpt.save_checkpoint(tmp_path, 1, tables=tables, num_buckets=16)
    fresh = [make_table("adagrad", dim=3, table_id=0), make_table("adam", dim=4, table_id=1)]
    ckpt.restore_checkpoint(tmp_path, tables=fresh)
    assert fresh[0].size == 0 and fresh[0].num_candidates == 0
    assert_tables_equal(tables[1], fresh[1])


def test_restore_refuses_tables_that_already_hold_rows(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, tables=[filled_table("sgd", n=100)], num_buckets=8)
    busy = filled_table("sgd", n=40)
    with pytest.raises(CheckpointError, match="empty tables"):
        ckpt.restore_checkpoint(tmp_path, tables=[busy])


def test_rows_file_is_sorted_by_bucket_with_an_index(tmp_path):
    table = filled_table("adagrad", dim=4, n=2000)
    ckpt.save_checkpoint(tmp_path, 3, tables=[table], num_buckets=32)
    d = ckpt_dir_of(tmp_path, 3)
    record = np.dtype([("key", "<i8"), ("hits", "<i8"), ("last", "<i8"), ("count", "<i8"),
                       ("row", "<f4", (8,))])
    records = np.fromfile(os.path.join(d, "table-000.rank-00000.rows"), dtype=record)
    buckets = (splitmix64(records["key"]) % np.uint64(32)).astype(np.int64)
    assert len(records) == table.size and np.all(np.diff(buckets) >= 0)
    with np.load(os.path.join(d, "table-000.rank-00000.index.npz")) as index:
        np.testing.assert_array_equal(np.diff(index["row_offsets"]), np.bincount(buckets, minlength=32))
    truth = sorted_export(table)
    order = np.argsort(records["key"])
    np.testing.assert_array_equal(records["key"][order], truth["keys"])
    np.testing.assert_array_equal(records["row"][order][:, :4], truth["values"])
    np.testing.assert_array_equal(records["row"][order][:, 4:], truth["slots"][:, 0, :])


# ---------------------------------------------------------------------------- dense state
@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow
    return tensorflow


def small_config(**overrides):
    values = dict(model="deepfm", dim=4, num_fields=3, num_dense=2, hidden=[8], optimizer="adam",
                  dense_optimizer="adam", num_buckets=16, table_groups=[[0, 2], [1]], seed=1)
    values.update(overrides)
    return make_config(overrides=values)


def trained_dense(tf, config, steps=3, seed=0):
    from hybridps.dense import make_dense_optimizer
    from hybridps.models import build_model
    from hybridps.step import build_on_sample
    schema = build_schema(config)
    model = build_on_sample(tf, build_model(config.model, schema, config), schema)
    optimizer = make_dense_optimizer(config.effective_dense_optimizer, 0.01)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32))
                 for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return model, optimizer


def test_dense_weights_and_optimizer_state_round_trip(tmp_path, tf):
    config = small_config()
    model, optimizer = trained_dense(tf, config)
    tables = [filled_table("adam", dim=4, table_id=t, n=200) for t in range(2)]
    ckpt.save_checkpoint(tmp_path, 3, tables=tables, config=config,
                         model=model, optimizer=optimizer,
                         data_state={"kind": "synthetic", "next_step": 3})
    other_model, other_opt = trained_dense(tf, small_config(), steps=0)  # unbuilt optimizer
    for v in model_weights(other_model):
        v.assign(tf.zeros_like(v))
    fresh = [make_table("adam", dim=4, table_id=t) for t in range(2)]
    report = ckpt.restore_checkpoint(tmp_path, tables=fresh, config=config, model=other_model,
                                     optimizer=other_opt)
    for a, b in zip(model_weights(model), model_weights(other_model)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(other_opt.iterations.numpy()) == 3
    for a, b in zip(optimizer_state(optimizer, model.trainable_variables),
                    optimizer_state(other_opt, other_model.trainable_variables)):
        np.testing.assert_array_equal(a, b)
    assert report.data_state == {"kind": "synthetic", "next_step": 3}
    assert report.bytes_read["dense"] == os.path.getsize(os.path.join(report.path, "dense.npz"))
    grads = [tf.ones_like(v) for v in model.trainable_variables]   # next step identical
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    other_opt.apply_gradients(zip(grads, other_model.trainable_variables))
    for a, b in zip(model_weights(model), model_weights(other_model)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_manifest_content(tmp_path, tf):
    config = small_config()
    model, optimizer = trained_dense(tf, config, steps=1)
    tables = [filled_table("adam", dim=4, table_id=t, n=300 + 100 * t) for t in range(2)]
    np.random.seed(123)
    info = ckpt.save_checkpoint(tmp_path, 42, tables=tables, config=config, model=model, optimizer=optimizer,
                                data_state={"kind": "synthetic", "next_step": 42})
    d = ckpt_dir_of(tmp_path, 42)
    assert info.path == d
    with open(os.path.join(d, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["format_version"] == 1 and manifest["step"] == 42 and manifest["world_size"] == 1
    assert manifest["mode"] == "collective" and manifest["num_buckets"] == 16
    assert manifest["config_hash"] == config_hash(config) and manifest["config"]["dim"] == 4
    assert manifest["data_state"] == [{"kind": "synthetic", "next_step": 42}]
    for t, entry in enumerate(manifest["tables"]):
        assert entry["dim"] == 4 and entry["optimizer"] == "adam"
        assert entry["optimizer_slots"] == ["m", "v"] and entry["num_buckets"] == 16
        assert entry["rows"] == tables[t].size and entry["candidates"] == tables[t].num_candidates
        assert entry["counters_per_rank"][0]["evicted_rows"] == 10
        assert entry["fields"] == table_groups(config)[t]
    on_disk = sorted(n for n in os.listdir(d) if n != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        with open(os.path.join(d, name), "rb") as fh:
            data = fh.read()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    names = [v["name"] for v in manifest["dense"]["model_variables"]]
    assert names == [f"model_{i:04d}" for i in range(len(model.trainable_variables))]
    shapes = [v["shape"] for v in manifest["dense"]["model_variables"]]
    assert shapes == [list(v.shape) for v in model.trainable_variables]
    # adam: the update counter, then per trainable variable its "m" and "v" (Keras 2's layout)
    opt_names = [v["name"] for v in manifest["dense"]["optimizer"]["variables"]]
    assert opt_names == ["iteration"] + [f"{slot}_{k:04d}" for k in range(len(shapes))
                                         for slot in ("m", "v")]
    with open(os.path.join(d, "rank-00000.state.json")) as fh:
        state = json.load(fh)
    np.random.seed(123)
    assert state["rng_state"]["key"] == np.random.get_state()[1].tolist()
    assert manifest["total_bytes"] == sum(os.path.getsize(os.path.join(d, n)) for n in on_disk)


# ---------------------------------------------------------------------------- root layout
def test_keep_last_k_and_latest_pointer(tmp_path):
    table = filled_table("sgd", n=100)
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step * 10, tables=[table], num_buckets=8, keep=2)
        with open(tmp_path / "latest") as fh:
            assert fh.read() == f"ckpt-{step * 10:010d}\n"
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000040", "ckpt-0000000050", "latest"]
    # saving the same step again replaces it
    ckpt.save_checkpoint(tmp_path, 50, tables=[table], num_buckets=8, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000040", "ckpt-0000000050", "latest"]
    assert ckpt.verify_checkpoint(ckpt_dir_of(tmp_path, 50)) == []


def test_older_save_after_fallback_keeps_itself_and_ignores_newer_checkpoints(tmp_path):
    table = filled_table("sgd", n=100)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, tables=[table], num_buckets=8, keep=1)
    ckpt.save_checkpoint(tmp_path, 25, tables=[table], num_buckets=8, keep=1)   # resumed earlier
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000025", "ckpt-0000000030", "latest"]
    point = ckpt.find_resume_point(tmp_path)
    assert point.step == 25 and any("ignoring ckpt-0000000030" in w for w in point.warnings)


# ---------------------------------------------------------------------------- damage
TABLES_ONLY = dict(dim=4, optimizer="adagrad", num_fields=1, num_dense=0, num_buckets=32)


@pytest.fixture
def two_checkpoints(tmp_path):
    table = filled_table("adagrad", dim=4, n=1500)
    config = make_config(overrides=TABLES_ONLY)
    for step in (10, 20):
        ckpt.save_checkpoint(tmp_path, step, tables=[table], config=config)
        table.apply_gradients(sorted_export(table)["keys"][:50], np.ones((50, 4), np.float32), step=11)
    return tmp_path, table


def restore_fresh(path, **kwargs):
    return ckpt.restore_checkpoint(path, tables=[make_table("adagrad", dim=4)], **kwargs)


def test_flipped_byte_is_a_checksum_error_naming_the_file(two_checkpoints):
    root, _ = two_checkpoints
    d = ckpt_dir_of(root, 20)
    flip_byte(os.path.join(d, "table-000.rank-00000.rows"), 1000)
    with pytest.raises(CheckpointError, match=r"000\.rank-00000\.rows: checksum mismatch in bucket"):
        restore_fresh(d)
    problems = ckpt.verify_checkpoint(d, level="full")
    assert len(problems) == 1 and "table-000.rank-00000.rows: checksum mismatch" in problems[0]
    assert ckpt.verify_checkpoint(d, level="quick") == []        # quick: sizes only for data


def test_flipped_byte_in_index_state_or_manifest(two_checkpoints):
    root, _ = two_checkpoints
    d = ckpt_dir_of(root, 20)
    for name in ("table-000.rank-00000.index.npz", "rank-00000.state.json"):
        shutil.copy(os.path.join(d, name), os.path.join(root, name + ".bak"))
        flip_byte(os.path.join(d, name), 100)
        with pytest.raises(CheckpointError, match=rf"{name}: checksum mismatch"):
            restore_fresh(d)
        shutil.copy(os.path.join(root, name + ".bak"), os.path.join(d, name))
    restore_fresh(d)
    with open(os.path.join(d, "manifest.json"), "r+b") as fh:
        text = fh.read().replace(b'"step": 20', b'"step": 21')
        fh.seek(0)
        fh.write(text)
    with pytest.raises(CheckpointError, match=r"manifest.json: checksum mismatch"):
        restore_fresh(d)


def test_missing_and_truncated_files(two_checkpoints):
    root, _ = two_checkpoints
    d = ckpt_dir_of(root, 20)
    os.remove(os.path.join(d, "table-000.rank-00000.cands"))
    with pytest.raises(CheckpointError, match=r"table-000\.rank-00000\.cands: missing"):
        restore_fresh(d)
    d10 = ckpt_dir_of(root, 10)
    rows = os.path.join(d10, "table-000.rank-00000.rows")
    with open(rows, "r+b") as fh:
        fh.truncate(os.path.getsize(rows) - 7)
    with pytest.raises(CheckpointError, match=r"table-000\.rank-00000\.rows: truncated"):
        restore_fresh(d10)
    os.remove(os.path.join(d10, "manifest.json"))
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        restore_fresh(d10)


def test_manifest_of_another_model_or_table_dims(tmp_path, tf):
    config = small_config()
    tables = [make_table("adam", dim=4, table_id=t) for t in range(2)]
    ckpt.save_checkpoint(tmp_path, 5, tables=tables, config=config)
    other = small_config(hidden=[16])
    fresh = [make_table("adam", dim=4, table_id=t) for t in range(2)]
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"another model: hidden \[8\] in the checkpoint, \[16\] here"):
        ckpt.restore_checkpoint(tmp_path, tables=fresh, config=other)
    # a checkpoint of the former dense default (the sparse optimizer's) says what to pass
    dense = small_config(dense_optimizer="adagrad")
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"dense_optimizer '\w+' in the checkpoint, 'adagrad' here \(the dense optimizer's "
                             r"default is adam.*resume with --dense-optimizer \w+ .*Give these settings as "
                             r"the checkpoint has them"):
        ckpt.restore_checkpoint(tmp_path, tables=fresh, config=dense)
    buckets = small_config(num_buckets=64)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"num_buckets 16 in the checkpoint, 64 here"):
        ckpt.restore_checkpoint(tmp_path, tables=fresh, config=buckets)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"table 1: dim 4 in the checkpoint, 8 here"):
        ckpt.restore_checkpoint(tmp_path, tables=[make_table("adam", dim=4), make_table("adam", dim=8)])
    # a manifest re-signed with another model hash (config hash) is refused as well
    d = ckpt_dir_of(tmp_path, 5)
    manifest = ckpt.load_manifest(d)
    manifest.pop("_bytes")
    manifest["model_signature"]["dim"] = 32
    manifest["model_hash"] = ckpt.signature_hash(manifest["model_signature"])
    with open(os.path.join(d, "manifest.json"), "wb") as fh:
        fh.write(ckpt.manifest_json_bytes(manifest))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"dim 32 in the checkpoint, 4 here"):
        ckpt.restore_checkpoint(tmp_path, tables=fresh, config=config)
    manifest["model_hash"] = "0" * 64                     # hash no longer matches its signature
    with open(os.path.join(d, "manifest.json"), "wb") as fh:
        fh.write(ckpt.manifest_json_bytes(manifest))
    with pytest.raises(CheckpointError, match="model_hash does not match"):
        ckpt.load_manifest(d)


def test_find_resume_point_falls_back_to_newest_intact(two_checkpoints):
    root, _ = two_checkpoints
    assert ckpt.find_resume_point(root) == ckpt.ResumePoint(ckpt_dir_of(root, 20), 20, [])
    rows = os.path.join(ckpt_dir_of(root, 20), "table-000.rank-00000.rows")
    flip_byte(rows, 10)
    assert ckpt.find_resume_point(root, verify="quick").step == 20     # quick: not seen
    point = ckpt.find_resume_point(root, verify="full")
    assert point.step == 10 and point.path == ckpt_dir_of(root, 10)
    assert "ckpt-0000000020 is damaged" in point.warnings[0] and "checksum mismatch" in point.warnings[0]
    assert "falling back to" in point.warnings[-1]
    os.remove(os.path.join(ckpt_dir_of(root, 10), "rank-00000.state.json"))
    point = ckpt.find_resume_point(root, verify="full")
    assert point.path is None and point.step == 0 and "no intact checkpoint" in point.warnings[-1]


def resume_trainer(trainer, log):
    """Resume as the Trainer does: CheckpointManager.resume into the backend's state (here a
    tables-only model), then the data position; returns the step to start at."""
    manager = ckpt.CheckpointManager(trainer.config, build_schema(trainer.config), trainer.comm, log=log)
    state = BackendState(tables=trainer.sharded.tables, shard=(0, 1), model=None, dense_optimizer=None)
    step, data_state, _ = manager.resume(state)
    manager.close()                 # as the Trainer does when its run ends
    if data_state is not None:
        trainer.dataset.restore(data_state)
    return step


def fake_trainer(root, table):
    """What a resume uses of a Trainer, for a tables-only model (one process)."""
    dataset = types.SimpleNamespace(restored=None)
    dataset.restore = lambda state: setattr(dataset, "restored", state)
    return types.SimpleNamespace(
        comm=SingleProcessComm(),
        config=make_config(overrides=dict(TABLES_ONLY, checkpoint_dir=str(root), resume=True)),
        sharded=types.SimpleNamespace(tables=[table]), model=None,
        dense=types.SimpleNamespace(optimizer=None), dataset=dataset, num_fields=1, num_dense=0)


def test_resume_trainer_skips_a_checkpoint_whose_bucket_checksum_fails(two_checkpoints):
    root, table = two_checkpoints
    flip_byte(os.path.join(ckpt_dir_of(root, 20), "table-000.rank-00000.rows"), 10)
    trainer, messages = fake_trainer(root, make_table("adagrad", dim=4)), []
    assert resume_trainer(trainer, log=messages.append) == 10
    assert any("cannot restore" in m and "checksum mismatch" in m for m in messages)
    assert "resumed from" in messages[-1] and "step 10" in messages[-1]
    # the restored rows are those of step 10: the step-11 updates are absent
    restored = sorted_export(trainer.sharded.tables[0])
    assert restored["last_update_step"].max() < 11 and len(restored["keys"]) == table.size
    assert trainer.dataset.restored is None                # saved without a data position


def test_resume_trainer_without_checkpoints_starts_at_zero(tmp_path):
    messages = []
    trainer = fake_trainer(tmp_path / "none", make_table("sgd"))
    assert resume_trainer(trainer, log=messages.append) == 0
    assert "starting from step 0" in messages[-1]


def _truncate(path, by=7):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - by)


def _snapshot(root):
    """{relative path: bytes} of every file under root (what a refused resume must not change)."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _resume_trainer_for(root, table, **overrides):
    trainer = fake_trainer(root, table)
    trainer.config = make_config(overrides=dict(TABLES_ONLY, checkpoint_dir=str(root), resume=True,
                                                **overrides))
    return trainer


@pytest.fixture
def three_damaged(tmp_path):
    """ckpt-10/20/30, each with one truncated rows shard."""
    table = filled_table("adagrad", dim=4, n=600)
    config = make_config(overrides=TABLES_ONLY)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, tables=[table], config=config)
        _truncate(os.path.join(ckpt_dir_of(tmp_path, step), "table-000.rank-00000.rows"))
    return tmp_path


def test_resume_with_every_checkpoint_damaged_refuses_and_changes_nothing(three_damaged):
    root = three_damaged
    before = _snapshot(root)
    messages = []
    with pytest.raises(CheckpointError) as info:
        resume_trainer(_resume_trainer_for(root, make_table("adagrad", dim=4)), log=messages.append)
    text = str(info.value)
    for step in (10, 20, 30):
        assert f"ckpt-{step:010d}/table-000.rank-00000.rows: truncated" in text, text
    assert "--resume-fresh" in text and "Nothing there was changed" in text
    assert _snapshot(root) == before


def test_resume_fresh_sets_damaged_checkpoints_aside_and_saves_never_touch_them(three_damaged):
    root = three_damaged
    before = _snapshot(root)
    messages = []
    trainer = _resume_trainer_for(root, make_table("adagrad", dim=4), resume_fresh=True)
    assert resume_trainer(trainer, log=messages.append) == 0
    assert any("resume_fresh: starting from step 0" in m for m in messages)
    assert sorted(os.listdir(root)) == [f"damaged-ckpt-{s:010d}" for s in (10, 20, 30)]
    after = _snapshot(root)
    assert {k.replace("damaged-", "", 1): v for k, v in after.items()} == {
        k: v for k, v in before.items() if k != "latest"}
    # the fresh run saves the same steps, keeping one: the damaged ones stay as they were
    table = filled_table("sgd", dim=4, n=100)
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(root, step, tables=[table], num_buckets=8, keep=1)
    assert sorted(os.listdir(root)) == ([f"ckpt-{40:010d}"] + [f"damaged-ckpt-{s:010d}" for s in (10, 20, 30)]
                                        + ["latest"])
    assert {k: v for k, v in _snapshot(root).items() if k.startswith("damaged-")} == after
    # a requeued run of the same command finds no checkpoint to refuse and says what is aside
    again = []
    for name in os.listdir(root):
        if name.startswith("ckpt-") or name == "latest":
            shutil.rmtree(os.path.join(root, name)) if name != "latest" else os.remove(os.path.join(root, name))
    assert resume_trainer(_resume_trainer_for(root, make_table("adagrad", dim=4)), log=again.append) == 0
    assert "starting from step 0 (set aside earlier: damaged-ckpt-0000000010" in again[-1]


def test_resume_falls_back_and_keeps_the_damaged_newer_checkpoints_aside(tmp_path):
    table = filled_table("adagrad", dim=4, n=600)
    config = make_config(overrides=TABLES_ONLY)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, tables=[table], config=config)
    _truncate(os.path.join(ckpt_dir_of(tmp_path, 30), "table-000.rank-00000.rows"))
    flip_byte(os.path.join(ckpt_dir_of(tmp_path, 20), "table-000.rank-00000.rows"), 10)  # seen at restore
    damaged = {k: v for k, v in _snapshot(tmp_path).items() if k.startswith(("ckpt-0000000020", "ckpt-0000000030"))}
    messages = []
    trainer = _resume_trainer_for(tmp_path, make_table("adagrad", dim=4))
    assert resume_trainer(trainer, log=messages.append) == 10
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000010", "damaged-ckpt-0000000020", "damaged-ckpt-0000000030"]
    assert any("kept the damaged" in m and "damaged-ckpt-0000000030" in m for m in messages)
    # the resumed run reaches steps 20 and 30 again and prunes to one: the damaged ones stay
    for step in (20, 30):
        ckpt.save_checkpoint(tmp_path, step, tables=[table], config=config, keep=1)
    assert {k.replace("damaged-", "", 1): v for k, v in _snapshot(tmp_path).items()
            if k.startswith("damaged-")} == damaged


def test_resume_with_a_dangling_latest_and_no_checkpoint_refuses(tmp_path):
    (tmp_path / "latest").write_text("ckpt-0000000050\n")
    with pytest.raises(CheckpointError, match=r"latest names 'ckpt-0000000050', which is not a checkpoint"):
        resume_trainer(_resume_trainer_for(tmp_path, make_table("sgd")), log=lambda m: None)


def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    script = os.path.join(REPO, "tests", "parallel", "checkpoint_scenarios.py")
    proc = subprocess.Popen([sys.executable, script, "crash", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp_dir = tmp_path / "ckpt" / ".tmp-ckpt-0000000002"
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_dir.is_dir() and len(os.listdir(tmp_dir)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert "saving step 2" in out and "saved step 2" not in out, (out, err)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".tmp-ckpt-0000000002", "ckpt-0000000001", "latest"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt-0000000001\n"
    point = ckpt.find_resume_point(tmp_path / "ckpt", verify="full")
    assert point.step == 1 and point.warnings == []
    sys.path.insert(0, os.path.join(REPO, "tests", "parallel"))
    try:
        import checkpoint_scenarios as scenarios
    finally:
        sys.path.pop(0)
    tables = scenarios.make_tables()
    ckpt.restore_checkpoint(point.path, tables=tables)
    truth = np.load(tmp_path / "step1.npz")
    for t, table in enumerate(tables):
        got = sorted_export(table)
        order = np.argsort(truth[f"t{t}_keys"])
        for kind in EXPORT_KINDS:
            np.testing.assert_array_equal(got[kind], truth[f"t{t}_{kind}"][order])
    # the next save removes the leftover and completes
    ckpt.save_checkpoint(tmp_path / "ckpt", 2, tables=tables, num_buckets=scenarios.NUM_BUCKETS)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ckpt-0000000001", "ckpt-0000000002", "latest"]


# ---------------------------------------------------------------------------- full disk, two jobs
def _enospc_on_call(n):
    """A write_file that writes part of the n-th file it is asked for, then fails as a full
    disk does (the earlier ones are written)."""
    from hybridps.checkpoint.files import write_file as real
    calls = []

    def write_file(path, chunks):
        calls.append(path)
        if len(calls) == n:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, chunks)
    return write_file


@pytest.mark.parametrize("failing", ["a shard file", "the manifest", "the latest pointer"])
def test_a_save_that_fails_on_a_full_disk_removes_its_temporary_directory(tmp_path, monkeypatch, failing):
    from hybridps.checkpoint import files, writer
    table = filled_table("adagrad", dim=4, n=600)
    config = make_config(overrides=TABLES_ONLY)
    ckpt.save_checkpoint(tmp_path, 10, tables=[table], config=config)
    before = _snapshot(tmp_path)
    if failing == "a shard file":
        monkeypatch.setattr(writer, "write_file", _enospc_on_call(2))
    else:   # commit: the manifest is files.write_file's first file, latest.tmp its second
        monkeypatch.setattr(files, "write_file", _enospc_on_call(1 if failing == "the manifest" else 2))
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 20 under .*No space left on device"):
        ckpt.save_checkpoint(tmp_path, 20, tables=[table], config=config)
    left = sorted(os.listdir(tmp_path))
    assert not [n for n in left if n.startswith(".tmp-") or n.endswith(".tmp")], left
    # the previous checkpoint and the pointer to it are as they were
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("ckpt-0000000020")} == before
    assert ckpt.verify_checkpoint(ckpt_dir_of(tmp_path, 10), level="full") == []
    assert ckpt.find_resume_point(tmp_path).step == 10


def _holder(root):
    """A process holding ``root/ckpt`` as a job does (checkpoint_scenarios.py hold)."""
    script = os.path.join(REPO, "tests", "parallel", "checkpoint_scenarios.py")
    proc = subprocess.Popen([sys.executable, script, "hold", str(root)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "holding\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _manager(root):
    config = types.SimpleNamespace(checkpoint_dir=str(root))
    return ckpt.CheckpointManager(config, None, SingleProcessComm(), log=lambda m: None)


def test_a_second_job_on_a_checkpoint_directory_is_refused_naming_the_holder(tmp_path):
    import socket
    from hybridps.errors import ConfigError
    root = tmp_path / "ckpt"
    holder = _holder(tmp_path)
    try:
        (root / ".tmp-ckpt-0000000007").mkdir()            # the holder's save under way
        with pytest.raises(ConfigError) as refused:
            _manager(root)
        message = str(refused.value)
        assert f"--checkpoint-dir {root} is in use by another training job: pid {holder.pid} on host " \
               f"{socket.gethostname()}, started " in message
        assert "another --checkpoint-dir" in message
        assert (root / ".tmp-ckpt-0000000007").is_dir()     # the refused job touched nothing
        holder.kill()                                       # SIGKILL: no clean-up code runs
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=30)
    # the kernel released the lock with the process; the next job takes it over
    manager = _manager(root)
    assert json.loads((root / ".hybridps.lock").read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(root)) == [".hybridps.lock"]   # the dead job's save is gone
    manager.close()
    assert os.listdir(root) == []


@pytest.mark.slow
def test_train_refuses_a_checkpoint_directory_another_job_holds_before_training(tmp_path):
    from tests.mpi_util import MPI_ENV
    holder = _holder(tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hybridps.cli", "train", "--steps", "3", "--batch-size", "16",
             "--hidden", "8", "--dim", "4", "--vocab-size", "300", "--num-fields", "3", "--num-dense",
             "2", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-out",
             str(tmp_path / "metrics.json")], cwd=REPO, env=dict(os.environ, **MPI_ENV),
            capture_output=True, text=True, timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --checkpoint-dir {tmp_path / 'ckpt'} is in use by another training job: pid {holder.pid}")
    assert not (tmp_path / "metrics.json").exists()          # no training
    assert os.listdir(tmp_path / "ckpt") == []               # the holder ended and cleaned up


# ---------------------------------------------------------------------------- inspect
def test_inspect_summary_and_cli(two_checkpoints, capsys):
    root, table = two_checkpoints
    summary = ckpt.inspect_checkpoint(ckpt_dir_of(root, 20))
    assert summary["ok"] and summary["step"] == 20 and summary["world_size"] == 1
    assert summary["tables"][0]["rows"] == table.size and summary["tables"][0]["dim"] == 4
    d = ckpt_dir_of(root, 20)
    assert summary["total_bytes"] == sum(os.path.getsize(os.path.join(d, n))
                                         for n in os.listdir(d) if n != "manifest.json")
    parser = argparse.ArgumentParser()
    ckpt.add_inspect_arguments(parser)
    args = parser.parse_args([str(root)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "step 20" in text and "step 10" in text and "OK" in text
    flip_byte(os.path.join(ckpt_dir_of(root, 10), "table-000.rank-00000.cands"), 3)
    args = parser.parse_args([str(root), "--json"])
    assert args.func(args) == 0                         # latest (20) intact
    result = json.loads(capsys.readouterr().out)
    assert [c["ok"] for c in result["checkpoints"]] == [False, True]
    args = parser.parse_args([ckpt_dir_of(root, 10)])
    assert args.func(args) == 1
    assert "table-000.rank-00000.cands: checksum mismatch" in capsys.readouterr().out
    with pytest.raises(HybridPSError):
        args = parser.parse_args([str(root / "nope")])
        args.func(args)


# ---------------------------------------------------------------------------- export
def _rows_by_hand(tables, keys, groups, dim):
    """(B, F, dim) embeddings: each field's key looked up in its table's export; zeros if absent."""
    lookup = []
    for table in tables:
        e = table.export()
        lookup.append(dict(zip(e["keys"].tolist(), e["values"])))
    field_table = {f: t for t, g in enumerate(groups) for f in g}
    emb = np.zeros(keys.shape + (dim,), dtype=np.float32)
    for b in range(keys.shape[0]):
        for f in range(keys.shape[1]):
            row = lookup[field_table[f]].get(int(keys[b, f]))
            if row is not None:
                emb[b, f] = row
    return emb


def criteo_inputs(dense, emb):
    """The model input dict of the Criteo preset from dense (B, D) and emb (B, F, dim)."""
    return {"dense": dense, **{f"C{f + 1}": emb[:, f] for f in range(emb.shape[1])}}


def _train_tables(tables, step, rng, keys_pool):
    for table in tables:
        touched = rng.choice(keys_pool, size=60, replace=False)
        table.lookup_or_insert(touched, step=step)
        table.apply_gradients(touched, rng.standard_normal((60, table.dim)).astype(np.float32), step=step)


def test_export_saved_model_and_apply_delta(tmp_path, tf):
    from hybridps import export
    config = small_config(optimizer="adagrad", dense_optimizer="adagrad", min_count=1)
    groups = table_groups(config)
    rng = np.random.default_rng(4)
    pool = np.arange(1, 400, dtype=np.int64) * 1_000_003
    tables = [EmbeddingHashTable(dim=4, optimizer="adagrad", learning_rate=0.1, seed=1, table_id=t)
              for t in range(2)]
    model, optimizer = trained_dense(tf, config, steps=2)
    for step in range(3):
        _train_tables(tables, step, rng, pool[:200])
    ckpt.save_checkpoint(tmp_path / "ckpt", 3, tables=tables, config=config,
                         model=model, optimizer=optimizer)
    result = export.export_saved_model(tmp_path / "ckpt", tmp_path / "serving" / "1")
    assert result["step"] == 3 and result["rows"] == [t.size for t in tables]
    loaded = tf.saved_model.load(str(tmp_path / "serving" / "1"))
    keys = rng.choice(pool, size=(64, 3))
    keys[:5] = [[7, 8, 9]] * 5                               # never seen: zeros
    dense = rng.standard_normal((64, 2)).astype(np.float32)
    served = loaded.signatures["ids"](dense=tf.constant(dense), keys=tf.constant(keys))
    expected = model(criteo_inputs(dense, _rows_by_hand(tables, keys, groups, 4)), training=False).numpy()
    np.testing.assert_allclose(served["logit"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["probability"].numpy(), 1 / (1 + np.exp(-expected)), rtol=1e-5)
    zero_logit = model(criteo_inputs(dense[:5], np.zeros((5, 3, 4), np.float32)), training=False).numpy()
    np.testing.assert_allclose(served["logit"].numpy()[:5], zero_logit, rtol=1e-5, atol=1e-6)

    # train on (new keys too), write deltas every 2 steps, apply them in order
    exporter = export.DeltaExporter(tmp_path / "deltas", tables, model=model, every=2, start_step=3,
                                    model_hash=loaded.model_hash.numpy().decode())
    for step in range(3, 6):                                # steps 3, 4, 5: 6 completed
        _train_tables(tables, step, rng, pool)
        grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32))
                 for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        exporter.maybe_export(step + 1)
    deltas = export.list_deltas(tmp_path / "deltas")
    assert [(a, b) for a, b, _ in deltas] == [(3, 4), (4, 6)]
    with pytest.raises(CheckpointError, match="apply the deltas in order"):
        export.apply_delta(loaded, deltas[1][2])
    for _, _, path in deltas:
        export.apply_delta(loaded, path)
    assert int(loaded.step.numpy()) == 6
    served = loaded.serve(tf.constant(dense), tf.constant(keys))
    expected = model(criteo_inputs(dense, _rows_by_hand(tables, keys, groups, 4)), training=False).numpy()
    np.testing.assert_allclose(served["logit"].numpy(), expected, rtol=1e-5, atol=1e-6)

    # TF Serving path: a new version directory from the saved model + the deltas
    export.apply_delta(str(tmp_path / "serving" / "1"), deltas[0][2])
    with pytest.raises(CheckpointError, match="exists"):
        export.export_saved_model(tmp_path / "ckpt", tmp_path / "serving" / "1")
    parser = argparse.ArgumentParser()
    export.add_export_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "ckpt"),
                              "--out", str(tmp_path / "serving" / "2"),
                              "--delta", deltas[0][2], "--delta", deltas[1][2]])
    assert args.func(args) == 0
    version2 = tf.saved_model.load(str(tmp_path / "serving" / "2"))
    served = version2.signatures["ids"](dense=tf.constant(dense), keys=tf.constant(keys))
    np.testing.assert_allclose(served["logit"].numpy(), expected, rtol=1e-5, atol=1e-6)

    # a damaged delta is refused
    flip_byte(os.path.join(deltas[1][2], "table-000.rank-00000.values.npy"), 200)
    with pytest.raises(CheckpointError, match=r"values.npy: checksum mismatch"):
        export.apply_delta(version2, deltas[1][2], check_step=False)


def test_check_routing_refuses_a_routing_that_ignores_buckets():
    keys = np.random.default_rng(3).integers(-2**63, 2**63 - 1, size=5000, dtype=np.int64)
    mine = keys[routing.owner_ranks(keys, 3, 4096) == 0]             # what rank 0 of 3 restores
    table = make_table("sgd", min_count=1)
    table.import_rows(mine, np.zeros((len(mine), 6), np.float32))
    comm = types.SimpleNamespace(rank=0, size=3, allgather_object=lambda x: [x])
    report = types.SimpleNamespace(num_buckets=4096)
    ckpt.check_routing([table], report, comm, owner_fn=lambda k, w, b: routing.owner_ranks(k, w, b))
    plain_modulo = lambda k, w, b: (splitmix64(k) % np.uint64(w)).astype(np.int64)  # noqa: E731
    with pytest.raises(CheckpointError, match=r"routing must use owner\(key\) = \(mix64\(key\) % num_buckets\)"):
        ckpt.check_routing([table], report, comm, owner_fn=plain_modulo)


def _inspect(args_list, capsys):
    parser = argparse.ArgumentParser()
    ckpt.add_inspect_arguments(parser)
    args = parser.parse_args([str(a) for a in args_list])
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("damage, expected", [
    ("manifest missing", "manifest.json is missing: {d} is not complete"),
    ("manifest a directory", "manifest.json is not a file (a directory?): {d} is damaged"),
])
def test_inspect_of_a_checkpoint_without_its_manifest_says_so(two_checkpoints, capsys, damage, expected):
    root, _ = two_checkpoints
    d = ckpt_dir_of(root, 20)
    os.remove(os.path.join(d, "manifest.json"))
    if damage == "manifest a directory":
        os.mkdir(os.path.join(d, "manifest.json"))
    code, out = _inspect([d], capsys)
    assert code == 1
    assert out.startswith(f"{d}: DAMAGED") and expected.format(d=d) in out
    assert "latest -> None" not in out and "no checkpoints" not in out
    code, out = _inspect([root], capsys)                # the root: latest names the damaged one
    assert code == 1
    assert f"{root}/latest names ckpt-0000000020, which is damaged" in out


@pytest.mark.parametrize("latest, expected", [
    (None, "{root}/latest is missing (resume tries every checkpoint, newest first)"),
    (b"hello world\n", "{root}/latest does not name a checkpoint (holds 'hello world')"),
    (b"\xff\xfe\x00garbage", "{root}/latest does not name a checkpoint (holds"),
    (b"ckpt-0000000050\n", "{root}/latest names ckpt-0000000050, which does not exist"),
    ("dir", "{root}/latest is not a file"),
])
def test_inspect_says_what_is_wrong_with_latest(two_checkpoints, capsys, latest, expected):
    root, _ = two_checkpoints
    os.remove(root / "latest")
    if latest == "dir":
        (root / "latest").mkdir()
    elif latest is not None:
        (root / "latest").write_bytes(latest)
    code, out = _inspect([root], capsys)
    assert code == 1, out
    assert f"{root}: NOT OK" in out and expected.format(root=root) in out
    assert out.count("verification (every sha256): OK") == 2        # the checkpoints themselves
    code, out = _inspect([root, "--json"], capsys)
    summary = json.loads(out)
    assert not summary["ok"] and expected.format(root=root) in summary["problems"][0]


def test_inspect_of_an_empty_root_and_of_set_aside_checkpoints(tmp_path, capsys):
    code, out = _inspect([tmp_path], capsys)
    assert code == 1 and f"no checkpoint (ckpt-<step> directory) under {tmp_path}" in out
    table = filled_table("sgd", n=100)
    ckpt.save_checkpoint(tmp_path, 10, tables=[table], num_buckets=8)
    ckpt.save_checkpoint(tmp_path, 20, tables=[table], num_buckets=8)
    ckpt.set_aside_damaged(str(tmp_path), [ckpt_dir_of(tmp_path, 20)])
    code, out = _inspect([tmp_path], capsys)
    assert code == 1 and "set aside by a resume (damaged, never pruned): damaged-ckpt-0000000020" in out
    assert f"{tmp_path}/latest is missing" in out
    code, out = _inspect([tmp_path / "damaged-ckpt-0000000020"], capsys)
    assert code == 0 and "step 20" in out                # a set-aside checkpoint can be inspected alone
