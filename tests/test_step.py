"""The step's plan and pooling, in one process: plan_batch + permute_blocks + the TF step's
model inputs against the same inputs computed independently in numpy (a dict of key -> row,
each sample's list pooled by hand), for mixed dims, tables shared by two features, every
pooling, empty lists, truncated sequences, and 1 to 3 owners; the train and predict steps
taking a PulledBatch as it is, and AutoGraph converting the two steps but none of their
helpers; the collective exchange's counters (one rank, a loop-back comm).
"""
import importlib.metadata
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hybridps._kernels import permute_blocks  # noqa: E402
from hybridps.config import make_config  # noqa: E402
from hybridps.data.batch import Batch, truncate_lists  # noqa: E402
from hybridps.schema import build_schema  # noqa: E402
from hybridps.sparse.layout import SparseLayout  # noqa: E402
from hybridps.sparse.exchange import CollectiveExchange  # noqa: E402
from hybridps.sparse.plan import plan_batch, pull_locally  # noqa: E402
from hybridps.sparse.shard import OwnerShard  # noqa: E402
from hybridps.step import make_predict_step, make_train_step, model_inputs, step_signature  # noqa: E402
from tests.reference import send_order_index  # noqa: E402

FEATURES = {
    "label": "label",
    "dense": [{"name": "hour"}],
    "sparse": [
        {"name": "user", "table": "user"},
        {"name": "genres", "table": "genre", "pooling": "mean"},
        {"name": "history", "table": "movie", "pooling": "none", "max_len": 3},
        {"name": "movie", "table": "movie"},
        {"name": "tags", "table": "genre", "pooling": "sum"},
        {"name": "friends", "table": "user", "pooling": "sqrtn"},
    ],
    # dims 8, 4, 8: tables user and movie form one dim group, so the TF order (user, movie,
    # genre) differs from the table order: the plan must permute
    "tables": {"user": {"dim": 8}, "genre": {"dim": 4}, "movie": {"dim": 8}},
}


def make_batch(rng, size):
    keys = rng.integers(0, 30, size=(size, 2)).astype(np.int64)       # user, movie columns
    lists = {}
    for name, high in (("genres", 6), ("history", 30), ("tags", 6), ("friends", 30)):
        lengths = rng.integers(0, 5, size=size)
        lengths[0] = 0                                                 # an empty list
        values = rng.integers(0, high, size=int(lengths.sum())).astype(np.int64)
        if name == "history":
            values, lengths, dropped = truncate_lists(values, lengths, 3)
        lists[name] = (values, np.asarray(lengths, np.int32))
    return Batch(dense=rng.normal(size=(size, 1)), keys=keys, labels=np.zeros(size), lists=lists)


def rows_of(schema):
    """Independent rows: a function of (table, key)."""
    def row(table, key):
        dim = schema.tables[schema.table_index(table)].dim
        return np.sin(np.arange(dim) * 0.7 + key * 1.3 + len(table)).astype(np.float32)
    return row


def expected_inputs(schema, batch, row):
    out = {"dense": batch.dense}
    for column, feature in enumerate(schema.single_features):
        out[feature.name] = np.stack([row(feature.table, k) for k in batch.keys[:, column]])
    for feature in schema.list_features:
        values, lengths = batch.lists[feature.name]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        dim = schema.table_of(feature).dim
        if feature.is_sequence:
            seq = np.zeros((batch.size, feature.max_len, dim), np.float32)
            for i in range(batch.size):
                for j, k in enumerate(values[starts[i]:starts[i + 1]]):
                    seq[i, j] = row(feature.table, k)
            out[feature.name] = seq
            out[feature.name + "_length"] = lengths
            continue
        pooled = np.zeros((batch.size, dim), np.float32)
        for i in range(batch.size):
            items = [row(feature.table, k) for k in values[starts[i]:starts[i + 1]]]
            if items:
                total = np.sum(items, axis=0)
                n = len(items)
                pooled[i] = {"sum": total, "mean": total / n, "sqrtn": total / np.sqrt(n)}[feature.pooling]
        out[feature.name] = pooled
    return out


@pytest.mark.parametrize("owners", [1, 2, 3])
def test_model_inputs_match_numpy_pooling(owners):
    schema = build_schema(make_config(overrides={"features": FEATURES}))
    layout = SparseLayout(schema)
    assert layout.tf_tables == [0, 2, 1]
    rng = np.random.default_rng(owners)
    batch = make_batch(rng, 7)
    plan = plan_batch(layout, batch, owners, 4096)
    row = rows_of(schema)
    # the rows in send order, as the owners would serve them: (owner, table) blocks
    table_of_key = []
    for r in range(owners):
        for t in range(len(schema.tables)):
            table_of_key += [t] * int(plan.send_counts[r, t])
    served = np.concatenate([row(schema.tables[t].name, k) for t, k in zip(table_of_key, plan.unique_keys)])
    if owners > 1:
        assert plan.permutation is not None
    rows = served if plan.permutation is None else permute_blocks(served, *plan.permutation)
    got = model_inputs(tf, layout, tf.constant(batch.dense, tf.float32), tf.constant(rows),
                       tf.constant(plan.group_rows), [tf.constant(a) for a in plan.feature_inputs])
    want = expected_inputs(schema, batch, row)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-6, atol=1e-6, err_msg=name)
    # every single-valued key is in its table's blocks of the send-order unique keys
    column_tables = [schema.table_index(f.table) for f in schema.single_features]
    inverse = send_order_index(plan.unique_keys, plan.send_counts, batch.keys, column_tables)
    np.testing.assert_array_equal(plan.unique_keys[inverse], batch.keys)
    assert len(step_signature(tf, layout, 1)) == 6 + 1 + 2 * 4   # one dim group of singles


def test_truncate_lists_keeps_the_first_ids():
    values = np.arange(10, dtype=np.int64)
    lengths = np.array([4, 0, 6])
    kept, new_lengths, dropped = truncate_lists(values, lengths, 3)
    np.testing.assert_array_equal(kept, [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(new_lengths, [3, 0, 3])
    assert dropped == 4


def table_rows(schema, row):
    """``rows_of_table`` for pull_locally: table t's rows of ``keys`` from ``row``."""
    def rows(t, keys):
        table = schema.tables[t]
        return np.stack([row(table.name, k) for k in keys]) if len(keys) else np.zeros((0, table.dim))
    return rows


class SumModel(tf.keras.Model):
    """logit = scale x the sum of every float input (the lengths left out), scale = 1: an
    output a test computes by hand."""

    def __init__(self):
        super().__init__()
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, inputs, training=False):
        parts = [tf.reduce_sum(tf.reshape(tf.cast(value, tf.float32), (tf.shape(value)[0], -1)), axis=1)
                 for name, value in sorted(inputs.items()) if not name.endswith("_length")]
        return self.scale * tf.add_n(parts)


def test_train_and_predict_steps_take_the_pulled_batch_as_it_is():
    schema = build_schema(make_config(overrides={"features": FEATURES}))
    layout = SparseLayout(schema)
    rng = np.random.default_rng(5)
    batch = make_batch(rng, 6)
    batch.labels = rng.integers(0, 2, size=6).astype(np.float32)
    row = rows_of(schema)
    pulled = pull_locally(layout, batch, 4096, table_rows(schema, row))
    want = expected_inputs(schema, batch, row)
    logits = sum(np.asarray(v, np.float64).reshape(batch.size, -1).sum(axis=1)
                 for name, v in want.items() if not name.endswith("_length"))
    model = SumModel()
    model({name: tf.constant(v) for name, v in want.items()})
    predict = make_predict_step(tf, model, layout, schema.num_dense)
    np.testing.assert_allclose(predict(pulled).numpy(), logits, rtol=1e-5, atol=1e-5)
    train = make_train_step(tf, model, layout, schema.num_dense)
    loss_sum, got_logits, dense_grads, row_grads = train(pulled, tf.constant(12.0))
    np.testing.assert_allclose(got_logits.numpy(), logits, rtol=1e-5, atol=1e-5)
    p = 1.0 / (1.0 + np.exp(-logits))
    want_loss = -np.sum(batch.labels * np.log(p) + (1 - batch.labels) * np.log(1 - p))
    assert float(loss_sum) == pytest.approx(want_loss, rel=1e-5)
    # d(loss / 12) / d(scale) = sum over samples of (p - y) x logit / 12 (logit = scale x sum)
    assert float(dense_grads[0]) == pytest.approx(np.sum((p - batch.labels) * logits) / 12.0, rel=1e-4)
    assert row_grads.shape == pulled.rows.shape


def test_autograph_converts_the_step_functions_and_none_of_their_helpers(monkeypatch):
    """The helpers the steps call (pooling, outputs per task, loss sums) branch on Python values
    only: AutoGraph must leave them as they are (converting them cost about 1.3 s of CPU per
    traced step), and still convert the step functions themselves, which call the user's model."""
    from tensorflow.python.autograph.impl import api as autograph_api
    converted = []
    convert = autograph_api._convert_actual

    def recording(entity, program_ctx):
        converted.append((getattr(entity, "__module__", None) or "",
                          getattr(entity, "__qualname__", repr(entity)).split(".")[-1]))
        return convert(entity, program_ctx)

    monkeypatch.setattr(autograph_api, "_convert_actual", recording)
    schema = build_schema(make_config(overrides={"features": FEATURES}))
    layout = SparseLayout(schema)
    rng = np.random.default_rng(6)
    batch = make_batch(rng, 4)
    batch.labels = rng.integers(0, 2, size=4).astype(np.float32)
    pulled = pull_locally(layout, batch, 4096, table_rows(schema, rows_of(schema)))
    model = SumModel()
    model({name: tf.constant(v) for name, v in expected_inputs(schema, batch, rows_of(schema)).items()})
    make_predict_step(tf, model, layout, schema.num_dense)(pulled)
    make_train_step(tf, model, layout, schema.num_dense)(pulled, tf.constant(4.0))
    ours = {name for module, name in converted if module.startswith("hybridps")}
    assert sorted(ours) == ["predict_step", "train_step"], converted
    # the user's model is called as before: Keras 2 converts a layer's call under a converted
    # caller (Keras 3 converts none)
    keras_2 = importlib.metadata.version("keras").startswith("2.")
    assert any(name == "call" for module, name in converted) == keras_2, converted


class LoopbackComm:
    """The exchange's collectives on a job of one rank: everything sent comes back."""
    rank, size = 0, 1

    def alltoall_counts(self, send_counts, poll_interval=None):
        return np.array(send_counts, dtype=np.int64, copy=True)

    def alltoallv(self, send, send_counts, recv_counts, recv=None, poll_interval=None):
        return np.array(send, copy=True)


def test_exchange_counts_the_keys_and_bytes_of_training_steps_only():
    schema = build_schema(make_config(overrides={"features": FEATURES}))
    exchange = CollectiveExchange(LoopbackComm(), SparseLayout(schema), OwnerShard(schema, seed=0), 4096)
    rng = np.random.default_rng(11)
    dims = {t.name: t.dim for t in schema.tables}
    keys = elements = 0
    for step in range(2):
        batch = make_batch(rng, 9)
        # each table's distinct keys, from its columns and its list features (numpy)
        by_table = {"user": [batch.keys[:, 0], batch.lists["friends"][0]],
                    "movie": [batch.keys[:, 1], batch.lists["history"][0]],
                    "genre": [batch.lists["genres"][0], batch.lists["tags"][0]]}
        unique = {t: len(np.unique(np.concatenate(parts))) for t, parts in by_table.items()}
        keys += sum(unique.values())
        elements += sum(n * dims[t] for t, n in unique.items())
        pulled = exchange.pull(batch, step)
        exchange.push(pulled, np.zeros_like(pulled.rows), step)
    exchange.read(make_batch(rng, 9))           # evaluation: not counted
    counters = exchange.counters
    assert counters.keys_sent == counters.keys_received == counters.row_grads_pushed == keys
    # keys (int64) out and back, rows (float32) back, row gradients (float32) out
    assert counters.bytes_sent == counters.bytes_received == 8 * keys + 2 * 4 * elements
