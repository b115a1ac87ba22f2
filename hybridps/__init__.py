"""hybridps: sparse CTR training on MPI clusters without a parameter server.

Public API (re-exports only; heavy modules such as TensorFlow load on first use):
``TrainConfig``, ``make_config``, ``Trainer``, ``EmbeddingHashTable`` and the error classes.
"""
from hybridps.config import Mode, Sync, TrainConfig, make_config
from hybridps.errors import (CommError, ConfigError, DataError, HybridPSError, NonFiniteGradientError,
                             TableFullError, TableInputError)

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Trainer":
        from hybridps.trainer import Trainer
        return Trainer
    if name == "EmbeddingHashTable":
        from hybridps._hashtable import EmbeddingHashTable
        return EmbeddingHashTable
    raise AttributeError(f"module 'hybridps' has no attribute {name!r}")


__all__ = ["CommError", "ConfigError", "DataError", "EmbeddingHashTable", "HybridPSError", "Mode",
           "NonFiniteGradientError", "Sync", "TableFullError", "TableInputError", "TrainConfig",
           "Trainer", "make_config"]
