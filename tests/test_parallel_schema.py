"""A feature schema under real MPI: 1, 2 and 4 ranks agree, and match a pure-TF reference.

The schema (mixed dims 4 / 3 / 8; ``tags`` shares table ``genre`` with ``genres`` and
``friends`` shares ``user`` with ``user``; pooling sum, mean, sqrtn and a sequence; empty lists;
histories longer than max_len) reads a CSV written here. One MPI job of 4 ranks runs
tests/parallel/schema_scenarios.py on 2, 1 and 4 of its ranks. The reference is an independent
single-process TensorFlow program: keys from the documented hashing formulas (reimplemented
here from tests/reference.py and BLAKE2b), one ordinary tf.Variable per table holding the same initial rows,
``tf.nn.embedding_lookup_sparse`` for the pooled features, a RaggedTensor for the sequence, the
same Keras model, Keras optimizers on every variable, the whole global batch at once.
"""
import hashlib
import json
import os

import numpy as np
import pytest

from tests.mpi_util import REPO, load_dumped_state, run_mpi
from tests.reference import mix64_int

pytestmark = pytest.mark.mpi

RTOL = 1e-5
ROWS, GLOBAL_BATCH, STEPS = 64, 16, 4
GENRES = ["Drama", "Comedy", "Action", "Sci-Fi", "Horror"]
TABLES = {"user": 4, "genre": 3, "movie": 8}
SPARSE = [
    {"name": "user", "table": "user"},
    {"name": "genres", "table": "genre", "pooling": "mean"},
    {"name": "movie", "table": "movie"},
    {"name": "history", "table": "movie", "pooling": "none", "max_len": 3},
    {"name": "tags", "table": "genre", "pooling": "sum"},
    {"name": "friends", "table": "user", "pooling": "sqrtn"},
]


def write_data(directory):
    rng = np.random.default_rng(11)
    lines = ["label,user,movie,genres,history,tags,friends,hour,activity"]
    for i in range(ROWS):
        lists = []
        for pool, low, high in ((GENRES, 0, 4), (list(range(100, 120)), 0, 6), (GENRES, 0, 3),
                                (list(range(10)), 0, 5)):
            n = int(rng.integers(low, high))
            lists.append("|".join(str(pool[j]) for j in rng.integers(0, len(pool), size=n)))
        hour = "" if i % 13 == 0 else f"{rng.random() * 24:.3f}"        # a missing dense value
        lines.append(f"{int(rng.random() < 0.4)},{rng.integers(0, 10)},{rng.integers(100, 120)},"
                     f"{lists[0]},{lists[1]},{lists[2]},{lists[3]},{hour},{rng.integers(0, 50)}")
    data = os.path.join(directory, "data.csv")
    with open(data, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    config = os.path.join(directory, "config.yaml")
    import yaml
    with open(config, "w") as fh:
        yaml.safe_dump({"model": "wide_deep", "data": data, "hidden": [16, 8], "seed": 3,
                        "learning_rate": 0.1, "warmup_steps": 1,
                        "features": {"label": "label", "group_by": "user",
                                     "dense": [{"name": "hour"},
                                               {"name": "activity", "transform": "log1p"}],
                                     "sparse": SPARSE,
                                     "tables": {t: {"dim": d} for t, d in TABLES.items()}}},
                       fh, sort_keys=False)
    return data, config


SKIP_GROUP_ROWS = 8                 # 8 row groups: 4 of 32 rows per rank, 4 batches of 8


def write_damaged_parquet(data, directory):
    """The CSV's rows as one Parquet file of 8 row groups, group 2 (rank 0's second) garbled;
    returns (the file, the row count of the garbled group read from the footer by pyarrow)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    table = pcsv.read_csv(data, convert_options=pcsv.ConvertOptions(column_types={
        c: pa.string() for c in ("user", "movie", "genres", "history", "tags", "friends")}))
    os.makedirs(directory)
    path = os.path.join(directory, "data.parquet")
    pq.write_table(table, path, row_group_size=SKIP_GROUP_ROWS)
    meta = pq.ParquetFile(path).metadata.row_group(2)
    start = min(meta.column(c).data_page_offset for c in range(meta.num_columns))
    raw = bytearray(open(path, "rb").read())
    raw[start:start + 300] = b"\xff" * 300
    open(path, "wb").write(bytes(raw))
    return path, meta.num_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("schema")
    data, config = write_data(str(base))
    skip_data, garbled_rows = write_damaged_parquet(data, str(base / "skip-data"))
    script = os.path.join(REPO, "tests", "parallel", "schema_scenarios.py")
    run_mpi(4, [script, base, config, skip_data], timeout=900)     # on 2, then 1, then 4 ranks
    out = {world: base / f"np{world}" for world in (1, 2, 4)}
    return {"data": data, "config": config, "garbled_rows": garbled_rows, **out}


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return json.load(fh)


def _state(run_dir):
    weights, rows = load_dumped_state(run_dir)
    return weights, {key: value for key, (value, _) in rows.items()}


def assert_same_state(a_dir, b_dir):
    (wa, ra), (wb, rb) = _state(a_dir), _state(b_dir)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7)
    assert ra.keys() == rb.keys() and len(ra) >= 30          # 10 users, 5 genres, 20 movies
    for key in ra:
        np.testing.assert_allclose(ra[key], rb[key], rtol=RTOL, atol=1e-7, err_msg=str(key))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_schema_bsp_is_the_same_on_1_2_and_4_ranks(runs, optimizer):
    base = runs[1] / f"equiv-{optimizer}"
    for world in (2, 4):
        other = runs[world] / f"equiv-{optimizer}"
        assert _metrics(other)["global_batch_size"] == GLOBAL_BATCH
        np.testing.assert_allclose(_metrics(other)["loss_trajectory"], _metrics(base)["loss_trajectory"],
                                   rtol=RTOL)
        assert_same_state(base, other)
    metrics = _metrics(base)
    assert metrics["truncated_ids"]["history"] > 0          # some histories were longer than 3
    assert metrics["table_names"] == list(TABLES)


def test_a_parquet_row_group_skipped_mid_run_keeps_both_ranks_in_step_and_a_resume_passes_it(runs):
    """2 ranks, on_bad_line=skip, rank 0's second row group garbled: 10 steps (2.5 epochs of 4
    batches, the count fixed from the footers) run on both ranks; rank 0 refills its 8 missing
    rows each epoch; a resume at step 5 passes the group again, counts it once, and trains on
    the same rows as the run without a stop (the same losses)."""
    straight, resumed = _metrics(runs[2] / "skip-parquet"), _metrics(runs[2] / "skip-resumed")
    assert len(straight["loss_trajectory"]) == 10 and len(resumed["loss_trajectory"]) == 5
    stats = straight["data_stats"]
    assert (stats["bad_parts"], stats["bad_lines"]) == (1, runs["garbled_rows"])
    assert stats["refilled_rows"] == 2 * runs["garbled_rows"]           # two epoch ends on rank 0
    assert stats["dropped_rows"] == 0                                   # rank 1: 32 rows, all used
    assert any("row group 2: skipped" in e for e in stats["bad_line_examples"])
    again = resumed["data_stats"]
    assert (again["bad_parts"], again["bad_lines"]) == (1, runs["garbled_rows"])
    np.testing.assert_allclose(resumed["loss_trajectory"], straight["loss_trajectory"][5:], rtol=RTOL)


# ---------------------------------------------------------------- the independent reference
def _blake(data, person):
    return hashlib.blake2b(data, digest_size=8, person=person).digest()


def reference_key(space, value):
    """The documented key of a value (hybridps.data.hashing), written out again."""
    if value == "":
        ident = -1
    elif value.lstrip("-").isdigit() and not (value.lstrip("-").startswith("0") and value not in ("0",)):
        ident = int(value)
    else:
        ident = int.from_bytes(_blake(value.encode(), b"hybridps-value-1"), "little", signed=True)
    seed = int.from_bytes(_blake(space.encode(), b"hybridps-space-1"), "little")
    key = mix64_int(mix64_int(ident + 0x9E3779B97F4A7C15) ^ seed)
    return key - (1 << 64) if key >= 1 << 63 else key


def reference_run(data, config_path, optimizer, steps=STEPS, batch=GLOBAL_BATCH):
    import pandas as pd
    import tensorflow as tf
    from hybridps.config import make_config
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    from hybridps.sparse.table import initial_rows
    from hybridps.step import build_on_sample
    frame = pd.read_csv(data, dtype=str, keep_default_na=False)
    table_names = list(TABLES)
    features = {f["name"]: f for f in SPARSE}
    keys = {}      # feature -> per row list of keys
    for name, f in features.items():
        cells = frame[name].tolist()
        lists = [[v for v in c.split("|") if v] for c in cells] if "pooling" in f else [[c] for c in cells]
        if f.get("max_len"):
            lists = [row[:f["max_len"]] for row in lists]
        keys[name] = [[reference_key(f["table"], v) for v in row] for row in lists]
    vocab = {t: sorted({k for n, f in features.items() if f["table"] == t for row in keys[n] for k in row})
             for t in table_names}
    index = {t: {k: i for i, k in enumerate(vocab[t])} for t in table_names}
    tables = {t: tf.Variable(initial_rows(np.array(vocab[t], np.int64), TABLES[t], "normal", 3,
                                          table_names.index(t), 0.0, 0.01)) for t in table_names}
    config = make_config(config_path, {"optimizer": optimizer, "dense_optimizer": optimizer})
    schema = build_schema(config)
    tf.keras.utils.set_random_seed(config.seed)
    model = build_on_sample(tf, build_model(config.model, schema, config), schema)
    hour = pd.to_numeric(frame["hour"].replace("", "0")).to_numpy(np.float32)
    activity = np.log1p(np.maximum(pd.to_numeric(frame["activity"]).to_numpy(np.float64), 0)).astype(np.float32)
    dense_all = np.stack([hour, activity], axis=1)
    labels_all = frame["label"].astype(np.float32).to_numpy()
    variables = model.trainable_variables + [tables[t] for t in table_names]
    opt = (tf.keras.optimizers.SGD(0.1) if optimizer == "sgd" else
           tf.keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.1, epsilon=1e-7))
    losses = []
    for step in range(steps):
        rows = range(step * batch, (step + 1) * batch)
        with tf.GradientTape() as tape:
            inputs = {"dense": tf.constant(dense_all[list(rows)])}
            for name, f in features.items():
                table = tables[f["table"]]
                ids = [[index[f["table"]][k] for k in keys[name][r]] for r in rows]
                if "pooling" not in f:
                    inputs[name] = tf.gather(table, [i[0] for i in ids])
                elif f["pooling"] == "none":
                    ragged = tf.ragged.constant(ids, dtype=tf.int64, ragged_rank=1)
                    inputs[name] = tf.gather(table, ragged).to_tensor(shape=[batch, f["max_len"], TABLES[f["table"]]])
                    inputs[name + "_length"] = tf.constant([len(i) for i in ids], tf.int32)
                else:
                    sparse = tf.ragged.constant(ids, dtype=tf.int64, ragged_rank=1).to_sparse()
                    sparse = tf.SparseTensor(sparse.indices, sparse.values, [batch, max(1, sparse.dense_shape[1])])
                    pooled = tf.nn.embedding_lookup_sparse(table, sparse, None, combiner=f["pooling"])
                    # empty lists read zeros; trailing ones are missing from the lookup's output
                    inputs[name] = tf.pad(pooled, [[0, batch - pooled.shape[0]], [0, 0]])
            logits = model(inputs, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels_all[list(rows)], logits=logits))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        opt.apply_gradients(zip(grads, variables))
        losses.append(float(loss))
    rows_out = {(f"table{table_names.index(t)}", k): tables[t].numpy()[index[t][k]]
                for t in table_names for k in vocab[t]}
    return losses, [v.numpy() for v in model.trainable_variables], rows_out


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_schema_bsp_on_2_ranks_matches_a_pure_tensorflow_reference(runs, optimizer):
    run_dir = runs[2] / f"equiv-{optimizer}"
    losses, weights, rows = reference_run(runs["data"], runs["config"], optimizer)
    np.testing.assert_allclose(_metrics(run_dir)["loss_trajectory"], losses, rtol=RTOL)
    got_weights, got_rows = load_dumped_state(run_dir)
    for got, want in zip(got_weights, weights):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)
    got_rows = {key: value for key, (value, _) in got_rows.items()}
    # the reference holds every key of the data; hybridps only those of the steps run (all here)
    assert got_rows.keys() == rows.keys()
    for key, value in rows.items():
        np.testing.assert_allclose(got_rows[key], value, rtol=RTOL, atol=1e-7, err_msg=str(key))


def test_a_checkpoint_of_2_ranks_resumes_on_1_and_continues_the_run(runs):
    with open(runs[1] / "resumed" / "resume.json") as fh:
        resume = json.load(fh)
    assert resume["start_step"] == 2 and any("saved on 2 ranks" in m for m in resume["messages"])
    np.testing.assert_allclose(_metrics(runs[1] / "resumed")["loss_trajectory"],
                               _metrics(runs[1] / "equiv-adagrad")["loss_trajectory"][2:], rtol=RTOL)
    assert_same_state(runs[1] / "resumed", runs[1] / "equiv-adagrad")


def test_the_exported_savedmodel_on_the_csv_texts_gives_the_trainers_predictions(runs, tmp_path):
    import pandas as pd
    import tensorflow as tf
    from hybridps.export import export_saved_model
    export_saved_model(runs[1] / "resume-ckpt", tmp_path / "serving")
    frame = pd.read_csv(runs["data"], dtype=str, keep_default_na=False)
    inputs = {"dense": tf.constant(np.stack([pd.to_numeric(frame["hour"].replace("", "0")),
                                             pd.to_numeric(frame["activity"])], 1).astype(np.float32))}
    for f in SPARSE:           # the cells as the CSV holds them: the SavedModel hashes the text
        cells = frame[f["name"]].tolist()
        if "pooling" not in f:
            inputs[f["name"]] = tf.constant(cells, tf.string)
            continue
        lists = [[v for v in c.split("|") if v] for c in cells]
        width = max(len(x) for x in lists)
        inputs[f["name"]] = tf.constant([x + [""] * (width - len(x)) for x in lists], tf.string)
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    served = loaded.signatures["serving_default"](**inputs)["probability"].numpy()
    trained = np.load(runs[1] / "resumed" / "predictions.npz")
    np.testing.assert_allclose(served, trained["scores"], rtol=1e-5, atol=1e-6)
    assert 0.05 < served.mean() < 0.95


def test_a_user_model_file_and_din_train_on_2_ranks(runs):
    for name in ("user-model", "din"):
        metrics = _metrics(runs[2] / name)
        assert metrics["steps"] == 6 and metrics["ranks"] == 2
        assert np.all(np.isfinite(metrics["loss_trajectory"]))
    weights, _ = load_dumped_state(runs[2] / "user-model")
    assert len(weights) == 8          # user tower, item tower, two MLP layers: kernels and biases
