"""Per-rank accumulators of a run: the progressive AUC histogram and the per-phase step timer.

What lives here: accumulators that each rank fills locally and that are reduced over all ranks
once at the end (hybridps.metrics.summary), so measuring adds no collective to the step. What
does not: the loss function (hybridps.models), the progress line (hybridps.metrics.progress).

AUC is computed over all ranks' predictions, not rank 0's share: each rank histograms its
predicted probabilities of positives and negatives into ``AUC_BINS`` equal-width bins, the
histograms are summed over ranks, and the AUC is the Mann-Whitney statistic on the bins (ties
within a bin count one half). With 100k bins the error against the exact AUC is below 1e-4.
"""
import time

import numpy as np


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
