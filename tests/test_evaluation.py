"""Held-out metrics against scikit-learn, and the refusals of evaluation settings and commands.

The MPI side (evaluation during training, ``evaluate`` and ``predict`` on 2 ranks against the
exported SavedModel) is tests/test_parallel_evaluation.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from hybridps.config import make_config
from hybridps.errors import ConfigError
from hybridps.evaluation import grouped_auc, metrics_of
from tests.mpi_util import REPO


def sklearn_gauc(labels, scores, groups):
    weighted, weight, used = 0.0, 0, 0
    for g in np.unique(groups):
        mine = groups == g
        if len(np.unique(labels[mine])) == 2:
            weighted += mine.sum() * roc_auc_score(labels[mine], scores[mine])
            weight += mine.sum()
            used += 1
    return weighted / weight, used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn_with_one_class_and_one_row_groups(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    groups = rng.integers(0, 400, size=n)
    groups[:5] = [10_000, 10_001, 10_002, 10_003, 10_004]            # groups of one row
    labels = (rng.random(n) < 0.3).astype(np.float64)
    labels[groups % 7 == 0] = 0.0                                    # groups of one class
    scores = np.round(rng.random(n) * 0.6 + 0.3 * labels, 2)         # ties within groups
    got = metrics_of(scores, labels, groups)
    want_gauc, want_used = sklearn_gauc(labels, scores, groups)
    assert got["rows"] == n and got["gauc_groups"] == want_used
    assert got["gauc_groups"] < len(np.unique(groups)) - 5
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["logloss"] == pytest.approx(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)), rel=1e-9)
    assert got["gauc"] == pytest.approx(want_gauc, abs=1e-12)
    assert got["calibration"] == pytest.approx(scores.mean() / labels.mean(), rel=1e-12)


def test_metrics_of_degenerate_inputs():
    assert metrics_of([], []) == {"rows": 0, "auc": None, "logloss": None, "calibration": None,
                                  "gauc": None, "gauc_groups": 0, "positives": 0,
                                  "mean_prediction": None}
    one_class = metrics_of([0.2, 0.4], [0, 0], [1, 1])
    assert one_class["auc"] is None and one_class["calibration"] is None
    assert one_class["gauc"] is None and one_class["gauc_groups"] == 0
    # two groups by hand: {a: 1 pos scored 0.9 over 1 neg at 0.1 -> 1.0}, {b: the pos below
    # both negatives -> 0.0}; weighted by 2 and 3 impressions: (2 * 1 + 3 * 0) / 5
    gauc, used = grouped_auc([1, 0, 1, 0, 0], [0.9, 0.1, 0.2, 0.5, 0.6], [7, 7, 8, 8, 8])
    assert used == 2 and gauc == pytest.approx(0.4)


def test_evaluation_settings_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="eval_every.*needs eval_data"):
        make_config(overrides={"eval_every": 10})
    with pytest.raises(ConfigError, match="collective mode only.*hybridps evaluate"):
        make_config(overrides={"eval_data": "synthetic", "mode": "ps"})
    with pytest.raises(ConfigError, match="eval_batches"):
        make_config(overrides={"eval_data": "synthetic", "eval_batches": 0})


def _hybridps(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1", HYBRIDPS_TF_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hybridps.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_evaluate_and_predict_name_a_missing_checkpoint_and_a_directory_as_output(tmp_path):
    missing = _hybridps("evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", "synthetic")
    assert missing.returncode == 2 and "error:" in missing.stderr
    assert str(tmp_path / "nothing") in missing.stderr and "Traceback" not in missing.stderr
    directory = _hybridps("evaluate", "--checkpoint", str(tmp_path), "--data", "synthetic",
                          "--metrics-out", str(tmp_path))
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    usage = _hybridps("predict", "--checkpoint", str(tmp_path))
    assert usage.returncode == 2 and "--data" in usage.stderr and "--out" in usage.stderr
