"""Parquet and TFRecord training, held-out evaluation and prediction under real MPI.

One MPI job of 2 ranks runs tests/parallel/evaluation_scenarios.py: on 2 ranks (training on
both formats with evaluation every 2 steps and TensorBoard, a shuffled mid-epoch resume,
evaluate twice, predict), then on its first rank alone (the same checkpoint evaluated on one
rank). The expected figures come from
outside the code under test: scikit-learn's metrics on the scores of the exported SavedModel
(an independent TensorFlow program over the raw rows), sha256 of files and table exports,
and the rows the readers were given.
"""
import json
import os

import numpy as np
import pytest

from tests.mpi_util import REPO, run_mpi
from tests.schema_data import FEATURES, rows, saved_model_inputs, write_parquet, write_tfrecord

pytestmark = pytest.mark.mpi

ROWS_PER_FILE, FILES, BATCH = 50, 4, 16
EVAL_FEATURES = dict(FEATURES, group_by="user")


def heldout_columns():
    """120 rows of the training pools, then a user seen once ("solo", one row) and a user with
    five negatives ("allneg", one class): neither is a key the tables hold."""
    columns = rows(120, seed=9)
    extra = rows(6, seed=10)
    extra["user"] = ["solo"] + ["allneg"] * 5
    extra["label"] = np.array([1, 0, 0, 0, 0, 0])
    return {k: (np.concatenate([columns[k], extra[k]]) if isinstance(columns[k], np.ndarray)
                else list(columns[k]) + list(extra[k])) for k in columns}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import yaml
    out = tmp_path_factory.mktemp("evaluation")
    for i in range(FILES):
        columns = rows(ROWS_PER_FILE, seed=i)
        write_parquet(out / f"train-{i}.parquet", columns, row_group_size=ROWS_PER_FILE)
        write_tfrecord(out / f"train-{i}.tfrecord", columns)
    write_parquet(out / "heldout.parquet", heldout_columns(), row_group_size=30)
    with open(out / "config.yaml", "w") as fh:
        yaml.safe_dump({"model": "wide_deep", "hidden": [16, 8], "seed": 3, "learning_rate": 0.1,
                        "warmup_steps": 1, "features": EVAL_FEATURES}, fh, sort_keys=False)
    script = os.path.join(REPO, "tests", "parallel", "evaluation_scenarios.py")
    run_mpi(2, [script, out], timeout=900)        # on both ranks, then on the first alone
    return out


def _json(path):
    with open(path) as fh:
        return json.load(fh)


def _rows_read(out, name, rank):
    return np.load(out / f"rows-{name}-{rank}.npy")


def independent_metrics(scores, labels, users):
    """AUC, logloss, calibration and gAUC with scikit-learn (gAUC group by group, in Python)."""
    from sklearn.metrics import log_loss, roc_auc_score
    weighted, weight, groups = 0.0, 0, 0
    for user in sorted(set(users)):
        mine = np.array([u == user for u in users])
        if len(set(labels[mine])) == 2:
            weighted += mine.sum() * roc_auc_score(labels[mine], scores[mine])
            weight += mine.sum()
            groups += 1
    return {"rows": len(labels), "auc": roc_auc_score(labels, scores),
            "logloss": log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)),
            "calibration": scores.mean() / labels.mean(), "gauc": weighted / weight,
            "gauc_groups": groups}


def served_scores(out, tmp_path):
    import tensorflow as tf
    from hybridps.export import export_saved_model
    export_saved_model(out / "parquet" / "ckpt", tmp_path / "serving")
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    inputs = {k: tf.constant(v) for k, v in saved_model_inputs(heldout_columns(), EVAL_FEATURES).items()}
    return loaded.signatures["ids"](**inputs)["probability"].numpy().reshape(-1)


def test_parquet_and_tfrecord_files_of_the_same_rows_train_to_the_same_losses(runs):
    parquet, tfrecord = _json(runs / "parquet" / "metrics.json"), _json(runs / "tfrecord" / "metrics.json")
    assert parquet["ranks"] == 2 and len(parquet["loss_trajectory"]) == 6
    np.testing.assert_allclose(parquet["loss_trajectory"], tfrecord["loss_trajectory"], rtol=1e-6)
    for kind in ("parquet", "tfrecord"):     # each rank read rows of its own two files only
        ranks = [set(_rows_read(runs, kind, r).tolist()) for r in (0, 1)]
        assert not ranks[0] & ranks[1]
        for r in (0, 1):
            files = {int(i) // ROWS_PER_FILE for i in ranks[r]}
            assert files == {r, r + 2}, (kind, r, files)


def test_a_shuffled_resume_mid_epoch_over_several_parquet_files_reads_each_row_once(runs):
    whole, part2 = _json(runs / "whole" / "metrics.json"), _json(runs / "part2" / "metrics.json")
    assert part2["first_step"] == 2
    all_rows = []
    for rank in (0, 1):
        resumed = np.concatenate([_rows_read(runs, "part1", rank), _rows_read(runs, "part2", rank)])
        assert len(resumed) == 6 * BATCH and len(set(resumed.tolist())) == len(resumed)
        np.testing.assert_array_equal(resumed, _rows_read(runs, "whole", rank))
        all_rows += resumed.tolist()
    assert len(set(all_rows)) == 2 * 6 * BATCH            # no row on both ranks
    # 100 rows per rank, 6 batches of 16: 4 per rank dropped and counted
    assert whole["data_stats"]["dropped_rows"] == 2 * (2 * ROWS_PER_FILE - 6 * BATCH)
    np.testing.assert_allclose(part2["loss_trajectory"], whole["loss_trajectory"][2:], rtol=1e-5)


def test_evaluation_matches_scikit_learn_on_the_savedmodels_scores(runs, tmp_path):
    result = _json(runs / "evaluate.json")
    served = served_scores(runs, tmp_path)
    columns = heldout_columns()
    want = independent_metrics(served, np.asarray(columns["label"], np.float64), columns["user"])
    assert want["gauc_groups"] < len(set(columns["user"]))       # one-class groups were left out
    one_rank = _json(runs / "evaluate-1.json")
    in_training = _json(runs / "parquet" / "metrics.json")["eval"][-1]
    for got in (result["first"], result["direct"], one_rank, in_training):
        assert got["rows"] == want["rows"] and got["gauc_groups"] == want["gauc_groups"]
        for key in ("auc", "logloss", "calibration", "gauc"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert in_training["step"] == 6


def test_evaluate_twice_gives_the_same_figures_and_changes_no_file_and_no_table(runs):
    result = _json(runs / "evaluate.json")
    assert result["first"] == result["second"]
    assert result["files_before"] == result["files_after"] and len(result["files_before"]) >= 4
    for rank in result["tables"]:
        assert rank["tables_before"] == rank["tables_after"]


@pytest.mark.parametrize("name", ["predict.parquet", "predict-1.parquet"])   # 2 ranks, 1 rank
def test_predict_writes_the_savedmodels_score_of_every_row_in_input_order(runs, tmp_path, name):
    import pyarrow.parquet as pq
    from hybridps.data.hashing import text_ids
    table = pq.read_table(runs / name).to_pydict()
    columns = heldout_columns()
    assert _json(runs / "evaluate.json")["predicted_rows"] == len(columns["label"])
    np.testing.assert_allclose(table["score"], served_scores(runs, tmp_path), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table["label"], columns["label"])
    np.testing.assert_array_equal(table["user"], text_ids(columns["user"]))


def test_asp_evaluates_at_its_fences_and_at_the_end_as_its_checkpoint_does(runs):
    result = _json(runs / "asp" / "evaluate.json")
    assert [e["step"] for e in result["in_training"]] == [2, 4, 6]
    assert all(0.0 < e["logloss"] < 5.0 and e["rows"] == 126 for e in result["in_training"])
    final, after = result["in_training"][-1], result["checkpoint"]
    for key in ("rows", "auc", "gauc", "gauc_groups", "logloss", "calibration"):
        assert final[key] == pytest.approx(after[key], rel=1e-6), key


def test_tensorboard_holds_the_losses_and_each_evaluation(runs):
    import tensorflow as tf
    directory = runs / "parquet" / "tb"
    scalars = {}
    for name in os.listdir(directory):
        for record in tf.data.TFRecordDataset(str(directory / name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    metrics = _json(runs / "parquet" / "metrics.json")
    assert sorted(scalars["eval/auc"]) == [2, 4, 6]
    for entry in metrics["eval"]:
        assert scalars["eval/auc"][entry["step"]] == pytest.approx(entry["auc"], rel=1e-6)
        assert scalars["eval/logloss"][entry["step"]] == pytest.approx(entry["logloss"], rel=1e-6)
    np.testing.assert_allclose([scalars["train/loss"][s] for s in range(1, 7)],
                               metrics["loss_trajectory"], rtol=1e-6)
    assert scalars["exchange/bytes_sent_per_step"][6] == pytest.approx(
        metrics["exchange"]["bytes_sent_per_step"], rel=1e-6)
    assert "train/samples_per_s" in scalars and "train/staleness_max" in scalars
