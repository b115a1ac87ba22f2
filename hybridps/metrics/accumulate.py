"""Per-rank accumulators of a run: the progressive AUC histogram, the per-phase step timer and
per-step series in bounded memory.

What lives here: accumulators that each rank fills locally and that are reduced over all ranks
once at the end (hybridps.metrics.summary), so measuring adds no collective to the step. What
does not: the loss function (hybridps.models), the progress line (hybridps.metrics.progress).

Every accumulator has a size that does not grow with the step count (a run without an end
trains for months): per-step figures go into a :class:`StepSeries`, which keeps every step of
a run of up to ``CURVE_POINTS`` steps and blocks of consecutive steps beyond.

AUC is computed over all ranks' predictions, not rank 0's share: each rank histograms its
predicted probabilities of positives and negatives into ``AUC_BINS`` equal-width bins, the
histograms are summed over ranks, and the AUC is the Mann-Whitney statistic on the bins (ties
within a bin count one half). With 100k bins the error against the exact AUC is below 1e-4.
"""
import operator
import time

import numpy as np


AUC_BINS = 100_000
CURVE_POINTS = 4096     # a StepSeries holds at most this many values


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


class StepSeries:
    """One figure per step in bounded memory: a value per block of ``width`` consecutive steps
    (block ``k`` holds steps ``[k * width, (k + 1) * width)``), at most ``capacity`` blocks.

    ``width`` starts at 1 (a value per step) and doubles, combining neighbouring blocks with
    ``combine`` (``operator.add`` for sums, ``max`` for maxima), whenever a new block would
    exceed ``capacity``; so a run of any length holds at most ``capacity`` values, and a run of
    at most ``capacity`` steps keeps every step. Steps may arrive in any order.

    Blocks are aligned to multiples of ``width``, so series filled over the same steps on
    different ranks line up: :meth:`blocks` rebins one onto a wider power of two (the widest
    of all ranks), ready for an allreduce.
    """

    def __init__(self, combine=operator.add, capacity=CURVE_POINTS):
        if capacity < 2:
            raise ValueError(f"StepSeries capacity must be >= 2, got {capacity}")
        self.combine, self.capacity = combine, int(capacity)
        self.shift = 0                  # width = 2 ** shift
        self.values = {}                # block index -> combined value

    @property
    def width(self):
        return 1 << self.shift

    def add(self, step, value):
        block = step >> self.shift
        previous = self.values.get(block)
        self.values[block] = value if previous is None else self.combine(previous, value)
        if len(self.values) > self.capacity:
            self._coarsen()

    def _coarsen(self):
        while len(self.values) > self.capacity:
            merged = {}
            for block, value in self.values.items():
                previous = merged.get(block >> 1)
                merged[block >> 1] = value if previous is None else self.combine(previous, value)
            self.values, self.shift = merged, self.shift + 1

    def copy(self):
        twin = StepSeries(self.combine, self.capacity)
        twin.shift, twin.values = self.shift, dict(self.values)
        return twin

    def blocks(self, first, stop, width):
        """The values of the steps in ``[first, stop)`` combined per block of ``width`` steps
        (a power of two, at least this series' width), as a float64 array with one entry per
        block from ``first // width`` to ``(stop - 1) // width`` (0 where no step was added);
        steps outside ``[first, stop)`` are left out."""
        if width < self.width or width & (width - 1):
            raise ValueError(f"cannot rebin a series of width {self.width} onto width {width}")
        if stop <= first:
            return np.zeros(0, dtype=np.float64)
        low = first // width
        out = np.zeros((stop - 1) // width - low + 1, dtype=np.float64)
        filled = np.zeros(len(out), dtype=bool)
        ratio = width >> self.shift
        for block, value in self.values.items():
            start = block << self.shift
            if start + self.width <= first or start >= stop:
                continue
            index = block // ratio - low
            out[index] = value if not filled[index] else self.combine(out[index], value)
            filled[index] = True
        return out


def series_width(first, stop, capacity=CURVE_POINTS):
    """The block width (a power of two) of series over the steps ``[first, stop)``: the
    smallest whose aligned blocks number at most ``capacity`` (no :class:`StepSeries` filled
    within those steps is wider)."""
    width = 1
    while stop > first and (stop - 1) // width - first // width + 1 > capacity:
        width *= 2
    return width


def block_ends(first, stop, width):
    """Per block of :meth:`StepSeries.blocks`: its steps within ``[first, stop)`` (as counts)
    and the completed-step count at its end."""
    if stop <= first:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.arange(first // width, (stop - 1) // width + 1, dtype=np.int64) * width
    ends = np.minimum(starts + width, stop)
    return ends - np.maximum(starts, first), ends
