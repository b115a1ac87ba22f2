"""InMemoryShare: one rank's share of a data file held in memory, served as batches.

What lives here: the serving side every in-memory reader shares (the schema CSV reader; the
Criteo reader keeps its own arrays but the same position rules): exactly ``num_steps`` batches
of exactly ``batch_size`` rows, epoch after epoch (a batch that crosses the end of an epoch
continues at the start of the next), the position (epoch, offset) saved in checkpoints and
restored, also onto another world size (``global_offset``: rows consumed in this epoch by all
ranks together, the ranks moving in lockstep). What does not: parsing (the readers).
"""
from typing import Iterator, Optional

import numpy as np

from hybridps.data.batch import Batch, check_int, resolve_batch_size
from hybridps.data.source import DataSource
from hybridps.errors import DataError


class InMemoryShare(DataSource):
    """Batches from ``self.share`` (a Batch of every row of this rank's share): a finite
    :class:`~hybridps.data.source.DataSource`.

    Subclasses set ``share``, ``schema``, ``path``, ``rank``, ``world_size``, ``data_lines``
    (data lines of the whole file: a resume checks it) and ``default_batch_size`` before serving.
    """

    kind = "share"

    def _init_position(self):
        self.epoch = 0
        self.offset = 0

    @property
    def num_rows(self) -> int:
        return self.share.size

    def __len__(self) -> int:
        return self.num_rows

    def _require_rows(self):
        if self.num_rows == 0:
            raise DataError(f"rank {self.rank} of {self.world_size} has no valid rows of "
                            f"{self.path!r} ({self.data_lines} data lines in the file, "
                            f"{getattr(self, 'bad_lines', 0)} of this rank's lines skipped as "
                            f"malformed)")

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` of this rank's share (no position change)."""
        return self.share.take(slice(start, stop))

    def epoch_batches(self, batch_size: int, count: Optional[int] = None) -> Iterator[Batch]:
        """One pass over the share in order, ``count`` batches of at most ``batch_size`` rows
        (default: as many as the share needs; the last ones smaller or empty): what evaluation
        and prediction read. The position does not move."""
        n = self.num_rows
        count = count if count is not None else -(-n // batch_size)
        for k in range(count):
            yield self.share.take(slice(min(k * batch_size, n), min((k + 1) * batch_size, n)))

    def _next_batches(self, batch_size: Optional[int] = None,
                      num_steps: Optional[int] = None) -> Iterator[Batch]:
        """Exactly ``num_steps`` batches of exactly ``batch_size`` rows (forever if None), for
        :meth:`iter_batches`. The position advances before each batch is handed out.
        """
        b = resolve_batch_size(batch_size, self.default_batch_size)
        if num_steps is not None:
            num_steps = check_int("num_steps", num_steps, 0)
        self._require_rows()
        n = self.num_rows
        produced = 0
        while num_steps is None or produced < num_steps:
            start = self.offset
            if start + b <= n:
                batch = self.rows(start, start + b)
            else:
                batch = self.share.take((start + np.arange(b)) % n)
            end = start + b
            self.epoch += end // n
            self.offset = end % n
            produced += 1
            yield batch

    def state(self) -> dict:
        """The data position, for checkpoints (see the module docstring)."""
        return {"kind": self.kind, "path": self.path, "epoch": self.epoch, "offset": self.offset,
                "rank": self.rank, "world_size": self.world_size, "data_lines": self.data_lines,
                "global_offset": self.offset * self.world_size}

    def restore(self, state: dict) -> None:
        """Continue at the position of :meth:`state`: the exact (epoch, offset) with the same
        world size, else offset = global_offset // world_size."""
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise DataError(f"cannot restore a {self.kind} reader from data state {state!r}")
        if state.get("data_lines") != self.data_lines:
            raise DataError(f"data state was saved for a file with {state.get('data_lines')} data "
                            f"lines, {self.path!r} has {self.data_lines}: not the same data")
        epoch = check_int("epoch", state.get("epoch"), 0)
        if state.get("world_size") == self.world_size:
            offset = check_int("offset", state.get("offset"), 0)
        else:
            offset = check_int("global_offset", state.get("global_offset"), 0) // self.world_size
        if offset > self.num_rows:
            raise DataError(f"data state offset {offset} is beyond this rank's {self.num_rows} rows")
        self.epoch, self.offset = epoch, offset
        if self.num_rows and self.offset == self.num_rows:
            self.epoch, self.offset = self.epoch + 1, 0
