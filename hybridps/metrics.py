"""Training metrics: global AUC, per-phase step timing, throughput, progress and the JSON summary.

What lives here: accumulators that each rank fills locally and that are reduced over all ranks
once at the end (so measuring adds no collective to the step), the progress line on rank 0,
and the summary file. What does not: the loss function (hybridps.models) and any MPI setup.

AUC is computed over all ranks' predictions, not rank 0's share: each rank histograms its
predicted probabilities of positives and negatives into ``AUC_BINS`` equal-width bins, the
histograms are summed over ranks, and the AUC is the Mann-Whitney statistic on the bins (ties
within a bin count one half). With 100k bins the error against the exact AUC is below 1e-4.
"""
import json
import os
import sys
import time

import numpy as np

from hybridps.errors import OutputError

AUC_BINS = 100_000


class AUCAccumulator:
    """Histogram AUC that merges exactly across ranks by summing counts."""

    def __init__(self, bins=AUC_BINS):
        self.positives = np.zeros(bins, dtype=np.int64)
        self.negatives = np.zeros(bins, dtype=np.int64)
        self.bins = bins

    def update(self, labels, probabilities):
        index = np.clip((np.asarray(probabilities, dtype=np.float64) * self.bins).astype(np.int64),
                        0, self.bins - 1)
        positive = np.asarray(labels) > 0.5
        self.positives += np.bincount(index[positive], minlength=self.bins)
        self.negatives += np.bincount(index[~positive], minlength=self.bins)

    @staticmethod
    def auc_from_histograms(positives, negatives):
        """AUC from per-bin counts; NaN when a class is missing."""
        total_pos, total_neg = positives.sum(), negatives.sum()
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        negatives_below = np.cumsum(negatives) - negatives
        wins = (positives * negatives_below).sum() + 0.5 * (positives * negatives).sum()
        return float(wins / (float(total_pos) * float(total_neg)))


class PhaseTimer:
    """Wall time per step phase (pull, compute, dense, push), summed over the steady steps.

    ``restart()`` at the end of the warm-up steps drops what was measured so far, so the
    per-step figures, like ``samples_per_s``, leave out tracing and table growth.
    """

    PHASES = ("pull", "compute", "dense", "push")   # pull includes data loading (or the wait for prefetched rows)

    def __init__(self):
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._last = None

    def start(self):
        self._last = time.perf_counter()

    def restart(self):
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.start()

    def mark(self, phase):
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def per_step_ms(self, steps):
        return {k: 1000.0 * v / max(steps, 1) for k, v in self.totals.items()}


class Progress:
    """A progress bar on a terminal, periodic log lines otherwise (rank 0 only)."""

    def __init__(self, total, enabled, log_every, stream=sys.stderr):
        self.total = total
        self.enabled = enabled
        self.log_every = log_every
        self.stream = stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.started = time.perf_counter()

    def update(self, step, loss, samples_per_s):
        if not self.enabled:
            return
        done = step + 1
        if self.tty:
            width = 30
            filled = int(width * done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                              f"rank-0 loss {loss:.4f} {samples_per_s:,.0f} samples/s")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done % self.log_every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.started
            self.stream.write(f"step {done}/{self.total} rank-0 loss {loss:.4f} "
                              f"{samples_per_s:,.0f} samples/s elapsed {elapsed:.1f}s\n")
            self.stream.flush()


def write_summary(path, summary):
    """Write the metrics JSON atomically (temporary file + rename).

    Raises:
        OutputError: the file could not be written (disk full, permissions, a directory in
            the way); the temporary file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write the metrics file {path}: {exc.strerror or exc}; "
                          f"the metrics of this run were not saved") from None
