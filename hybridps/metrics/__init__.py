"""hybridps.metrics: what a run measures and reports.

* :mod:`accumulate`: per-rank accumulators (progressive AUC histogram, phase timer);
* :mod:`progress`: rank 0's progress line;
* :mod:`summary`: the run summary reduced over all ranks, and the metrics file;
* :mod:`tensorboard`: rank 0's TensorBoard scalars (imported where used: it needs TensorFlow).

AUC is computed over all ranks' predictions, not rank 0's share: each rank histograms its
predicted probabilities of positives and negatives into 100k equal-width bins, the histograms
are summed over ranks, and the AUC is the Mann-Whitney statistic on the bins (ties within a
bin count one half). With 100k bins the error against the exact AUC is below 1e-4.
"""
from hybridps.metrics.accumulate import AUC_BINS, AUCAccumulator, PhaseTimer
from hybridps.metrics.progress import Progress
from hybridps.metrics.summary import RunRecord, summarize_run, write_summary

__all__ = ["AUC_BINS", "AUCAccumulator", "PhaseTimer", "Progress", "RunRecord", "summarize_run",
           "write_summary"]
