"""Several tasks in one process: the ``labels:`` schema and its errors, every reader's label
matrix with missing labels and row weights, the synthetic funnel, the per-task losses against
numpy, the model contract, ESMM and MMoE, and per-task metrics against scikit-learn.
(Several ranks, training, evaluate and predict: tests/test_parallel_bsp.py.)
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hybridps.config import make_config  # noqa: E402
from hybridps.errors import ConfigError, DataError  # noqa: E402
from hybridps.schema import Task, build_schema, schema_from_dict  # noqa: E402

SMALL = {"labels": [{"name": "click"},
                    {"name": "rating", "column": "stars", "kind": "regression"}],
         "weight": "w",
         "dense": [{"name": "x"}],
         "sparse": [{"name": "item", "table": "item"}],
         "tables": {"item": {"dim": 4}}}


def schema_of(features):
    return build_schema(make_config(overrides={"features": features}))


# ---------------------------------------------------------------------- the schema
def test_labels_list_defaults_and_the_json_form_round_trip():
    schema = schema_of(SMALL)
    assert schema.tasks == (Task("click", "click", "binary", 1.0, "logloss", 1.0),
                            Task("rating", "stars", "regression", 1.0, "mse", 1.0))
    assert schema.label == "click" and schema.weight == "w"
    assert schema_from_dict(schema.to_dict()) == schema


def test_a_schema_description_without_labels_is_one_binary_task():
    one = schema_of({k: v for k, v in SMALL.items() if k not in ("labels", "weight")})
    data = one.to_dict()
    assert "labels" not in data and "weight" not in data      # as manifests written before
    again = schema_from_dict(data)
    assert again.labels == () and again.tasks == (Task("label", "label"),)
    assert "tasks" not in again.signature()


@pytest.mark.parametrize("labels, message", [
    ([{"name": "a", "kind": "ordinal"}], "features.labels.a.kind"),
    ([{"name": "a", "loss": "huber"}], "features.labels.a.loss"),
    ([{"name": "a", "kind": "regression", "delta": 2.0}], "only the huber loss"),
    ([{"name": "a", "kind": "regression", "loss": "huber", "delta": 0}], "features.labels.a.delta"),
    ([{"name": "a", "loss_weight": -1}], "features.labels.a.loss_weight"),
    ([{"name": "a"}, {"name": "a", "column": "b"}], "used twice"),
    ([], "features.labels"),
])
def test_bad_labels_are_config_errors_naming_the_task_and_field(labels, message):
    with pytest.raises(ConfigError, match=message):
        schema_of(dict(SMALL, labels=labels))


POST_CLICK = dict(SMALL, labels=[{"name": "click"},
                                 {"name": "cvr", "column": "buy", "given": "click", "ipw": True},
                                 {"name": "rating", "column": "stars", "kind": "regression",
                                  "given": "click"}])


def test_a_task_given_another_parses_and_round_trips():
    schema = schema_of(POST_CLICK)
    assert [(t.name, t.column, t.given, t.ipw) for t in schema.tasks] == [
        ("click", "click", None, False), ("cvr", "buy", "click", True),
        ("rating", "stars", "click", False)]
    assert schema_from_dict(schema.to_dict()) == schema


@pytest.mark.parametrize("labels, message", [
    ([{"name": "a", "given": "a"}], r"features.labels.a.given: a task cannot be given itself"),
    ([{"name": "a"}, {"name": "b", "given": "c"}], r"features.labels.b.given: 'c' is not a task"),
    ([{"name": "r", "kind": "regression"}, {"name": "b", "given": "r"}],
     r"features.labels.b.given: 'r' is a regression task"),
    ([{"name": "a"}, {"name": "b", "given": "a"}, {"name": "c", "given": "b"}],
     r"features.labels.c.given: 'b' is itself given 'a'; chains are not supported"),
    ([{"name": "a"}, {"name": "b", "given": 3}], r"features.labels.b.given: expected the name"),
    ([{"name": "a"}, {"name": "b", "ipw": True}], r"features.labels.b.ipw: .* needs 'given'"),
    ([{"name": "a"}, {"name": "b", "given": "a", "ipw": "yes"}], r"features.labels.b.ipw: expected true"),
])
def test_a_bad_given_is_a_config_error_naming_the_task(labels, message):
    with pytest.raises(ConfigError, match=message):
        schema_of(dict(SMALL, labels=labels))


def test_the_parsed_cache_keys_a_given_and_keeps_the_keys_of_schemas_without_one():
    """A cached part holds the masked labels: a schema with a given reads its own entries;
    a schema without one keeps the key it had (its entries stay valid)."""
    from hybridps.data.parsed_cache import conversion_inputs
    plain = dict(POST_CLICK, labels=[{k: v for k, v in t.items() if k not in ("given", "ipw")}
                                     for t in POST_CLICK["labels"]])
    assert conversion_inputs(schema_of(plain))["labels"] == [
        ["click", "click", "binary"], ["cvr", "buy", "binary"], ["rating", "stars", "regression"]]
    assert conversion_inputs(schema_of(POST_CLICK)) != conversion_inputs(schema_of(plain))


def test_label_and_labels_together_is_a_config_error():
    with pytest.raises(ConfigError, match="either 'label'"):
        schema_of(dict(SMALL, label="click"))


# ---------------------------------------------------------------------- the readers
COLUMNS = {"click": [1, None, 0, 1, 0, None], "stars": [4.5, 3.0, None, 2.25, None, 1.0],
           "w": [1.0, 2.0, 0.5, 1.0, 1.5, 0.25], "x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
           "item": [1, 2, 3, 4, 5, 6]}
WANT_LABELS = np.array([[1, 4.5], [np.nan, 3.0], [0, np.nan], [1, 2.25], [0, np.nan],
                        [np.nan, 1.0]], np.float32)


def write_small_csv(path, columns=COLUMNS):
    names = list(columns)
    lines = [",".join(names)] + [",".join("" if columns[n][i] is None else str(columns[n][i])
                                          for n in names) for i in range(len(columns["x"]))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_small_parquet(path, columns=COLUMNS):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"click": pa.array(columns["click"], pa.int64()),
                      "stars": pa.array(columns["stars"], pa.float64()),
                      "w": columns["w"], "x": columns["x"], "item": columns["item"],
                      **({"buy": pa.array(columns["buy"], pa.int64())} if "buy" in columns else {})})
    pq.write_table(table, path, row_group_size=3)
    return str(path)


def write_small_tfrecord(path, columns=COLUMNS):
    import tensorflow as tf
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(len(columns["x"])):
            feature = {"w": tf.train.Feature(float_list=tf.train.FloatList(value=[columns["w"][i]])),
                       "x": tf.train.Feature(float_list=tf.train.FloatList(value=[columns["x"][i]])),
                       "item": tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["item"][i]]))}
            if columns["click"][i] is not None:      # an absent feature: a missing label
                feature["click"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["click"][i]]))
            if columns.get("buy", [None] * len(columns["x"]))[i] is not None:
                feature["buy"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[columns["buy"][i]]))
            if columns["stars"][i] is not None:
                feature["stars"] = tf.train.Feature(float_list=tf.train.FloatList(value=[columns["stars"][i]]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(path)


def read_all(kind, path, schema):
    from hybridps.data.parquet import ParquetReader
    from hybridps.data.schema_csv import SchemaCSVReader
    from hybridps.data.tfrecord import TFRecordReader
    if kind == "csv":
        return SchemaCSVReader(path, schema).share
    return {"parquet": ParquetReader, "tfrecord": TFRecordReader}[kind]([path], schema).all_rows()


@pytest.mark.parametrize("kind", ["csv", "parquet", "tfrecord"])
def test_every_file_reader_gives_the_label_matrix_with_missing_labels_and_the_weights(tmp_path, kind):
    write = {"csv": write_small_csv, "parquet": write_small_parquet, "tfrecord": write_small_tfrecord}[kind]
    path = write(tmp_path / f"a.{kind}")
    batch = read_all(kind, path, schema_of(SMALL))
    np.testing.assert_array_equal(batch.labels, WANT_LABELS)       # NaN where missing
    np.testing.assert_allclose(batch.weights, COLUMNS["w"], rtol=1e-6)
    assert batch.positives == 2
    taken = batch.take(np.array([3, 1]))
    np.testing.assert_array_equal(taken.labels, WANT_LABELS[[3, 1]])
    np.testing.assert_allclose(taken.weights, [1.0, 2.0])


def test_the_directory_stream_and_the_redis_rows_carry_the_label_matrix(tmp_path):
    from hybridps.data.stream import DirectoryStream
    from tests.test_readers import EveryRankReady
    schema = schema_of(SMALL)
    (tmp_path / "in").mkdir()
    write_small_csv(tmp_path / "in" / "a-1.csv")
    open(tmp_path / "in" / "_END", "w").close()
    stream = DirectoryStream(str(tmp_path / "in"), schema)
    (batch,) = list(stream.iter_batches(6, None, control=EveryRankReady()))
    np.testing.assert_array_equal(batch.labels, WANT_LABELS)
    # a Redis entry's fields are text; an absent field is a missing label
    np.testing.assert_array_equal(_redis_rows(schema, COLUMNS).labels, WANT_LABELS)


def _redis_rows(schema, columns):
    """The batch a Redis stream makes of the six entries of ``columns``: an entry's fields are
    text, and an absent field (None here) is a missing value."""
    from hybridps.data.columns import ColumnConverter
    from hybridps.data.stream import RedisStream
    redis = RedisStream.__new__(RedisStream)
    redis.schema, redis.where = schema, "redis://test/s"
    redis.converter = ColumnConverter(schema)
    redis.columns = redis.converter.required_columns()
    redis.pending = [(f"{i}-0", {name.encode(): str(values[i]).encode()
                                 for name, values in columns.items() if values[i] is not None}, 0.0)
                     for i in range(6)]
    return redis._rows(0, 6)


WITH_BUY = dict(COLUMNS, buy=[1, 1, None, 0, 1, 0])      # a conversion column for POST_CLICK


@pytest.mark.parametrize("kind", ["csv", "parquet", "tfrecord"])
def test_every_reader_leaves_a_given_task_missing_where_its_given_label_is_not_1(tmp_path, kind):
    """COLUMNS' click is 1, missing, 0, 1, 0, missing: a task given the click keeps its label on
    rows 0 and 3 only (the binary cvr and the regression rating alike); the click is unchanged."""
    write = {"csv": write_small_csv, "parquet": write_small_parquet, "tfrecord": write_small_tfrecord}[kind]
    batch = read_all(kind, write(tmp_path / f"a.{kind}", WITH_BUY), schema_of(POST_CLICK))
    want = np.full((6, 3), np.nan, np.float32)
    want[:, 0] = WANT_LABELS[:, 0]
    want[[0, 3], 1], want[[0, 3], 2] = [1, 0], [4.5, 2.25]
    np.testing.assert_array_equal(batch.labels, want)


def test_the_directory_stream_and_the_redis_rows_leave_a_given_task_missing(tmp_path):
    from hybridps.data.stream import DirectoryStream
    from tests.test_readers import EveryRankReady
    schema = schema_of(POST_CLICK)
    (tmp_path / "in").mkdir()
    write_small_csv(tmp_path / "in" / "a-1.csv", WITH_BUY)
    open(tmp_path / "in" / "_END", "w").close()
    (batch,) = list(DirectoryStream(str(tmp_path / "in"), schema).iter_batches(6, None, control=EveryRankReady()))
    for labels in (batch.labels, _redis_rows(schema, WITH_BUY).labels):
        present = ~np.isnan(labels)
        np.testing.assert_array_equal(present[:, 1], [True, False, False, True, False, False])
        np.testing.assert_array_equal(labels[[0, 3], 1], [1, 0])


@pytest.mark.parametrize("kind", ["csv", "parquet"])
@pytest.mark.parametrize("column, value, message", [
    ("click", 2, r"'click'.*the binary task 'click'"),
    ("stars", float("inf"), r"'stars'.*the regression task 'rating'"),
    ("w", -1.0, r"'w'.*the row weight"),
])
def test_a_bad_label_or_weight_names_the_task_and_the_column(tmp_path, kind, column, value, message):
    columns = {k: list(v) for k, v in COLUMNS.items()}
    columns[column][4] = "abc" if kind == "csv" and column == "stars" else value   # CSV: not a number
    write = write_small_csv if kind == "csv" else write_small_parquet
    path = write(tmp_path / f"a.{kind}", columns)
    with pytest.raises(DataError, match=message):
        read_all(kind, path, schema_of(SMALL))


# ---------------------------------------------------------------------- synthetic data
def test_the_synthetic_funnel_converts_only_after_a_click_and_observes_values_after_one():
    from hybridps.data.synthetic_schema import SchemaSynthetic
    features = dict(SMALL, labels=[{"name": "click"}, {"name": "conversion"},
                                   {"name": "dwell", "kind": "regression"}])
    features.pop("weight")
    data = SchemaSynthetic(schema_of(features), seed=5, vocab_size=1000)
    (batch,) = list(data.iter_batches(4096, 1))
    click, conversion, dwell = batch.labels.T
    assert set(np.unique(click)) == {0.0, 1.0} and set(np.unique(conversion)) == {0.0, 1.0}
    assert not np.any((conversion == 1) & (click == 0))
    np.testing.assert_array_equal(np.isnan(dwell), click == 0)
    assert 0.1 < conversion[click == 1].mean() < 0.9
    again = next(iter(SchemaSynthetic(schema_of(features), seed=5, vocab_size=1000).iter_batches(4096, 1)))
    np.testing.assert_array_equal(again.labels, batch.labels)      # deterministic, NaN included


def test_the_synthetic_funnel_labels_a_task_given_the_click_on_clicked_rows_only():
    """A post-click task reading the conversion's column: the conversion's labels where the
    click is 1, missing elsewhere (as a reader of the same rows makes them)."""
    from hybridps.data.synthetic_schema import SchemaSynthetic
    features = dict(SMALL, labels=[{"name": "click"}, {"name": "conversion"},
                                   {"name": "cvr", "column": "conversion", "given": "click"}])
    features.pop("weight")
    batch = SchemaSynthetic(schema_of(features), seed=5, vocab_size=1000).batch(0, 4096)
    click, conversion, cvr = batch.labels.T
    np.testing.assert_array_equal(np.isnan(cvr), click != 1)
    np.testing.assert_array_equal(cvr[click == 1], conversion[click == 1])
    assert 0 < np.count_nonzero(cvr == 1) < np.count_nonzero(click == 1)


def test_the_synthetic_funnel_plants_a_rare_click_and_a_conversion_sharing_its_signal():
    """target_ctr sets the mean click rate (a funnel's few percent); the conversion is a
    label over every impression (0, never missing, without a click), about half of the clicks
    convert (more among rarer clicks: they are the rows of a high planted click logit), clicks
    of a higher planted click probability convert more often (the conversion shares the
    click's features), and conversion_own_scale weighs the conversion's own term."""
    from hybridps.data.synthetic_schema import SchemaSynthetic
    features = dict(SMALL, labels=[{"name": "click"}, {"name": "conversion"}])
    features.pop("weight")
    data = SchemaSynthetic(schema_of(features), seed=3, vocab_size=1000, target_ctr=0.04)
    batch = data.batch(0, 200_000)
    click, conversion = batch.labels.T
    assert not np.isnan(batch.labels).any()
    # the calibration sample's mean vs this one: binomial sd 0.0004, plus the sample's own
    assert abs(click.mean() - 0.04) < 0.006
    assert not np.any((conversion == 1) & (click == 0))
    clicked = click == 1
    assert 0.2 < conversion[clicked].mean() < 0.7
    p_click = data.true_probabilities(batch)[clicked]
    high = p_click > np.median(p_click)
    assert conversion[clicked][high].mean() > conversion[clicked][~high].mean() + 0.03
    default = SchemaSynthetic(schema_of(features), seed=3, vocab_size=1000).batch(0, 50_000)
    assert abs(default.labels[:, 0].mean() - 0.25) < 0.02          # today's default rate
    # conversion_probabilities: every impression's planted P(conversion | click), clicked or not
    planted = data.conversion_probabilities(batch)
    assert abs(planted[clicked].mean() - conversion[clicked].mean()) < 0.03
    order = np.argsort(data.true_probabilities(batch))
    assert np.any(np.diff(planted[order]) < 0)           # a term of its own: not the click's order
    shared = SchemaSynthetic(schema_of(features), seed=3, vocab_size=1000, target_ctr=0.04,
                             conversion_own_scale=0.0)
    assert np.all(np.diff(shared.conversion_probabilities(batch)[order]) >= 0)   # the click's alone
    with pytest.raises(ConfigError, match="conversion_own_scale"):
        SchemaSynthetic(schema_of(features), seed=3, vocab_size=1000, conversion_own_scale=-1)


# ---------------------------------------------------------------------- the losses
def test_task_loss_sums_equal_numpy_over_present_labels_with_row_weights():
    import tensorflow as tf
    from hybridps.models.loss import task_loss_sums
    tasks = (Task("c", "c"), Task("r", "r", "regression", loss="mse"),
             Task("h", "h", "regression", loss="huber", delta=0.5))
    labels = np.array([[1, 2.0, 0.1], [np.nan, 1.0, np.nan], [0, np.nan, 3.0], [1, -1.0, 0.4]], np.float32)
    outputs = np.array([[0.3, 1.5, 0.0], [2.0, 0.0, 9.0], [-1.0, 7.0, 1.0], [0.5, -2.0, 0.2]], np.float32)
    weights = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    got = task_loss_sums(tf.constant(labels), tf.constant(outputs), tf.constant(weights), tasks).numpy()
    present = ~np.isnan(labels)
    y, f = np.nan_to_num(labels).astype(np.float64), outputs.astype(np.float64)
    p = 1 / (1 + np.exp(-f[:, 0]))
    logloss = -(y[:, 0] * np.log(p) + (1 - y[:, 0]) * np.log(1 - p))
    squared = (f[:, 1] - y[:, 1]) ** 2
    error = np.abs(f[:, 2] - y[:, 2])
    huber = np.where(error <= 0.5, 0.5 * error ** 2, 0.5 * (error - 0.25))
    want = [np.sum((weights * loss)[present[:, t]]) for t, loss in enumerate((logloss, squared, huber))]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_given_task_counts_on_the_rows_where_its_given_label_is_1_and_ipw_divides_by_pctr():
    """A hand-built batch: the conversion given the click is in the loss on rows 0 and 3
    only (the click is 0 or missing elsewhere); with ipw each row's loss is divided by its
    clipped pCTR (sigmoid of the click output, clipped to [0.05, 1]) and no gradient reaches
    the click output through that weight."""
    import tensorflow as tf
    from hybridps.models.loss import task_loss_sums
    from hybridps.tasks import mask_given
    click, conversion = [1, 0, np.nan, 1, 0], [1, 0, 1, 0, np.nan]
    for ipw in (False, True):
        tasks = (Task("click", "click"), Task("cvr", "conversion", given="click", ipw=ipw))
        labels = mask_given(tasks, np.array([click, conversion], np.float32).T.copy())
        np.testing.assert_array_equal(np.isnan(labels[:, 1]), [False, True, True, False, True])
        outputs = tf.Variable(np.array([[0.3, 1.2], [-1.0, 0.4], [2.0, -0.7], [-4.0, -0.2],
                                        [0.0, 0.9]], np.float32))
        weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
        with tf.GradientTape() as tape:
            sums = task_loss_sums(tf.constant(labels), outputs, tf.constant(weights), tasks)
            cvr_sum = sums[1]
        gradient = tape.gradient(cvr_sum, outputs).numpy()
        f = outputs.numpy().astype(np.float64)
        p_cvr, p_ctr = 1 / (1 + np.exp(-f[:, 1])), 1 / (1 + np.exp(-f[:, 0]))
        # rows 0 (converted) and 3 (not): -log p, -log(1 - p), times the row weight
        losses = np.array([-np.log(p_cvr[0]), -np.log(1 - p_cvr[3])]) * weights[[0, 3]]
        if ipw:     # p_ctr of row 3 is 0.018: clipped to 0.05
            losses = losses / np.array([p_ctr[0], 0.05])
        np.testing.assert_allclose(sums.numpy()[1], losses.sum(), rtol=1e-5)
        np.testing.assert_allclose(gradient[:, 0], 0.0)        # the propensity is a constant
        assert np.all(gradient[[1, 2, 4], 1] == 0)             # rows out of the task's loss


class TwoHeads:
    """A model returning the dict of two tasks, or a chosen broken output."""

    @staticmethod
    def build(returns):
        import tensorflow as tf

        class Model(tf.keras.Model):
            def __init__(self):
                super().__init__()
                self.head = tf.keras.layers.Dense(1)

            def call(self, inputs, training=None):
                value = tf.squeeze(self.head(inputs["dense"]), -1)
                return {"tensor": value, "only_click": {"click": value},
                        "both": {"click": value, "rating": value}}[returns]
        return Model()


@pytest.mark.parametrize("returns, message", [
    ("tensor", r"one tensor, but the schema has 2 tasks \['click', 'rating'\]"),
    ("only_click", r"task\(s\) \['rating'\] are not among them"),
])
def test_a_model_that_does_not_return_every_task_is_a_config_error_naming_it(returns, message):
    import tensorflow as tf
    from hybridps.step import build_on_sample
    with pytest.raises(ConfigError, match=message):
        build_on_sample(tf, TwoHeads.build(returns), schema_of(SMALL))
    build_on_sample(tf, TwoHeads.build("both"), schema_of(SMALL))


# ---------------------------------------------------------------------- ESMM and MMoE
FUNNEL = dict(SMALL, labels=[{"name": "click"}, {"name": "conversion"},
                             {"name": "rating", "column": "stars", "kind": "regression"}])


def test_esmm_supervises_the_conversion_by_the_product_of_its_two_towers():
    import tensorflow as tf
    from hybridps.models import build_model
    from hybridps.models.esmm import product_logit
    from hybridps.step import build_on_sample, sample_inputs
    a = np.array([-30.0, -2.0, 0.0, 1.5, 40.0])
    b = np.array([3.0, -1.0, 0.5, -20.0, 2.0])
    sig = lambda z: 1 / (1 + np.exp(-z))                       # noqa: E731
    got = sig(product_logit(tf.constant(a), tf.constant(b)).numpy())
    np.testing.assert_allclose(got, sig(a) * sig(b), rtol=1e-5)
    schema = schema_of(FUNNEL)
    config = make_config(overrides={"features": FUNNEL, "hidden": [4]})
    model = build_on_sample(tf, build_model("esmm", schema, config), schema)
    inputs = sample_inputs(tf, schema, batch=3)
    inputs["dense"] = tf.constant([[0.5], [-1.0], [2.0]])
    out = model(inputs)
    assert sorted(out) == ["click", "conversion", "rating"]
    x = tf.concat(model.feature_vectors(inputs) + [model.dense_input(inputs)], axis=1)
    ctr, cvr = model._tower("ctr", x).numpy(), model._tower("cvr", x).numpy()
    np.testing.assert_allclose(sig(out["conversion"].numpy()), sig(ctr) * sig(cvr), rtol=1e-5)
    with pytest.raises(ConfigError, match="esmm needs two binary tasks"):
        build_model("esmm", schema_of(SMALL), config)


def test_esmm_answers_a_task_given_the_click_with_its_pcvr_tower_logit():
    """With a post-click task (the conversion given the click), ESMM returns its pCVR tower's
    logit for it, on the same weights as its pCTCVR; without one it builds the towers it
    always did (ctr, cvr, then one per further task)."""
    import tensorflow as tf
    from hybridps.models import build_model
    from hybridps.step import build_on_sample, sample_inputs
    features = dict(FUNNEL, labels=FUNNEL["labels"] + [{"name": "cvr", "column": "conversion",
                                                         "given": "click"}])
    schema = schema_of(features)
    config = make_config(overrides={"features": features, "hidden": [4], "seed": 3})
    model = build_on_sample(tf, build_model("esmm", schema, config), schema)
    inputs = sample_inputs(tf, schema, batch=3)
    inputs["dense"] = tf.constant([[0.5], [-1.0], [2.0]])
    inputs["item"] = tf.constant(np.random.default_rng(2).normal(size=(3, 4)), tf.float32)
    out = model(inputs)
    assert sorted(out) == ["click", "conversion", "cvr", "rating"]
    x = tf.concat(model.feature_vectors(inputs) + [model.dense_input(inputs)], axis=1)
    np.testing.assert_allclose(out["cvr"].numpy(), model._tower("cvr", x).numpy(), rtol=1e-6)
    sig = lambda z: 1 / (1 + np.exp(-np.asarray(z, np.float64)))     # noqa: E731
    np.testing.assert_allclose(sig(out["cvr"]), sig(out["conversion"]) / sig(out["click"]), rtol=1e-4)
    assert list(model.tower_index) == ["ctr", "cvr", "rating"]       # no tower of its own
    plain = build_model("esmm", schema_of(FUNNEL), config)
    assert list(plain.tower_index) == ["ctr", "cvr", "rating"] and plain.post_click_tasks == []
    with pytest.raises(ConfigError, match="esmm needs two binary tasks without 'given'"):
        build_model("esmm", schema_of(dict(FUNNEL, labels=[{"name": "click"}, {
            "name": "cvr", "column": "conversion", "given": "click"}])), config)


def test_the_conversion_tower_is_esmm_pcvr_tower_alone_with_the_same_initial_weights():
    """The clicked-rows model of bench multitask: ESMM's pCVR tower for a one-task schema,
    built from the same seeds, so on the same inputs it returns ESMM's pCVR (pCTCVR / pCTR)."""
    import tensorflow as tf
    from hybridps.models import build_model
    from hybridps.step import build_on_sample, sample_inputs
    one_task = {k: v for k, v in FUNNEL.items() if k != "labels"}
    one_task["label"] = "conversion"
    config = make_config(overrides={"features": FUNNEL, "hidden": [4, 3], "seed": 7})
    esmm = build_on_sample(tf, build_model("esmm", schema_of(FUNNEL), config), schema_of(FUNNEL))
    tower = build_on_sample(tf, build_model("hybridps.models.esmm:build_conversion_tower",
                                            schema_of(one_task), config), schema_of(one_task))
    inputs = sample_inputs(tf, schema_of(FUNNEL), batch=3)
    inputs["dense"] = tf.constant([[0.5], [-1.0], [2.0]])
    inputs["item"] = tf.constant(np.random.default_rng(1).normal(size=(3, 4)), tf.float32)
    out = esmm(inputs)
    sig = lambda z: 1 / (1 + np.exp(-np.asarray(z, np.float64)))     # noqa: E731
    p_cvr = sig(out["conversion"]) / sig(out["click"])
    np.testing.assert_allclose(sig(tower(inputs).numpy()), p_cvr, rtol=1e-4)


def test_mmoe_returns_every_task_and_keeps_one_task_models_working():
    import tensorflow as tf
    from hybridps.models import build_model
    from hybridps.step import build_on_sample, sample_inputs
    config = make_config(overrides={"features": FUNNEL, "hidden": [4], "num_experts": 3,
                                    "expert_units": [5]})
    schema = schema_of(FUNNEL)
    model = build_on_sample(tf, build_model("mmoe", schema, config), schema)
    out = model(sample_inputs(tf, schema, batch=2))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"click": (2,), "conversion": (2,), "rating": (2,)}
    assert len(model.experts) == 3
    one = schema_of({k: v for k, v in SMALL.items() if k not in ("labels", "weight")})
    build_on_sample(tf, build_model("mmoe", one, config), one)          # the one task "label"
    for name in ("deepfm", "dcn"):
        build_on_sample(tf, build_model(name, one, config), one)


# ---------------------------------------------------------------------- per-task metrics
def test_task_metrics_equal_scikit_learn_over_the_rows_where_each_label_is_present():
    from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score
    from hybridps.evaluation import task_metrics
    rng = np.random.default_rng(3)
    n = 500
    labels = np.stack([(rng.random(n) < 0.3).astype(np.float64), rng.normal(2, 1, n)], 1)
    labels[rng.random(n) < 0.2, 0] = np.nan
    labels[rng.random(n) < 0.5, 1] = np.nan
    scores = np.stack([rng.random(n), rng.normal(2, 1, n)], 1)
    groups = rng.integers(0, 10, n)
    got = task_metrics(scores, labels, groups, schema_of(SMALL).labels)
    c, r = ~np.isnan(labels[:, 0]), ~np.isnan(labels[:, 1])
    assert got["rows"] == n
    assert got["tasks"]["click"]["rows"] == c.sum() and got["tasks"]["rating"]["rows"] == r.sum()
    assert got["tasks"]["click"]["auc"] == pytest.approx(roc_auc_score(labels[c, 0], scores[c, 0]), abs=1e-9)
    assert got["tasks"]["click"]["logloss"] == pytest.approx(log_loss(labels[c, 0], scores[c, 0]), rel=1e-6)
    assert got["tasks"]["rating"]["rmse"] == pytest.approx(
        np.sqrt(mean_squared_error(labels[r, 1], scores[r, 1])), rel=1e-9)
    assert got["tasks"]["rating"]["mae"] == pytest.approx(mean_absolute_error(labels[r, 1], scores[r, 1]), rel=1e-9)


def test_tensorboard_gets_each_tasks_evaluation_under_its_name(tmp_path):
    import tensorflow as tf
    from hybridps.metrics.tensorboard import TensorBoardLog
    log = TensorBoardLog(tf, str(tmp_path))
    log.evaluation(7, {"rows": 10, "tasks": {"click": {"auc": 0.75, "logloss": 0.5, "gauc": None},
                                             "rating": {"rmse": 1.25, "mae": 0.5}}})
    log.close()
    scalars = {}
    for name in os.listdir(tmp_path):
        for record in tf.data.TFRecordDataset(str(tmp_path / name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert scalars == {("eval/rows", 7): 10.0, ("eval/click/auc", 7): 0.75,
                       ("eval/click/logloss", 7): 0.5, ("eval/rating/rmse", 7): 1.25,
                       ("eval/rating/mae", 7): 0.5}


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_an_esmm_run_with_a_post_click_task_evaluates_and_predicts_it_over_clicked_rows(tmp_path):
    """Train esmm on the synthetic funnel's Parquet rows with the task ``cvr`` (the conversion
    given the click, ipw), then evaluate and predict held-out rows (the three commands in one
    process): cvr is reported over the clicked rows only (counted with pyarrow, AUC against
    scikit-learn on predict's column), its label is null on the other rows, and its prediction
    is ESMM's pCVR (pCTCVR / pCTR of the same rows)."""
    import json
    import pyarrow.parquet as pq
    import yaml
    from sklearn.metrics import roc_auc_score
    from hybridps.bench.multitask import FUNNEL_LABELS, SCHEMA_FEATURES, write_funnel
    from tests.test_export import _cli
    train, heldout = str(tmp_path / "train.parquet"), str(tmp_path / "heldout.parquet")
    write_funnel(train, 4096, seed=1, vocab_size=200, ctr=0.2)
    write_funnel(heldout, 3000, seed=1, vocab_size=200, ctr=0.2, first_step=1000)
    labels = FUNNEL_LABELS + [{"name": "cvr", "column": "conversion", "given": "click", "ipw": True}]
    config = tmp_path / "esmm.yaml"
    config.write_text(yaml.safe_dump({"model": "esmm", "hidden": [8],
                                      "features": dict(SCHEMA_FEATURES, labels=labels)}))
    _, evaluated, _ = _cli(["train", "--config", config, "--data", train, "--steps", 16,
                            "--batch-size", 256, "--checkpoint-dir", tmp_path / "ckpt", "--no-progress"],
                           ["evaluate", "--checkpoint", tmp_path / "ckpt", "--data", heldout],
                           ["predict", "--checkpoint", tmp_path / "ckpt", "--data", heldout,
                            "--out", tmp_path / "p.parquet"])
    report = json.loads(evaluated)
    rows = pq.read_table(heldout, columns=["click", "conversion"]).to_pydict()
    click, conversion = np.array(rows["click"]), np.array(rows["conversion"])
    clicked = click == 1
    cvr = report["tasks"]["cvr"]
    assert (report["rows"], report["tasks"]["conversion"]["rows"]) == (3000, 3000)
    assert (cvr["rows"], cvr["positives"]) == (int(clicked.sum()), int((conversion[clicked] == 1).sum()))
    predicted = pq.read_table(tmp_path / "p.parquet").to_pydict()
    np.testing.assert_array_equal([v is None for v in predicted["cvr_label"]], ~clicked)
    p_cvr = np.array(predicted["cvr"])
    np.testing.assert_allclose(p_cvr, np.array(predicted["conversion"]) / np.array(predicted["click"]),
                               rtol=1e-4)
    assert cvr["auc"] == pytest.approx(roc_auc_score(conversion[clicked], p_cvr[clicked]), abs=1e-6)
