"""The exported SavedModel on raw values.

hybridps.export.tf_hashing against hashlib and hybridps.data.hashing (BLAKE2b-64 with its
personalisations on random bytes of every length around the 128-byte block, text ids of
random unicode, empty, numeric and long texts, key spaces of int64 ids with negatives, the
Criteo preset's field keys); the ``serving_default`` (raw values) and ``ids`` signatures against
the model fed by hand (tests.export_reference), for a one-task model and a model of two tasks;
a checkpoint and a SavedModel written by earlier hybridps (tests/data/savedmodel_ids_v1) and
the Criteo checkpoint of tests/data/legacy_checkpoint_v1 still exported and served alike; the
served outputs named by the schema's tasks; end to end, an mmoe and an esmm run of three tasks
(one regression) whose predict columns, SavedModel and serve answers agree. The fast loop
keeps the text ids against the hashlib-based readers and the schema's tasks; the rest is slow.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybridps.data import hashing
from tests.export_reference import (LABELLED_TWO_TASK_SCHEMA, TWO_TASK_SCHEMA, build_two_task_model,
                                    inputs_by_hand, raw_inputs, raw_rows, sigmoid, table_rows)
from tests.schema_data import MULTITASK_FEATURES, multitask_rows, write_parquet

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_EXPORT = os.path.join(HERE, "data", "savedmodel_ids_v1")
LEGACY_CRITEO = os.path.join(HERE, "data", "legacy_checkpoint_v1", "ckpt")


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow
    return tensorflow


def _random_text(rng, length):
    """Random unicode text: ASCII, Latin-1, Greek, CJK, emoji (4 UTF-8 bytes), combining marks."""
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1F5FF), (0x300, 0x36F)]
    chars = []
    for _ in range(length):
        low, high = ranges[rng.integers(len(ranges))]
        chars.append(chr(int(rng.integers(low, high + 1))))
    return "".join(chars)


def _texts(rng):
    """Thousands of texts: random unicode of 0..60 characters, long ones across block
    boundaries, numbers canonical and not, int64 boundaries."""
    texts = [_random_text(rng, int(n)) for n in rng.integers(0, 60, size=2500)]
    texts += ["a" * n for n in (1, 127, 128, 129, 255, 256, 257, 1000)]
    texts += [_random_text(rng, n) for n in (43, 64, 100, 700)]            # 128+ bytes in UTF-8
    texts += ["", "0", "-0", "00", "007", "+5", " 5", "5 ", "1e3", "42", "-7", "-", "--1", "1-",
              "9223372036854775807", "9223372036854775808", "-9223372036854775808",
              "-9223372036854775809", "922337203685477580", "9223372036854775800",
              "99999999999999999999", "18446744073709551615", "١٢٣", "１２"]
    texts += [str(v) for v in rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)]
    return texts


@pytest.mark.slow     # traces a BLAKE2b graph per personalisation: `make test` runs it
def test_blake2b_64_in_tensorflow_ops_is_hashlibs_for_messages_of_any_length(tf):
    from hybridps.export.tf_hashing import blake2b_64
    rng = np.random.default_rng(0)
    lengths = [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 257, 384, 1000, 4097]
    lengths += [int(n) for n in rng.integers(0, 300, size=1500)]
    messages = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in lengths]
    for person in (hashing.VALUE_PERSON, hashing.HASH_PERSON, hashing.SPACE_PERSON, b"", b"abc"):
        got = tf.function(lambda m: blake2b_64(tf, m, person))(tf.constant(messages, tf.string))
        want = [int.from_bytes(hashlib.blake2b(m, digest_size=8, person=person).digest(), "little")
                for m in messages]
        np.testing.assert_array_equal(got.numpy(), np.array(want, np.uint64), err_msg=repr(person))
    empty = tf.function(lambda m: blake2b_64(tf, m, b"x"))(tf.constant([], tf.string))
    assert empty.shape == (0,)


def test_text_ids_in_tensorflow_ops_are_the_readers(tf):
    from hybridps.export.tf_hashing import text_ids
    texts = _texts(np.random.default_rng(1))
    want = hashing.text_ids(texts)
    got = tf.function(lambda t: text_ids(tf, t))(tf.constant(texts, tf.string)).numpy()
    mismatched = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatched, mismatched[:5]
    assert got[texts.index("")] == hashing.MISSING_ID
    assert got[texts.index("-9223372036854775808")] == -2**63 and got[texts.index("-7")] == -7
    grid = np.array(texts[:60], object).reshape(6, 10)                  # any shape
    np.testing.assert_array_equal(text_ids(tf, tf.constant(grid)).numpy(), want[:60].reshape(6, 10))


def test_space_keys_and_criteo_keys_in_tensorflow_ops_are_the_readers(tf):
    from hybridps.export.tf_hashing import criteo_keys, space_keys
    rng = np.random.default_rng(2)
    ids = np.concatenate([[0, 1, -1, -2, 2**63 - 1, -2**63, 2**48, -2**48],
                          rng.integers(-2**63, 2**63 - 1, size=3000, dtype=np.int64),
                          rng.integers(-1000, 1000, size=500)]).astype(np.int64)
    for space in ("user", "item", "7", "ünï 空间"):
        got = space_keys(tf, tf.constant(ids), space).numpy()
        np.testing.assert_array_equal(got, hashing.space_keys(space, ids), err_msg=space)
    fields = 26
    values = [[f"{v:08x}" if v % 7 else "" for v in rng.integers(0, 2**32, size=40)] for _ in range(fields)]
    values[3][5] = "ünïcødé"
    got = criteo_keys(tf, [tf.constant(column, tf.string) for column in values]).numpy()
    want = np.stack([hashing.feature_keys(f, values[f]) for f in range(fields)], axis=1)
    np.testing.assert_array_equal(got, want)


def _schema(features=TWO_TASK_SCHEMA, model="wide_deep"):
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    config = make_config(overrides={"features": features, "model": model, "hidden": [8]})
    return config, build_schema(config)


def _saved(tf, tmp_path, model, schema, rows, name):
    from hybridps.export.saved_model import _make_serving_module_class
    from hybridps.export.saving import save_atomically
    module = _make_serving_module_class(tf)(model, schema, rows, 5, "hash")
    return tf.saved_model.load(save_atomically(tf, module, tmp_path / name, False))


def _call(signature, inputs, tf):
    return {k: v.numpy() for k, v in signature(**{n: tf.constant(a) for n, a in inputs.items()}).items()}


@pytest.mark.slow     # saves and loads a SavedModel: `make test` runs it
def test_the_savedmodel_takes_raw_values_and_answers_each_task(tmp_path, tf):
    from hybridps.models import build_model
    from hybridps.serving.inputs import serving_inputs
    from hybridps.step import build_on_sample, sample_inputs
    config, schema = _schema()
    columns = raw_rows(64, seed=0)
    rows = table_rows(schema, columns)
    by_hand = inputs_by_hand(schema, columns, rows)
    tf.keras.utils.set_random_seed(0)
    one_task = build_on_sample(tf, build_model("wide_deep", schema, config), schema)
    _, two_task_schema = _schema(LABELLED_TWO_TASK_SCHEMA)
    two_tasks = build_two_task_model(two_task_schema, config)
    two_tasks(sample_inputs(tf, two_task_schema), training=False)
    for model, name, served_schema in ((one_task, "one", schema), (two_tasks, "two", two_task_schema)):
        loaded = _saved(tf, tmp_path, model, served_schema, rows, name)
        signature = loaded.signatures["serving_default"]
        specs = signature.structured_input_signature[1]
        assert {n: (s.dtype.name, s.shape.as_list()) for n, s in specs.items()} == {
            "dense": ("float32", [None, 2]), "user": ("string", [None]), "item": ("int64", [None]),
            "tags": ("string", [None, None]), "seen": ("int64", [None, None])}
        served = _call(signature, raw_inputs(schema, columns), tf)
        from_ids = _call(loaded.signatures["ids"], serving_inputs(schema, columns, 64), tf)
        outputs = model({k: tf.constant(v) for k, v in by_hand.items()}, training=False)
        if name == "one":
            logit = np.asarray(outputs).reshape(-1)
            want = {"logit": logit, "probability": sigmoid(logit)}
        else:
            want = {task: sigmoid(np.asarray(value).reshape(-1)) for task, value in outputs.items()}
        assert set(served) == set(from_ids) == set(want) == (
            {"logit", "probability"} if name == "one" else {"click", "conversion"})
        for task in want:
            np.testing.assert_allclose(served[task], want[task], rtol=1e-5, atol=1e-6, err_msg=task)
            np.testing.assert_allclose(from_ids[task], want[task], rtol=1e-5, atol=1e-6, err_msg=task)
        assert np.ptp(served[sorted(want)[0]]) > 1e-3               # rows differ: the rows count


def _serve_values(module, schema, columns, tf):
    """The module's serving_default function (not saved) on raw columns, numpy by output."""
    inputs = raw_inputs(schema, columns)
    out = module.serve_values(*[tf.constant(inputs[n]) for n in ["dense"] + [f.name for f in schema.sparse]])
    return {k: v.numpy() for k, v in out.items()}


def test_the_served_outputs_are_the_schemas_tasks(tf):
    """One label answers logit and probability, also from a model returning a dict (mmoe's
    {label: ...}); a labels: schema answers each of its tasks by its kind (a regression task
    the model's value) and not a model's other outputs."""
    from hybridps.export.saved_model import _make_serving_module_class
    from hybridps.models import build_model
    from hybridps.step import build_on_sample
    config, schema = _schema(model="mmoe")
    columns = raw_rows(16, seed=2)
    rows = table_rows(schema, columns)
    by_hand = {k: tf.constant(v) for k, v in inputs_by_hand(schema, columns, rows).items()}
    tf.keras.utils.set_random_seed(0)
    mmoe = build_on_sample(tf, build_model("mmoe", schema, config), schema)
    module = _make_serving_module_class(tf)(mmoe, schema, rows, 5, "h")
    served = _serve_values(module, schema, columns, tf)
    logit = np.asarray(mmoe(by_hand, training=False)["label"]).reshape(-1)
    assert module.task_names is None and sorted(served) == ["logit", "probability"]
    np.testing.assert_allclose(served["logit"], logit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["probability"], sigmoid(logit), rtol=1e-5, atol=1e-6)

    features = {**LABELLED_TWO_TASK_SCHEMA, "labels": [{"name": "conversion", "kind": "regression"}]}
    _, one_regression = _schema(features)
    two_tasks = build_two_task_model(one_regression)         # returns click and conversion
    outputs = two_tasks(by_hand, training=False)
    module = _make_serving_module_class(tf)(two_tasks, one_regression, rows, 5, "h")
    served = _serve_values(module, one_regression, columns, tf)
    assert module.task_names == ("conversion",) and sorted(served) == ["conversion"]
    np.testing.assert_allclose(served["conversion"], np.asarray(outputs["conversion"]).reshape(-1),
                               rtol=1e-5, atol=1e-6)


def _old_export_columns():
    with open(os.path.join(OLD_EXPORT, "rows.json")) as fh:
        return json.load(fh)


@pytest.mark.slow     # saves and loads a SavedModel: `make test` runs it
def test_an_export_of_earlier_hybridps_still_loads_and_serves_the_same(tmp_path, tf):
    """The fixture's SavedModel (serving_default on int64 ids) answers as it did when it was
    written, also saved again (what a delta applied to it does); its checkpoint exported now
    takes raw values (every feature as text: that schema has no dtype) for the same answers."""
    from hybridps.checkpoint.format import schema_of
    from hybridps.checkpoint.reader import load_manifest, resolve_checkpoint
    from hybridps.export import export_saved_model
    from hybridps.export.saving import save_atomically
    from hybridps.serving.inputs import serving_inputs
    recorded = _old_export_columns()
    columns, want = recorded["columns"], np.array(recorded["probability"])
    schema = schema_of(load_manifest(resolve_checkpoint(os.path.join(OLD_EXPORT, "ckpt"))))
    assert {f.dtype for f in schema.sparse} == {"string"}
    ids = serving_inputs(schema, columns, len(want))
    old = tf.saved_model.load(os.path.join(OLD_EXPORT, "savedmodel"))
    np.testing.assert_allclose(_call(old.signatures["serving_default"], ids, tf)["probability"], want,
                               rtol=1e-6, atol=1e-7)
    resaved = tf.saved_model.load(save_atomically(tf, old, tmp_path / "resaved", False))
    assert list(resaved.signatures) == ["serving_default"]
    np.testing.assert_allclose(_call(resaved.signatures["serving_default"], ids, tf)["probability"],
                               want, rtol=1e-6, atol=1e-7)
    export_saved_model(os.path.join(OLD_EXPORT, "ckpt"), tmp_path / "now")
    now = tf.saved_model.load(str(tmp_path / "now"))
    as_text = {name: [[str(v) for v in c] if isinstance(c, list) else str(c) for c in cells]
               if name in {f.name for f in schema.sparse} else cells for name, cells in columns.items()}
    served = _call(now.signatures["serving_default"], raw_inputs(schema, as_text), tf)
    np.testing.assert_allclose(served["probability"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_call(now.signatures["ids"], ids, tf)["probability"], want, rtol=1e-5, atol=1e-6)


def _criteo_sample(n):
    """(labels, dense raw counts (n, 13), categorical texts 26 lists of n) of the bundled sample."""
    from hybridps.data import SAMPLE_CRITEO_CSV
    with open(SAMPLE_CRITEO_CSV) as fh:
        header = fh.readline().rstrip("\n").split(",")
        lines = [fh.readline().rstrip("\n").split(",") for _ in range(n)]
    dense = np.array([[float(line[header.index(f"I{i}")] or 0) for i in range(1, 14)] for line in lines])
    texts = [[line[header.index(f"C{f}")] for line in lines] for f in range(1, 27)]
    return dense, texts


@pytest.mark.slow     # saves and loads a SavedModel: `make test` runs it
def test_a_criteo_checkpoint_of_earlier_hybridps_serves_the_criteo_texts(tmp_path, tf):
    from hybridps.checkpoint.reader import load_manifest, read_dense, read_table_rows, resolve_checkpoint
    from hybridps.export import export_saved_model
    from hybridps.export.saved_model import build_model_from_manifest
    ckpt = resolve_checkpoint(LEGACY_CRITEO)
    manifest = load_manifest(ckpt)
    export_saved_model(ckpt, tmp_path / "criteo")
    loaded = tf.saved_model.load(str(tmp_path / "criteo"))
    dense, texts = _criteo_sample(48)
    texts[0][0], texts[5][1] = "", ""
    # by hand: log1p(max(x, 0)), feature_keys per field, the checkpoint's rows (zeros if absent)
    model, schema = build_model_from_manifest(manifest)
    from hybridps.tf_compat import model_weights
    for variable, value in zip(model_weights(model), read_dense(ckpt, manifest)[0]):
        variable.assign(value)
    lookup = []
    for t in range(len(manifest["tables"])):
        rows = read_table_rows(ckpt, manifest, t)
        lookup.append(dict(zip(rows["keys"].tolist(), rows["values"])))
    keys = np.stack([hashing.feature_keys(f, texts[f]) for f in range(26)], axis=1)
    inputs = {"dense": np.log1p(np.maximum(dense, 0)).astype(np.float32)}
    found = 0
    for f, feature in enumerate(schema.sparse):
        t = schema.table_index(feature.table)
        rows = [lookup[t].get(int(k)) for k in keys[:, f]]
        found += sum(r is not None for r in rows)
        inputs[feature.name] = np.stack([r if r is not None else np.zeros(schema.tables[t].dim, np.float32)
                                         for r in rows])
    assert found > 100                                    # the sample's values are in the tables
    logit = np.asarray(model({k: tf.constant(v) for k, v in inputs.items()}, training=False)).reshape(-1)
    raw = {"dense": dense.astype(np.float32), **{f"C{f + 1}": np.array(texts[f], object) for f in range(26)}}
    served = _call(loaded.signatures["serving_default"], raw, tf)
    np.testing.assert_allclose(served["logit"], logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served["probability"], sigmoid(logit), rtol=1e-5, atol=1e-6)
    from_keys = _call(loaded.signatures["ids"], {"dense": inputs["dense"], "keys": keys}, tf)
    np.testing.assert_allclose(from_keys["logit"], logit, rtol=1e-5, atol=1e-5)


def test_a_sparse_features_dtype_is_string_or_int64():
    from hybridps.errors import ConfigError
    _, schema = _schema()
    assert [f.dtype for f in schema.sparse] == ["string", "int64", "string", "int64"]
    bad = json.loads(json.dumps(TWO_TASK_SCHEMA))
    bad["sparse"][1]["dtype"] = "int32"
    with pytest.raises(ConfigError, match=r"features.sparse.item.dtype: 'int32' is not one of string, int64"):
        _schema(bad)


# ---------------------------------------------------------------------------- end to end, several tasks
# three tasks over tests.schema_data's features: two binary (ESMM's click and conversion), one
# regression
E2E_FEATURES = {**MULTITASK_FEATURES,
                "labels": [{"name": "click"}, {"name": "conversion"}, MULTITASK_FEATURES["labels"][1]]}
E2E_MODELS = {"mmoe": {"num_experts": 2, "expert_units": [4]}, "esmm": {}}


# Runs hybridps commands in turn in one Python process, each as `hybridps` runs it
# (hybridps.cli.main), and prints the list of their standard outputs as JSON.
_CLI_SESSION = """
import contextlib, io, json, sys
from hybridps.cli import main
outputs = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(argv)
    assert code == 0, (argv, code)
    outputs.append(out.getvalue())
print(json.dumps(outputs))
"""


def _cli(*commands, timeout=300):
    """Run the hybridps COMMANDS (each a list of arguments) in turn in one process (one
    TensorFlow start for all of them); returns the standard output of each."""
    from tests.mpi_util import MPI_ENV, REPO
    argvs = [[str(a) for a in command] for command in commands]
    proc = subprocess.run([sys.executable, "-c", _CLI_SESSION, json.dumps(argvs)], cwd=REPO,
                          env=dict(os.environ, **MPI_ENV, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (argvs, proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(proc.stdout.splitlines()[-1])


def _e2e_rows(n):
    """multitask_rows with a conversion (only after a click, None where the click is), as raw
    request values: the text features' values as text (integers as their decimal text)."""
    columns = multitask_rows(n, seed=3)
    columns["conversion"] = [None if c is None else int(c == 1 and i % 3 == 0)
                             for i, c in enumerate(columns["click"])]
    return columns


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    """Each model of E2E_MODELS trained (1 rank, synthetic rows of the schema, a checkpoint and
    full + delta exports) and `hybridps predict` on a Parquet file of _e2e_rows(48), every
    command in one process; (the runs' directory, the rows)."""
    import yaml
    out = tmp_path_factory.mktemp("e2e")
    columns = _e2e_rows(48)
    data = write_parquet(out / "rows.parquet", columns, 16)
    commands = []
    for model in sorted(E2E_MODELS):
        run = out / model
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"features": E2E_FEATURES, "model": model,
                                                         "hidden": [8], **E2E_MODELS[model]}))
        commands += [["train", "--config", run / "config.yaml", "--data", "synthetic", "--vocab-size", 200,
                      "--steps", 4, "--batch-size", 32, "--checkpoint-dir", run / "ckpt",
                      "--checkpoint-every", 4, "--delta-export-dir", run / "exports", "--delta-every", 2,
                      "--full-export-every", 2, "--no-progress"],
                     ["predict", "--checkpoint", run / "ckpt", "--data", data, "--out", run / "p.parquet"]]
    _cli(*commands)
    return out, columns


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(E2E_MODELS))
def test_a_multitask_run_exports_and_serves_what_predict_writes(e2e_runs, tmp_path, tf, model):
    """Train (1 rank, synthetic rows of the schema, a checkpoint and full + delta exports),
    `hybridps predict` a Parquet file: the SavedModel of `hybridps export` on the same raw
    rows answers each task as predict's column (the sigmoid of a binary task, the value of
    the regression task), and the serve app on the trained full + delta exports answers the
    same in row and column form."""
    import pyarrow.parquet as pq
    from hybridps.export.saved_model import export_saved_model
    from hybridps.serving.live import LiveModel
    from tests.test_serve import _post, _with_client
    run, columns = e2e_runs[0] / model, e2e_runs[1]
    exports = run / "exports"
    assert sorted(os.listdir(exports)) == ["delta-0000000002-0000000002-0000000004",
                                           "full-0000000001-0000000002"]
    predicted = pq.read_table(run / "p.parquet").to_pydict()
    tasks = ["click", "conversion", "rating"]
    assert {"click", "conversion", "rating", "rating_label"} <= set(predicted)

    result = export_saved_model(run / "ckpt", tmp_path / "savedmodel")
    schema = result["schema"]
    assert result["tasks"] == tuple(tasks) and schema.task_names == tuple(tasks)
    signature = tf.saved_model.load(result["path"]).signatures["serving_default"]
    assert sorted(signature.structured_outputs) == tasks
    values = {name: [[str(v) for v in cell] if isinstance(cell, list) else str(cell)
                     for cell in columns[name]] for name in ("user", "item", "tags", "seen")}
    raw = {**columns, **values}
    served = _call(signature, raw_inputs(schema, raw), tf)
    for task in tasks:
        np.testing.assert_allclose(served[task], predicted[task], rtol=1e-5, atol=1e-6, err_msg=task)
    for task in ("click", "conversion"):                                  # probabilities
        assert ((served[task] > 0) & (served[task] < 1)).all()

    live = LiveModel(exports)
    held = live.catch_up()                           # the full export of step 2, its delta to 4
    assert (held.sequence, held.step) == (2, 4) and live.module.task_names == tuple(tasks)
    features = [f["name"] for f in E2E_FEATURES["dense"]] + [f["name"] for f in E2E_FEATURES["sparse"]]
    request = {name: [v.item() if isinstance(v, np.generic) else v for v in raw[name]] for name in features}
    request = {name: [[int(x) if isinstance(x, np.integer) else x for x in v] if isinstance(v, list) else v
                      for v in cells] for name, cells in request.items()}
    instances = [{name: request[name][i] for name in features} for i in range(48)]

    async def scenario(client):
        code, answer = await _post(client, {"instances": instances})
        assert code == 200 and (answer["version"], answer["step"]) == (2, 4), answer
        for task in tasks:
            np.testing.assert_allclose([p[task] for p in answer["predictions"]], predicted[task],
                                       rtol=1e-5, atol=1e-6, err_msg=task)
        code, answer = await _post(client, {"inputs": request})
        assert code == 200 and sorted(answer["outputs"]) == tasks, answer
        for task in tasks:
            np.testing.assert_allclose(answer["outputs"][task], predicted[task], rtol=1e-5, atol=1e-6,
                                       err_msg=task)
    live.start()
    try:
        _with_client(live, scenario)
    finally:
        live.stop()
