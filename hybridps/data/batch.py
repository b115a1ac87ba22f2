"""The unit of data that flows from a dataset into a training step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridps.errors import ConfigError, DataError


@dataclass
class Batch:
    """One local mini-batch.

    Attributes:
        dense: float32 array of shape (B, num_dense), the continuous features (already
            transformed, e.g. log1p for Criteo).
        keys: int64 array of shape (B, num_fields), one already-hashed feature key per
            categorical field (see :mod:`hybridps.data.hashing`). Keys of different fields
            never collide by construction, so all fields may share one embedding table.
        labels: float32 array of shape (B,), 0.0 or 1.0.
    """

    dense: np.ndarray
    keys: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.dense = np.asarray(self.dense, dtype=np.float32)
        self.keys = np.asarray(self.keys, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.dense.ndim != 2 or self.keys.ndim != 2 or self.labels.ndim != 1:
            raise DataError(
                f"Batch needs dense (B, num_dense), keys (B, num_fields) and labels (B,); got "
                f"shapes {self.dense.shape}, {self.keys.shape} and {self.labels.shape}")
        b = self.labels.shape[0]
        if self.dense.shape[0] != b or self.keys.shape[0] != b:
            raise DataError(
                f"Batch arrays disagree on the batch size: dense {self.dense.shape}, keys "
                f"{self.keys.shape}, labels {self.labels.shape}")

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
