"""Data files of a small schema for the reader and evaluation tests: columns of n rows (text
and integer ids, text and integer lists, dense values, labels, row ids) and the same rows
written as Parquet (pyarrow) and as TFRecord of tf.train.Example.
"""
import numpy as np

FEATURES = {
    "label": "label", "group_by": "row",
    "dense": [{"name": "x"}, {"name": "y", "transform": "log1p"}],
    "sparse": [{"name": "user", "table": "user"},
               {"name": "item", "table": "item"},
               {"name": "tags", "table": "tag", "pooling": "sum"},
               {"name": "seen", "table": "item", "pooling": "none", "max_len": 4}],
    "tables": {"user": {"dim": 4}, "item": {"dim": 4}, "tag": {"dim": 2}},
}


def rows(n, seed=0):
    """Columns of n rows: row ids, labels, dense, a text user, an int item, text and int lists."""
    rng = np.random.default_rng(seed)
    return {"row": np.arange(n, dtype=np.int64) + 1000 * seed,
            "label": (rng.random(n) < 0.4).astype(np.int64),
            "x": rng.normal(size=n), "y": rng.integers(0, 100, size=n).astype(np.float64),
            "user": [f"u{u}" for u in rng.integers(0, 20, size=n)],
            "item": rng.integers(0, 50, size=n).astype(np.int64),
            "tags": [[f"t{t}" for t in rng.integers(0, 9, size=rng.integers(0, 4))] for _ in range(n)],
            "seen": [list(rng.integers(0, 50, size=rng.integers(0, 7)).astype(np.int64)) for _ in range(n)]}


def write_parquet(path, columns, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def write_tfrecord(path, columns):
    import tensorflow as tf
    n = len(columns["row"])
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(n):
            feature = {
                "row": tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["row"][i]])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["label"][i]])),
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=[columns["x"][i]])),
                "y": tf.train.Feature(float_list=tf.train.FloatList(value=[columns["y"][i]])),
                "user": tf.train.Feature(bytes_list=tf.train.BytesList(value=[columns["user"][i].encode()])),
                "item": tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["item"][i]])),
                "tags": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode() for t in columns["tags"][i]])),
                "seen": tf.train.Feature(int64_list=tf.train.Int64List(value=list(columns["seen"][i]))),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(path)


def saved_model_inputs(columns, features=FEATURES):
    """The exported SavedModel's inputs for these rows (its ``ids`` signature): the dense
    columns untransformed, text ids hashed with text_ids, lists padded with -1 (what
    ``hybridps serve`` builds from a request: hybridps.serving.inputs)."""
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    from hybridps.serving.inputs import serving_inputs
    schema = build_schema(make_config(overrides={"features": features}))
    return serving_inputs(schema, {k: list(v) for k, v in columns.items()}, len(columns[schema.label]))
