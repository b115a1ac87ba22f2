"""An independent reference for exported models: the model's inputs built by hand in numpy
from raw values (hashlib-based hybridps.data.hashing keys, the tables' rows looked up in Python
dicts, pooling and padding written out), and small Keras models of the input contract, one
returning a dict of two tasks."""
import numpy as np

from hybridps.data.hashing import space_keys, text_ids

TWO_TASK_SCHEMA = {
    "label": "label",
    "dense": [{"name": "x"}, {"name": "y", "transform": "log1p"}],
    "sparse": [{"name": "user", "table": "user"},
               {"name": "item", "table": "item", "dtype": "int64"},
               {"name": "tags", "table": "tag", "pooling": "mean"},
               {"name": "seen", "table": "item", "pooling": "none", "max_len": 3, "dtype": "int64"}],
    "tables": {"user": {"dim": 3}, "item": {"dim": 3}, "tag": {"dim": 2}},
}
# the same features with the tasks of build_two_task_model in place of the one label
LABELLED_TWO_TASK_SCHEMA = {**{k: v for k, v in TWO_TASK_SCHEMA.items() if k != "label"},
                            "labels": [{"name": "click"}, {"name": "conversion"}]}


def raw_rows(n, seed=0):
    """Raw values of n rows for TWO_TASK_SCHEMA: text users (some unseen, one missing), int
    items (negative ones too), text tag lists and int id sequences of 0..5 values."""
    rng = np.random.default_rng(seed)
    users = [f"u{u}" for u in rng.integers(0, 12, size=n)]
    users[0], users[1 % n] = "", "ünïcødé 用户"
    tags = [[f"t{t}" for t in rng.integers(0, 6, size=rng.integers(0, 4))] for _ in range(n)]
    tags[0] = ["t1", "", "t2"]                                  # an empty text in a list is dropped
    return {"x": rng.normal(size=n).round(3).tolist(),
            "y": rng.integers(-2, 50, size=n).astype(float).tolist(),
            "user": users,
            "item": [int(i) for i in rng.integers(-3, 20, size=n)],
            "tags": tags,
            "seen": [[int(i) for i in rng.integers(0, 20, size=rng.integers(0, 6))] for _ in range(n)]}


def table_rows(schema, columns, seed=1):
    """(keys, values) per table: a random row for the key of every value the rows hold, but
    for a few values left out (they read zeros), as a trained table would hold them."""
    rng = np.random.default_rng(seed)
    keys = {t.name: set() for t in schema.tables}
    for feature in schema.sparse:
        for cell in columns[feature.name]:
            values = cell if feature.is_list else [cell]
            keys[feature.table].update(int(k) for k in space_keys(feature.key_space, text_ids(values)))
    out = []
    for table in schema.tables:
        held = sorted(keys[table.name])[2:]                      # two keys never trained
        out.append((np.array(held, np.int64), rng.normal(size=(len(held), table.dim)).astype(np.float32)))
    return out


def inputs_by_hand(schema, columns, rows):
    """The model's input dict for raw ``columns``: dense transformed, each feature's rows
    looked up (zeros if absent), lists pooled or padded as the schema says."""
    lookup = [dict(zip(keys.tolist(), values)) for keys, values in rows]
    n = len(columns[schema.dense[0].name])
    dense = np.array([[columns[f.name][i] for f in schema.dense] for i in range(n)], np.float64)
    for j, f in enumerate(schema.dense):
        if f.transform == "log1p":
            dense[:, j] = np.log1p(np.maximum(dense[:, j], 0.0))
    inputs = {"dense": dense.astype(np.float32)}
    for feature in schema.sparse:
        t = schema.table_index(feature.table)
        dim = schema.tables[t].dim

        def row(value):
            key = int(space_keys(feature.key_space, text_ids([value]))[0])
            return lookup[t].get(key, np.zeros(dim, np.float32))
        if not feature.is_list:
            inputs[feature.name] = np.stack([row(v) for v in columns[feature.name]]).astype(np.float32)
            continue
        if feature.is_sequence:
            seq = np.zeros((n, feature.max_len, dim), np.float32)
            lengths = np.zeros(n, np.int32)
            for i, cell in enumerate(columns[feature.name]):
                kept = cell[:feature.max_len]
                lengths[i] = len(kept)
                for p, v in enumerate(kept):
                    seq[i, p] = row(v)
            inputs[feature.name], inputs[feature.name + "_length"] = seq, lengths
            continue
        pooled = np.zeros((n, dim), np.float32)
        for i, cell in enumerate(columns[feature.name]):
            cell = [v for v in cell if v != ""]
            if cell:
                total = np.sum([row(v) for v in cell], axis=0)
                count = {"sum": 1.0, "mean": len(cell), "sqrtn": np.sqrt(len(cell))}[feature.pooling]
                pooled[i] = total / count
        inputs[feature.name] = pooled
    return inputs


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def build_two_task_model(schema, config=None):
    """A user model of two binary tasks: returns {"click": (B,), "conversion": (B, 1)}."""
    import tensorflow as tf

    class TwoTasks(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.names = [f.name for f in schema.sparse]
            self.shared = tf.keras.layers.Dense(8, activation="relu")
            self.click = tf.keras.layers.Dense(1)
            self.conversion = tf.keras.layers.Dense(1)

        def call(self, inputs, training=False):
            parts = [inputs["dense"]]
            for name in self.names:
                value = inputs[name]
                parts.append(tf.reduce_sum(value, axis=1) if len(value.shape) == 3 else value)
            hidden = self.shared(tf.concat(parts, axis=1))
            return {"click": tf.squeeze(self.click(hidden), axis=1), "conversion": self.conversion(hidden)}

    return TwoTasks()


def raw_inputs(schema, columns):
    """The raw-value inputs of the SavedModel's ``serving_default`` (numpy arrays by name):
    text as bytes, lists padded with "" (text) or -1 (ids) to the longest."""
    n = len(columns[schema.dense[0].name])
    inputs = {"dense": np.array([[columns[f.name][i] for f in schema.dense] for i in range(n)], np.float32)}
    for feature in schema.sparse:
        text = feature.dtype == "string"
        cells = columns[feature.name]
        if not feature.is_list:
            inputs[feature.name] = np.array(cells, object if text else np.int64)
            continue
        width = max([1] + [len(c) for c in cells])
        padded = np.full((n, width), "" if text else -1, object if text else np.int64)
        for i, cell in enumerate(cells):
            padded[i, :len(cell)] = cell
        inputs[feature.name] = padded
    return inputs
