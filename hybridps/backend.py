"""The interface between the Trainer and where parameters live.

The Trainer only ever calls these methods, so it does not know whether it runs the
collective path (hybridps.sync) or, later, the parameter-server mode (hybridps.ps).
"""
from typing import Iterator, Protocol, Tuple

import numpy as np


class Backend(Protocol):
    """Parameter access for one training process."""

    def start(self, batches: Iterator, start_step: int = 0, fence_steps=()) -> None:
        """Make the initial state identical everywhere (e.g. broadcast dense weights) and take
        the iterator of this rank's batches (a pipelined backend prefetches from it), starting
        at ``start_step``; ``fence_steps`` are the steps at which at_consistent_point is used."""

    def at_consistent_point(self, step: int, action) -> None:
        """Run ``action()`` (checkpoint, delta export) when the tables hold exactly the updates
        of steps < ``step``."""

    def pull(self, step: int) -> Tuple[object, object, np.ndarray]:
        """Step ``step``'s batch and the rows of its unique keys: (batch, plan, unique_rows).

        ``plan.inverse`` (B, F) indexes ``unique_rows`` (U, dim) for each (sample, field).
        """

    def push(self, plan: object, unique_row_grads: np.ndarray, step: int) -> None:
        """Row gradients (U, dim) for the plan's unique keys."""

    def dense_step(self, grads: list, step: int) -> None:
        """This rank's dense gradients (its share of the global mean loss)."""

    def stats(self) -> dict:
        """Counters for the metrics file (exchange volume, table sizes, ...)."""

    def finish(self) -> None:
        """Drain anything in flight; after it, every pushed gradient has been applied."""
