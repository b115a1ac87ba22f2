"""DataSource: what every source of training samples is to the rest of hybridps.

What lives here: the abstract base :class:`DataSource` that every reader and stream source
implements (the Criteo TSV reader, the synthetic generators, the schema CSV, Parquet and TFRecord
readers, the directory and Redis streams), so the trainer, evaluation and start-up checks ask a
source what it is instead of probing it. What does not: parsing (the readers), choosing the
source of a run (:func:`hybridps.data.open_data`), agreeing on steps (hybridps.step_control).

A source is one rank's view of the data of a job of ``world_size`` ranks:

* ``schema`` (hybridps.schema.FeatureSchema): the features its batches hold, in schema order;
  ``rank``, ``world_size``: its place among the ranks that read the data.
* ``finite``: True for data with an end (files: :meth:`epoch_batches` reads the share once,
  ``num_rows`` counts it); False for generators and streams.
* ``streaming``: True when rows arrive while training runs (every step is agreed by every rank
  before it starts: :meth:`iter_batches` needs ``control``).
* :meth:`iter_batches` ``(batch_size, num_steps=None, *, control=None, start_step=0)``: the
  training batches from the current position, exactly ``batch_size`` rows each; the position
  moves before each batch is handed out. With ``control`` (a hybridps.step_control
  StepAgreement) every batch is agreed by every rank first; ``start_step`` numbers them.
* :meth:`epoch_batches` ``(batch_size, count=None)``: held-out reading (evaluation,
  prediction): one pass in order, the position unmoved; a generator gives ``count`` batches no
  training step reaches; a stream cannot be held-out data (ConfigError).
* :meth:`state` / :meth:`restore`: the position, a JSON-able dict kept in checkpoints; restoring
  it continues with the row after the last one trained (streams: on any number of ranks).
* :meth:`stats`: what was read (rows, bad lines skipped, ...; hybridps.data.stats combines
  them over ranks), None for a generator; :meth:`fingerprint`: what identifies the data read
  (compared across ranks at start-up), None when there is nothing to compare;
  :meth:`progress_note`: a short text for progress lines, None when there is nothing to say.

A subclass implements ``_next_batches(batch_size, num_steps)`` (the training batches without
agreement; the base class adds ``control``), ``state``, ``restore`` and ``stats``; a stream
overrides :meth:`iter_batches` itself (its readiness is part of the agreement).
"""
from __future__ import annotations

from typing import Iterator, Optional

from hybridps.errors import ConfigError

__all__ = ["DataSource"]


class DataSource:
    """One rank's source of training batches (see the module docstring)."""

    kind = "source"
    finite = True
    streaming = False
    schema = None
    rank = 0
    world_size = 1

    def iter_batches(self, batch_size: Optional[int] = None, num_steps: Optional[int] = None, *,
                     control=None, start_step: int = 0) -> Iterator:
        """``num_steps`` training batches of ``batch_size`` rows (forever if None) from the
        current position, each agreed by every rank through ``control`` when given."""
        batches = self._next_batches(batch_size, num_steps)
        return batches if control is None else control.batches(batches, start_step)

    def _next_batches(self, batch_size, num_steps) -> Iterator:
        """The training batches without agreement (subclasses)."""
        raise NotImplementedError

    def epoch_batches(self, batch_size: int, count: Optional[int] = None) -> Iterator:
        """Held-out batches (see the module docstring)."""
        raise ConfigError(f"a {self.kind} source cannot be read as held-out data (evaluation, "
                          f"prediction): give a data file or synthetic data")

    def state(self) -> dict:
        """The position, for checkpoints."""
        raise NotImplementedError

    def restore(self, state: dict) -> None:
        """Continue at the position of :meth:`state`."""
        raise NotImplementedError

    def stats(self) -> Optional[dict]:
        """What was read (None: nothing to report)."""
        raise NotImplementedError

    def fingerprint(self) -> Optional[dict]:
        """What identifies the data this rank read (None: nothing to compare across ranks)."""
        return None

    def progress_note(self) -> Optional[str]:
        """A short text for progress lines (None: nothing to add)."""
        return None
