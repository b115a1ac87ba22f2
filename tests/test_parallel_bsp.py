"""BSP under real MPI: exchange edge cases, N-rank == 1-rank equivalence, a pure-TF reference,
and a failing rank ending the job.

One MPI job of 4 ranks runs tests/parallel/bsp_scenarios.py, whose scenarios run on 1, 2 and
4 of its ranks; the checks below read their outputs. The reference is an independent single-process TensorFlow program:
an ordinary tf.Variable embedding table holding the same initial rows, tf.gather, Keras SGD /
Adagrad on every variable, the whole global batch at once.
"""
import json
import os

import numpy as np
import pytest

from hybridps import testing_hooks
from hybridps.config import make_config
from tests.mpi_util import REPO, load_dumped_state, run_mpi

pytestmark = pytest.mark.mpi

WORLD_SIZES = (1, 2, 4)
OPTIMIZERS = ("sgd", "adagrad")
RTOL = 1e-5


@pytest.fixture(scope="module")
def bsp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bsp")
    run_mpi(max(WORLD_SIZES), [os.path.join(REPO, "tests", "parallel", "bsp_scenarios.py"), out], timeout=800)
    return {world: str(out / f"np{world}") for world in WORLD_SIZES}


def _load_state(run_dir):
    """(dense weights, {key: row}); keys are field-disjoint, so they are unique across tables."""
    weights, rows = load_dumped_state(run_dir)
    by_key = {key: value for (_, key), (value, _) in rows.items()}
    assert len(by_key) == len(rows)
    return weights, by_key


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return json.load(fh)


def test_exchange_edge_cases_ran_on_every_world_size(bsp_runs):
    # The assertions run inside the MPI job (a failure there fails the launch); check that every
    # case ran and that the "no keys for some owner" and "empty batch" cases really were empty.
    for world, run_dir in bsp_runs.items():
        with open(os.path.join(run_dir, "scenarios.json")) as fh:
            cases = {c["name"]: c for c in json.load(fh)["exchange"]}
        assert set(cases) == {"only_own_keys", "all_on_one_owner", "duplicates_across_ranks",
                              "all_new", "empty_batch_on_last_rank"}
        if world > 1:
            own = cases["only_own_keys"]["send_counts"]
            assert own.count(0) == world - 1, "rank 0 must send to itself only"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bsp_equivalence_across_world_sizes(bsp_runs, optimizer):
    base_metrics = _metrics(os.path.join(bsp_runs[1], optimizer))
    base_weights, base_rows = _load_state(os.path.join(bsp_runs[1], optimizer))
    assert len(base_rows) > 500
    for world in WORLD_SIZES[1:]:
        run_dir = os.path.join(bsp_runs[world], optimizer)
        metrics = _metrics(run_dir)
        assert metrics["ranks"] == world and metrics["global_batch_size"] == 32
        np.testing.assert_allclose(metrics["loss_trajectory"], base_metrics["loss_trajectory"], rtol=RTOL)
        weights, rows = _load_state(run_dir)
        for w, b in zip(weights, base_weights):
            np.testing.assert_allclose(w, b, rtol=RTOL, atol=1e-7)
        assert rows.keys() == base_rows.keys()
        keys = sorted(rows)
        np.testing.assert_allclose(np.stack([rows[k] for k in keys]),
                                   np.stack([base_rows[k] for k in keys]), rtol=RTOL, atol=1e-7)


def _reference_run(optimizer, steps, global_batch, dim, hidden, seed, lr, field_groups):
    """Independent single-process TF: tf.Variable table, tf.gather, Keras optimizer everywhere."""
    import tensorflow as tf
    from hybridps.data import SAMPLE_CRITEO_CSV, CriteoReader
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    from hybridps.sparse.table import initial_rows
    from hybridps.step import build_on_sample
    batches = list(CriteoReader(SAMPLE_CRITEO_CSV).iter_batches(global_batch, steps))
    key_table = {}
    for batch in batches:
        for table_id, fields in enumerate(field_groups):
            for key in batch.keys[:, fields].ravel():
                key_table[int(key)] = table_id
    vocab = sorted(key_table)
    index = {k: i for i, k in enumerate(vocab)}
    init = np.concatenate([initial_rows(np.array([k], dtype=np.int64), dim, "normal", seed,
                                        key_table[k], 0.0, 0.01) for k in vocab])
    table = tf.Variable(init)
    config = make_config(overrides={"dim": dim, "hidden": list(hidden), "seed": seed,
                                    "table_groups": field_groups})
    schema = build_schema(config)
    model = build_on_sample(tf, build_model("deepfm", schema, config), schema)
    variables = model.trainable_variables + [table]
    if optimizer == "sgd":
        opt = tf.keras.optimizers.SGD(lr)
    else:
        opt = tf.keras.optimizers.Adagrad(lr, initial_accumulator_value=0.1, epsilon=1e-7)
    losses = []
    for batch in batches:
        ids = np.vectorize(index.get)(batch.keys)
        with tf.GradientTape() as tape:
            emb = tf.gather(table, ids)
            inputs = {"dense": batch.dense, **{f"C{f + 1}": emb[:, f] for f in range(26)}}
            logits = model(inputs, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=batch.labels, logits=logits))
        grads = tape.gradient(loss, variables)
        grads = [tf.convert_to_tensor(g) for g in grads]   # dense table gradient: zero rows stay put
        opt.apply_gradients(zip(grads, variables))
        losses.append(float(loss))
    rows = {k: table.numpy()[index[k]] for k in vocab}
    return losses, [v.numpy() for v in model.trainable_variables], rows


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_rank_bsp_matches_pure_tensorflow_reference(bsp_runs, optimizer):
    run_dir = os.path.join(bsp_runs[2], optimizer)
    metrics = _metrics(run_dir)
    losses, weights, ref_rows = _reference_run(
        optimizer, steps=metrics["steps"], global_batch=32, dim=8, hidden=(16, 8), seed=3, lr=0.1,
        field_groups=[list(range(0, 10)), list(range(10, 26))])
    np.testing.assert_allclose(metrics["loss_trajectory"], losses, rtol=RTOL)
    got_weights, got_rows = _load_state(run_dir)
    for got, ref in zip(got_weights, weights):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-7)
    assert got_rows.keys() == ref_rows.keys()
    keys = sorted(ref_rows)
    np.testing.assert_allclose(np.stack([got_rows[k] for k in keys]),
                               np.stack([ref_rows[k] for k in keys]), rtol=RTOL, atol=1e-7)
    assert losses[-1] < losses[0], "the reference itself should learn on the sample"


def test_a_rank_raising_mid_training_ends_the_job_promptly(tmp_path):
    # a job left waiting for its failed rank would hang until the watchdog (300 s): the
    # launch's timeout fails the test first (how long the job took is not asserted)
    proc = run_mpi(2, ["-m", "hybridps.cli", "train", "--steps", "200", "--batch-size", "64",
                       "--no-progress", "--hidden", "16", "--metrics-out", tmp_path / "m.json"],
                   timeout=180, check=False, env=testing_hooks.environment(fail_at_step=3, fail_rank=1))
    assert proc.returncode != 0
    assert "injected failure at step 3 on rank 1" in proc.stderr
    assert "[hybridps rank 1/2]" in proc.stderr
    assert proc.stderr.count("injected failure at step 3 on rank 1 (fail_at_step") == 1
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------- several tasks
def test_two_tasks_with_missing_labels_train_alike_on_every_world_size(bsp_runs):
    """MMoE on a click and a Huber-loss rating, both with missing labels, and row weights: each
    task's loss is a mean over the rows where its label is present over every rank, so 2 and 4
    ranks train as 1 rank does (loss curve, dense weights and every table row)."""
    base_dir = os.path.join(bsp_runs[1], "multitask")
    base_metrics = _metrics(base_dir)
    base_weights, base_rows = load_dumped_state(base_dir)
    assert len(base_rows) > 50 and len(base_metrics["loss_trajectory"]) == 6
    for world in WORLD_SIZES[1:]:
        run_dir = os.path.join(bsp_runs[world], "multitask")
        metrics = _metrics(run_dir)
        assert metrics["ranks"] == world
        np.testing.assert_allclose(metrics["loss_trajectory"], base_metrics["loss_trajectory"], rtol=RTOL)
        weights, rows = load_dumped_state(run_dir)
        for w, b in zip(weights, base_weights):
            np.testing.assert_allclose(w, b, rtol=RTOL, atol=1e-7)
        assert rows.keys() == base_rows.keys()
        for key in rows:                     # (table, key): tables of several dims
            np.testing.assert_allclose(rows[key][0], base_rows[key][0], rtol=RTOL, atol=1e-7,
                                       err_msg=str(key))


def _independent_task_metrics(predicted, columns):
    """Each task's metrics with scikit-learn on the predict output's scores, over the rows
    where the generator gave the label (gAUC group by group over the users, in Python)."""
    from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score
    click_present = np.array([c is not None for c in columns["click"]])
    labels = np.array([c for c in columns["click"] if c is not None], np.float64)
    scores = np.asarray(predicted["click"], np.float64)[click_present]
    users = np.array(columns["user"])[click_present]
    weighted, weight = 0.0, 0
    for user in sorted(set(users)):
        mine = users == user
        if len(set(labels[mine])) == 2:
            weighted += mine.sum() * roc_auc_score(labels[mine], scores[mine])
            weight += mine.sum()
    stars_present = np.array([s is not None for s in columns["stars"]])
    stars = np.array([s for s in columns["stars"] if s is not None], np.float64)
    values = np.asarray(predicted["rating"], np.float64)[stars_present]
    return {"click": {"rows": int(click_present.sum()), "auc": roc_auc_score(labels, scores),
                      "logloss": log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)),
                      "gauc": weighted / weight},
            "rating": {"rows": int(stars_present.sum()),
                       "rmse": float(np.sqrt(mean_squared_error(stars, values))),
                       "mae": mean_absolute_error(stars, values)}}


def test_per_task_metrics_of_evaluate_and_training_equal_scikit_learn_on_predict(bsp_runs):
    """hybridps predict writes one column per task (and its label, null where missing);
    evaluate and the evaluation during training report per task what scikit-learn computes on
    those predictions over the rows where that task's label is present."""
    import pyarrow.parquet as pq
    from tests.schema_data import multitask_rows
    columns = multitask_rows(60, seed=22)
    for world, run_dir in bsp_runs.items():
        predicted = pq.read_table(os.path.join(run_dir, "multitask", "predict.parquet")).to_pydict()
        assert {"click", "click_label", "rating", "rating_label"} <= set(predicted)
        assert predicted["click_label"] == [c if c is None else float(c) for c in columns["click"]]
        assert predicted["rating_label"] == [s if s is None else pytest.approx(s) for s in columns["stars"]]
        want = _independent_task_metrics(predicted, columns)
        with open(os.path.join(run_dir, "multitask", "evaluate.json")) as fh:
            evaluated = json.load(fh)
        in_training = _metrics(os.path.join(run_dir, "multitask"))["eval"][-1]
        assert in_training["step"] == 6
        for got in (evaluated, in_training):
            assert got["rows"] == 60
            for task, figures in want.items():
                for key, value in figures.items():
                    assert got["tasks"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (world, task, key)
