"""The interface between the Trainer and where parameters live.

The Trainer only ever calls these methods, so it does not know whether it runs the
collective path (hybridps.sync) or, later, the parameter-server mode (hybridps.ps).
"""
from typing import Protocol, Tuple

import numpy as np


class Backend(Protocol):
    """Parameter access for one training process."""

    def start(self) -> None:
        """Make the initial state identical everywhere (e.g. broadcast dense weights)."""

    def pull(self, keys: np.ndarray, step: int) -> Tuple[object, np.ndarray]:
        """Rows of a (B, F) batch's unique keys: (plan, unique_rows (U, dim) float32).

        ``plan.inverse`` (B, F) indexes ``unique_rows`` for each (sample, field).
        """

    def push(self, plan: object, unique_row_grads: np.ndarray, step: int) -> None:
        """Row gradients (U, dim) for the plan's unique keys."""

    def dense_step(self, grads: list, step: int) -> None:
        """This rank's dense gradients (its share of the global mean loss)."""

    def stats(self) -> dict:
        """Counters for the metrics file (exchange volume, table sizes, ...)."""

    def finish(self) -> None:
        """Drain anything in flight; after it, every pushed gradient has been applied."""
