"""The objectives of a feature schema: :class:`Task` and the ``features.labels`` list.

What lives here: one task's label column, kind (binary or regression), loss and loss weight,
the task it is ``given`` (a post-click conversion: labelled only where the click is 1), their
validation with errors that name the task, and :func:`mask_given`, which every reader and
generator applies to a batch's labels. What does not: the losses themselves
(hybridps.models.loss), the label columns in batches (hybridps.data), the rest of the schema
(hybridps.schema, which holds the tasks).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hybridps.errors import ConfigError
from hybridps.schema_checks import check_name, is_number, no_unknown

TASK_KINDS = ("binary", "regression")
REGRESSION_LOSSES = ("mse", "huber")
TASK_KEYS = ("name", "column", "kind", "loss_weight", "loss", "delta", "given", "ipw")
IPW_CLIP = 0.05     # ipw: the given task's predicted probability is clipped to [IPW_CLIP, 1]


@dataclass(frozen=True)
class Task:
    """One objective of the ``labels:`` list: its label column, ``kind`` binary (the model
    returns a logit, sigmoid cross-entropy) or regression (the model returns the value, ``loss``
    mse or huber with ``delta``), and ``loss_weight`` in the weighted sum of the task losses.
    ``given`` names another binary task: this task's label counts only on rows where that
    task's label is 1 (elsewhere it is missing). ``ipw`` (with ``given``): each row's loss is
    divided by the model's predicted probability of the given task, clipped to [IPW_CLIP, 1]
    and held constant (no gradient flows through it)."""
    name: str
    column: str
    kind: str = "binary"
    loss_weight: float = 1.0
    loss: str = "logloss"
    delta: float = 1.0
    given: Optional[str] = None
    ipw: bool = False


def parse_tasks(data):
    """The tasks of ``features.labels`` (() when the schema has the one ``label``)."""
    if "labels" not in data:
        return ()
    if "label" in data:
        raise ConfigError("features: give either 'label' (one binary label) or 'labels' (a list "
                          "of tasks), not both")
    items, tasks = data["labels"], []
    if not isinstance(items, list) or not items:
        raise ConfigError(f"features.labels: expected a list of tasks such as [{{name: click}}, "
                          f"{{name: watch_time, kind: regression}}], got {items!r}")
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"features.labels[{index}]: expected {{name: ..., kind: binary|"
                              f"regression}}, got {item!r}")
        name = item["name"]
        check_name(name, f"features.labels[{index}]", "task")
        where = f"features.labels.{name}"
        no_unknown(item, TASK_KEYS, where)
        kind = item.get("kind", "binary")
        if kind not in TASK_KINDS:
            raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(TASK_KINDS)}")
        weight = item.get("loss_weight", 1.0)
        if not is_number(weight) or not weight >= 0:
            raise ConfigError(f"{where}.loss_weight: expected a number >= 0, got {weight!r}")
        loss = item.get("loss", "logloss" if kind == "binary" else "mse")
        allowed = ("logloss",) if kind == "binary" else REGRESSION_LOSSES
        if loss not in allowed:
            raise ConfigError(f"{where}.loss: {loss!r} is not a loss of a {kind} task; allowed: "
                              f"{', '.join(allowed)}")
        delta, column = item.get("delta", 1.0), item.get("column", name)
        if "delta" in item and loss != "huber":
            raise ConfigError(f"{where}.delta: only the huber loss has a delta")
        if not is_number(delta) or not delta > 0:
            raise ConfigError(f"{where}.delta: expected a number > 0, got {delta!r}")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{where}.column: expected a column name, got {column!r}")
        given, ipw = item.get("given"), item.get("ipw", False)
        if given is not None and (not isinstance(given, str) or not given):
            raise ConfigError(f"{where}.given: expected the name of another binary task, got {given!r}")
        if not isinstance(ipw, bool):
            raise ConfigError(f"{where}.ipw: expected true or false, got {ipw!r}")
        if ipw and given is None:
            raise ConfigError(f"{where}.ipw: weighting by the inverse propensity needs 'given' "
                              f"(the task whose predicted probability is the propensity)")
        tasks.append(Task(name=name, column=column, kind=kind, loss_weight=float(weight),
                          loss=loss, delta=float(delta), given=given, ipw=ipw))
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"features.labels: a task name is used twice in {names}; task names "
                          f"must be unique")
    check_given(tasks)
    return tuple(tasks)


def check_given(tasks):
    """Raise ConfigError naming the task whose ``given`` is not another binary task without a
    ``given`` of its own (chains are refused)."""
    by_name = {t.name: t for t in tasks}
    for task in tasks:
        if task.given is None:
            continue
        where = f"features.labels.{task.name}.given"
        other = by_name.get(task.given)
        if task.given == task.name:
            raise ConfigError(f"{where}: a task cannot be given itself; name another binary "
                              f"task (e.g. given: click)")
        if other is None:
            raise ConfigError(f"{where}: {task.given!r} is not a task of features.labels "
                              f"({', '.join(by_name)})")
        if other.kind != "binary":
            raise ConfigError(f"{where}: {task.given!r} is a {other.kind} task; given must name "
                              f"a binary task (its label 1 is where this task is labelled)")
        if other.given is not None:
            raise ConfigError(f"{where}: {task.given!r} is itself given {other.given!r}; chains "
                              f"are not supported: give {task.name!r} the task "
                              f"{other.given!r} or label it yourself")


def given_columns(tasks):
    """[(t, g)]: task column t is labelled only where task column g's label is 1."""
    index = {task.name: j for j, task in enumerate(tasks)}
    return [(j, index[task.given]) for j, task in enumerate(tasks) if task.given is not None]


def mask_given(tasks, labels):
    """``labels`` (B, T) of ``tasks`` with every ``given`` task's label set missing (NaN) on
    the rows where its given task's label is not 1 (0 or missing); in place, returned. Every
    reader, stream and generator of several tasks calls it on the labels it makes."""
    for t, g in given_columns(tasks):
        labels[:, t] = np.where(labels[:, g] == 1.0, labels[:, t], np.nan)
    return labels
