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


# A schema of two tasks (a click, binary; a rating, regression with the Huber loss) and row
# weights, over the features above.
MULTITASK_FEATURES = {
    "labels": [{"name": "click"},
               {"name": "rating", "column": "stars", "kind": "regression", "loss": "huber",
                "delta": 1.0, "loss_weight": 0.5}],
    "weight": "w", "group_by": "user",
    **{k: v for k, v in FEATURES.items() if k not in ("label", "group_by")},
}


def multitask_rows(n, seed=0):
    """Columns of n rows of MULTITASK_FEATURES: those of :func:`rows` with ``click`` (0/1, None
    in about 1 row of 8), ``stars`` (a float, None in about 2 rows of 5) and ``w`` (0.5..2)."""
    columns = rows(n, seed)
    rng = np.random.default_rng(seed + 100)
    click = columns.pop("label").astype(float)
    stars = np.round(1 + 4 * rng.random(n) + click, 2)
    columns["click"] = [None if m else int(c) for c, m in zip(click, rng.random(n) < 0.125)]
    columns["stars"] = [None if m else float(s) for s, m in zip(stars, rng.random(n) < 0.4)]
    columns["w"] = np.round(0.5 + 1.5 * rng.random(n), 3)
    return columns


def write_csv(path, columns):
    """The columns as CSV (None, a missing value: an empty cell; lists joined by |)."""
    names = list(columns)
    lines = [",".join(names)]
    for i in range(len(columns["row"])):
        cells = []
        for name in names:
            value = columns[name][i]
            cells.append("" if value is None else "|".join(map(str, value)) if isinstance(value, list)
                         else str(value))
        lines.append(",".join(cells))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)
