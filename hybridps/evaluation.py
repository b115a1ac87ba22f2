"""Held-out evaluation: predictions over all ranks, and AUC, gAUC, logloss, calibration.

What lives here: :func:`predict_batches` (scores of batches through a backend's read-only pull
and the model's inference step: evaluation never changes a table, and a key the tables do not
hold reads zeros, as an exported model reads it), :func:`evaluation_metrics` (the metrics of
every rank's predictions together, computed on rank 0 and shared) and the metric formulas
(:func:`grouped_auc`). What does not: reading data (hybridps.data), the training loop.

Definitions (all over every rank's rows, not rank 0's share):

* ``auc``: exact ROC AUC (sort-based, ties count one half; hybridps.data.auc.roc_auc);
* ``logloss``: mean binary cross-entropy of the predicted probabilities (clipped to [1e-7, 1 - 1e-7]);
* ``calibration``: mean predicted probability / observed positive rate (1 is calibrated);
* ``gauc``: the impression-weighted mean of each group's AUC over the groups that have both
  classes (Zhou et al. 2018, "Deep Interest Network"): ``sum_g n_g AUC_g / sum_g n_g``, groups
  by the schema's ``group_by`` column; ``gauc_groups`` is the number of groups used (groups of
  one class, hence of one row, have no AUC and are left out); None without ``group_by``.

A schema of several tasks (``labels:``) reports ``rows`` and, under ``tasks``, each task's
metrics over the rows where its label is present: the ones above for a binary task, and for a
regression task ``rmse`` (root of the mean squared error), ``mae`` (mean absolute error),
``mean_prediction`` and ``mean_label``.
"""
import dataclasses
from typing import Optional

import numpy as np

from hybridps.data.auc import roc_auc

_EPS = 1e-7


@dataclasses.dataclass
class Predictions:
    """One rank's predictions: probability (regression: the value), label, group (or None) and
    row id (or None: the reader did not number its rows) of every row, in the order the
    batches came; scores and labels are (N, T) for several tasks, NaN where a label is missing."""
    scores: np.ndarray
    labels: np.ndarray
    groups: Optional[np.ndarray]
    row_ids: Optional[np.ndarray]


def predict_batches(backend, predict_step, batches, tf, tasks=()):
    """:class:`Predictions` of ``batches`` on this rank (collective: every computing rank calls
    it with the same number of batches; an empty batch is fine). ``predict_step`` is
    hybridps.step.make_predict_step's, which takes the backend's read as it is; ``tasks``: the
    schema's ``labels`` (empty: one binary label)."""
    scores, labels, groups, row_ids = [], [], [], []
    binary = np.array([t.kind == "binary" for t in tasks], dtype=bool)
    for batch in batches:
        outputs = predict_step(backend.read(batch)).numpy().astype(np.float64)
        if len(tasks):
            outputs = outputs.reshape(batch.size, len(tasks))
            scores.append(np.where(binary, 1.0 / (1.0 + np.exp(-outputs)), outputs))
        else:
            scores.append(1.0 / (1.0 + np.exp(-outputs.reshape(-1))))
        labels.append(batch.labels)
        groups.append(batch.groups)
        row_ids.append(batch.row_ids)

    def cat(parts, dtype):
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return Predictions(cat(scores, np.float64), cat(labels, np.float32),
                       cat(groups, np.int64), cat(row_ids, np.int64))


def evaluation_metrics(comm, scores, labels, groups=None, tasks=()):
    """The metrics of every rank's predictions (module docstring), on every rank (``tasks``:
    the schema's ``labels``, empty for one binary label).

    Gathers (score, label, group) of all rows to rank 0, which computes the exact metrics and
    broadcasts them: 20 bytes per row, so about 20 MB for a million held-out rows.
    """
    parts = comm.gather_object((np.asarray(scores, np.float64), np.asarray(labels, np.float32),
                                None if groups is None else np.asarray(groups, np.int64)))
    result = None
    if comm.rank == 0:
        all_scores = np.concatenate([p[0] for p in parts])
        all_labels = np.concatenate([p[1] for p in parts])
        have_groups = all(p[2] is not None for p in parts)
        all_groups = np.concatenate([p[2] for p in parts]) if have_groups else None
        result = (task_metrics(all_scores, all_labels, all_groups, tasks) if len(tasks)
                  else metrics_of(all_scores, all_labels, all_groups))
    return comm.bcast_object(result)


def task_metrics(scores, labels, groups, tasks):
    """``rows`` and per task (``tasks``) its metrics over the rows where its label is present:
    :func:`metrics_of` for a binary task, :func:`regression_metrics` for a regression one."""
    scores = np.asarray(scores, np.float64).reshape(len(scores), len(tasks))
    labels = np.asarray(labels, np.float64).reshape(len(labels), len(tasks))
    out = {"rows": int(len(labels)), "tasks": {}}
    for t, task in enumerate(tasks):
        present = ~np.isnan(labels[:, t])
        score, label = scores[present, t], labels[present, t]
        if task.kind == "binary":
            out["tasks"][task.name] = metrics_of(score, label, None if groups is None else groups[present])
        else:
            out["tasks"][task.name] = regression_metrics(score, label)
    return out


def regression_metrics(predictions, labels):
    """rows, rmse, mae, mean_prediction, mean_label of one regression task."""
    predictions = np.asarray(predictions, np.float64)
    labels = np.asarray(labels, np.float64)
    if len(labels) == 0:
        return {"rows": 0, "rmse": None, "mae": None, "mean_prediction": None, "mean_label": None}
    error = predictions - labels
    return {"rows": int(len(labels)), "rmse": float(np.sqrt(np.mean(error * error))),
            "mae": float(np.mean(np.abs(error))), "mean_prediction": float(predictions.mean()),
            "mean_label": float(labels.mean())}


def metrics_line(metrics):
    """The metrics as one line of text (the training log's eval lines)."""
    def one(values):
        return ", ".join(f"{k} {values[k]:.4f}" for k in ("auc", "gauc", "logloss", "calibration",
                                                           "rmse", "mae")
                         if values.get(k) is not None)
    if "tasks" not in metrics:
        return one(metrics)
    return "; ".join(f"{name}: {one(values)} ({values['rows']} rows)"
                     for name, values in metrics["tasks"].items())


def metrics_of(scores, labels, groups=None):
    """rows, auc, logloss, calibration, gauc, gauc_groups of one set of predictions."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.float64)
    rows = int(len(labels))
    if rows == 0:
        return {"rows": 0, "auc": None, "logloss": None, "calibration": None, "gauc": None,
                "gauc_groups": 0, "positives": 0, "mean_prediction": None}
    p = np.clip(scores, _EPS, 1 - _EPS)
    positives = float(labels.sum())
    auc = roc_auc(labels, scores)
    out = {"rows": rows, "positives": int(positives),
           "auc": None if np.isnan(auc) else float(auc),
           "logloss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),
           "mean_prediction": float(scores.mean()),
           "calibration": float(scores.mean() / (positives / rows)) if positives else None}
    if groups is None:
        out.update(gauc=None, gauc_groups=0)
    else:
        gauc, used = grouped_auc(labels, scores, groups)
        out.update(gauc=gauc, gauc_groups=used)
    return out


def grouped_auc(labels, scores, groups):
    """(gAUC, groups used): the impression-weighted mean AUC over groups with both classes,
    vectorized (one sort): ranks with ties averaged within each group."""
    labels = np.asarray(labels, np.float64) > 0.5
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    n = len(labels)
    if n == 0:
        return None, 0
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    group_start = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    group_id = np.cumsum(np.concatenate([[True], g[1:] != g[:-1]])) - 1
    # tie runs: a new run where the group or the score changes
    run_start = np.concatenate([[True], (g[1:] != g[:-1]) | (s[1:] != s[:-1])])
    run_id = np.cumsum(run_start) - 1
    run_first = np.flatnonzero(run_start)
    run_last = np.append(run_first[1:], n) - 1
    # 1-based rank within the group of each position, ties averaged
    first_in_group = group_start[group_id]
    avg_rank = (run_first + run_last) / 2.0 - first_in_group[run_first] + 1.0
    ranks = avg_rank[run_id]
    num_groups = len(group_start)
    n_pos = np.bincount(group_id, weights=y, minlength=num_groups)
    n_all = np.bincount(group_id, minlength=num_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(group_id, weights=ranks * y, minlength=num_groups)
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return None, 0
    auc = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
    weights = n_all[both]
    return float((auc * weights).sum() / weights.sum()), int(both.sum())
