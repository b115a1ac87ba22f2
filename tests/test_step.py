"""The step's plan and pooling, in one process: plan_batch + permute_blocks + the TF step's
model inputs against the same inputs computed independently in numpy (a dict of key -> row,
each sample's list pooled by hand), for mixed dims, tables shared by two features, every
pooling, empty lists, truncated sequences, and 1 to 3 owners.
"""
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
from hybridps.sparse.plan import plan_batch  # noqa: E402
from hybridps.step import model_inputs, step_signature  # noqa: E402

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
    plan = plan_batch(layout, batch, owners, 4096, step=0)
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
                       tf.constant(plan.group_rows), [tf.constant(a) for a in plan.step_inputs])
    want = expected_inputs(schema, batch, row)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-6, atol=1e-6, err_msg=name)
    # the single-valued inverse indexes the send-order unique keys
    np.testing.assert_array_equal(plan.unique_keys[plan.inverse], batch.keys)
    assert len(step_signature(tf, layout, 1)) == 5 + 1 + 2 * 4   # one dim group of singles


def test_truncate_lists_keeps_the_first_ids():
    values = np.arange(10, dtype=np.int64)
    lengths = np.array([4, 0, 6])
    kept, new_lengths, dropped = truncate_lists(values, lengths, 3)
    np.testing.assert_array_equal(kept, [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(new_lengths, [3, 0, 3])
    assert dropped == 4
