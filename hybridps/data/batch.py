"""The unit of data that flows from a dataset into a training step: a jagged batch.

Per sparse feature a batch holds values and lengths (the layout of TorchRec's KeyedJaggedTensor),
stored two ways so that the common case costs nothing:

* single-valued features (every length 1) as the columns of one int64 matrix ``keys`` (B, S),
  in schema order: a reader fills it in one pass, and the exchange uniques a table's columns
  without first gathering them into a list;
* multi-hot and sequence features in ``lists``: per feature name ``(values int64 (N,), lengths
  int32 (B,))``, sample ``i``'s ids being ``values[sum(lengths[:i]):sum(lengths[:i + 1])]``.
  Sequences are already truncated to their ``max_len`` (:func:`truncate_lists`), the number of
  ids dropped counted in ``truncated``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from hybridps.errors import ConfigError, DataError


@dataclass
class Batch:
    """One local mini-batch.

    Attributes:
        dense: float32 (B, num_dense), the continuous features (already transformed).
        keys: int64 (B, S), the hashed keys of the single-valued features (see
            :mod:`hybridps.data.hashing`), one column per feature in schema order.
        labels: float32 (B,), 0.0 or 1.0, for a schema of one ``label``; for a schema of
            ``labels:`` (hybridps.tasks.Task) (B, T), one column per task, NaN where the row's
            label of that task is missing (the row is left out of that task's loss and metrics).
        weights: optional float32 (B,), each row's loss weight (the schema's ``weight``).
        lists: feature name -> (values int64 (N,), lengths int32 (B,)) of the multi-hot and
            sequence features.
        truncated: feature name -> ids dropped from sequences longer than their max_len.
        groups: optional int64 (B,) ids of the schema's ``group_by`` column (evaluation).
        row_ids: optional int64 (B,) position of each sample among all rows of the data
            (readers of files set it: ``hybridps predict`` writes scores in input order).
    """

    dense: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    lists: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    truncated: Dict[str, int] = field(default_factory=dict)
    groups: Optional[np.ndarray] = None
    row_ids: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.dense = np.asarray(self.dense, dtype=np.float32)
        self.keys = np.asarray(self.keys, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
        if self.dense.ndim != 2 or self.keys.ndim != 2 or self.labels.ndim not in (1, 2):
            raise DataError(
                f"Batch needs dense (B, num_dense), keys (B, num_fields) and labels (B,); got "
                f"shapes {self.dense.shape}, {self.keys.shape} and {self.labels.shape}")
        b = self.labels.shape[0]
        if self.dense.shape[0] != b or self.keys.shape[0] != b:
            raise DataError(
                f"Batch arrays disagree on the batch size: dense {self.dense.shape}, keys "
                f"{self.keys.shape}, labels {self.labels.shape}")
        for name, (values, lengths) in self.lists.items():
            if lengths.shape != (b,) or int(lengths.sum()) != values.shape[0]:
                raise DataError(f"Batch list feature {name!r}: {values.shape[0]} values but "
                                f"lengths {lengths.shape} summing to {int(lengths.sum())} for "
                                f"a batch of {b}")

    def list_offsets(self, name):
        """(B + 1,) int64 start of each sample's ids in a list feature's values (cached)."""
        cache = self.__dict__.setdefault("_offsets", {})
        if name not in cache:
            lengths = self.lists[name][1]
            cache[name] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cache[name]

    @property
    def label_matrix(self):
        """The labels as (B, T) (a view: one column for a batch of one label)."""
        return self.labels.reshape(self.labels.shape[0], -1)

    @property
    def positives(self) -> int:
        """Rows whose first task's label is 1 (missing labels count as not positive)."""
        return int(np.count_nonzero(self.label_matrix[:, 0] == 1.0))

    @property
    def size(self) -> int:
        """Number of samples B."""
        return int(self.labels.shape[0])

    @property
    def num_fields(self) -> int:
        return int(self.keys.shape[1])

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    def __len__(self) -> int:
        return self.size

    def take(self, index) -> "Batch":
        """The samples at ``index`` (an int array, or a slice: views where possible), lists
        included."""
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self.size)
            lists = {}
            for name, (values, lengths) in self.lists.items():
                offsets = self.list_offsets(name)
                lists[name] = (values[offsets[start]:offsets[stop]], lengths[start:stop])
            return Batch(dense=self.dense[start:stop], keys=self.keys[start:stop],
                         labels=self.labels[start:stop], lists=lists,
                         groups=None if self.groups is None else self.groups[start:stop],
                         row_ids=None if self.row_ids is None else self.row_ids[start:stop],
                         weights=None if self.weights is None else self.weights[start:stop])
        rows = np.arange(self.size)[index] if isinstance(index, slice) else np.asarray(index)
        lists = {name: take_lists(values, lengths, rows)
                 for name, (values, lengths) in self.lists.items()}
        return Batch(dense=self.dense[rows], keys=self.keys[rows], labels=self.labels[rows],
                     lists=lists, groups=None if self.groups is None else self.groups[rows],
                     row_ids=None if self.row_ids is None else self.row_ids[rows],
                     weights=None if self.weights is None else self.weights[rows])


def take_lists(values, lengths, rows):
    """The jagged (values, lengths) of the samples ``rows`` (vectorized, any order, repeats)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    picked = lengths[rows]
    total = int(picked.sum())
    out_starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(picked, out=out_starts[1:])
    # position j of the output takes input starts[row] + (j - out_starts[sample])
    sample = np.repeat(np.arange(len(rows)), picked)
    source = starts[np.asarray(rows)[sample]] + (np.arange(total) - out_starts[sample])
    return values[source], picked.astype(np.int32)


def truncate_lists(values, lengths, max_len):
    """Keep each sample's first ``max_len`` ids; returns (values, lengths int32, ids dropped)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_len is None or len(lengths) == 0 or lengths.max() <= max_len:
        return values, lengths.astype(np.int32), 0
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    position = np.arange(len(values)) - np.repeat(starts[:-1], lengths)
    keep = position < max_len
    kept = np.minimum(lengths, max_len)
    return values[keep], kept.astype(np.int32), int(len(values) - int(kept.sum()))


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def resolve_batch_size(batch_size, default_batch_size) -> int:
    """The batch size asked for, else the data source's default (shared by every source)."""
    if batch_size is None:
        if default_batch_size is None:
            raise ConfigError("batch_size not given and no default batch_size configured")
        return default_batch_size
    return check_int("batch_size", batch_size, 1)


def empty_batch(schema):
    """A batch of no samples of a schema (ranks with fewer evaluation rows send these)."""
    return Batch(dense=np.zeros((0, schema.num_dense), np.float32),
                 keys=np.zeros((0, len(schema.single_features)), np.int64),
                 labels=np.zeros((0, len(schema.labels)) if schema.labels else 0, np.float32),
                 lists={f.name: (np.zeros(0, np.int64), np.zeros(0, np.int32))
                        for f in schema.list_features},
                 groups=np.zeros(0, np.int64) if schema.group_by else None,
                 row_ids=np.zeros(0, np.int64),
                 weights=np.zeros(0, np.float32) if schema.weight else None)
