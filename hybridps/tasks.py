"""The objectives of a feature schema: :class:`Task` and the ``features.labels`` list.

What lives here: one task's label column, kind (binary or regression), loss and loss weight,
and their validation with errors that name the task. What does not: the losses themselves
(hybridps.models.loss), the label columns in batches (hybridps.data), the rest of the schema
(hybridps.schema, which holds the tasks).
"""
from dataclasses import dataclass

from hybridps.errors import ConfigError
from hybridps.schema_checks import check_name, is_number, no_unknown

TASK_KINDS = ("binary", "regression")
REGRESSION_LOSSES = ("mse", "huber")
TASK_KEYS = ("name", "column", "kind", "loss_weight", "loss", "delta")


@dataclass(frozen=True)
class Task:
    """One objective of the ``labels:`` list: its label column, ``kind`` binary (the model
    returns a logit, sigmoid cross-entropy) or regression (the model returns the value, ``loss``
    mse or huber with ``delta``), and ``loss_weight`` in the weighted sum of the task losses."""
    name: str
    column: str
    kind: str = "binary"
    loss_weight: float = 1.0
    loss: str = "logloss"
    delta: float = 1.0


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
        tasks.append(Task(name=name, column=column, kind=kind, loss_weight=float(weight),
                          loss=loss, delta=float(delta)))
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"features.labels: a task name is used twice in {names}; task names "
                          f"must be unique")
    return tuple(tasks)
