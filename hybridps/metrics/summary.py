"""The run summary: every rank's accumulators reduced over all ranks, and the metrics file.

What lives here: :class:`RunRecord` (what the training loop accumulates on each rank),
:func:`summarize_run` (collective: losses, AUC, throughput, exchange volume, observed
staleness, dense lag, table rows, counters and policies, phase timings, memory, data
statistics) and :func:`write_summary` (the JSON file, atomically). What does not: the loop
(hybridps.trainer), the backends' counters themselves (``Backend.stats()``).
"""
import dataclasses
import json
import os
import time

import numpy as np

from hybridps.data.stats import combine_data_stats
from hybridps.errors import OutputError
from hybridps.metrics.accumulate import AUCAccumulator, PhaseTimer, StepSeries, block_ends, series_width
from hybridps.sparse import shard as owner_shard     # a module: the shard imports this package


@dataclasses.dataclass
class RunRecord:
    """What one rank accumulates while it trains (every field local to the rank).

    Its size does not grow with the step count: the per-step losses and the time of each
    ``log_every`` steps are :class:`StepSeries` (every step of a run of up to CURVE_POINTS
    steps, blocks of consecutive steps beyond)."""
    steps: int                       # the last step + 1 of the run (set at the end when unbounded)
    start_step: int = 0
    log_every: int = 20              # steps per interval of samples_per_s_by_interval
    loss_sums: StepSeries = dataclasses.field(default_factory=StepSeries)   # this rank's sample-loss sums
    last_loss_sum: float = 0.0       # this rank's sum of sample losses of the latest step
    interval_seconds: StepSeries = dataclasses.field(default_factory=StepSeries)  # per log_every steps
    auc: AUCAccumulator = dataclasses.field(default_factory=AUCAccumulator)
    timer: PhaseTimer = dataclasses.field(default_factory=PhaseTimer)
    truncated: dict = dataclasses.field(default_factory=dict)    # feature -> ids dropped
    started: float = 0.0
    steady_start: float = None
    finished: float = 0.0
    paused: float = 0.0              # seconds of steady time spent evaluating (not training)
    interval_start: float = None     # perf_counter when this interval began (its previous step ended)
    start_rss_mb: float = 0.0        # resident memory when the run started

    def __post_init__(self):
        self.started = self.finished = time.perf_counter()
        self.start_rss_mb = current_rss_mb()

    def add_step(self, step, loss_sum, batch):
        self.last_loss_sum = float(loss_sum)
        self.loss_sums.add(step, self.last_loss_sum)
        now, done = time.perf_counter(), step - self.start_step   # steps done before this one
        if self.interval_start is None:
            self.interval_start = now          # intervals start after the first step
        elif done % self.log_every == 0:
            self.interval_seconds.add(done // self.log_every - 1, now - self.interval_start)
            self.interval_start = now
        for name, count in batch.truncated.items():
            self.truncated[name] = self.truncated.get(name, 0) + int(count)


def summarize_run(comm, config, schema, record, stats, *, compute_ranks, dense_parameters,
                  data_stats=None, resume_messages=()):
    """The summary dict of a run (collective over all ranks, servers included).

    Args:
        record: this rank's RunRecord.
        stats: this rank's ``backend.stats()``.
        compute_ranks: ranks that trained (the global batch is batch_size x this).
        data_stats: this rank's ``dataset.stats()`` (None where no data is read).
    """
    c = config
    global_batch = c.batch_size * compute_ranks
    # per-step series are rebinned onto blocks of one width, the widest any rank holds
    width = int(comm.allreduce_max(np.array([series_width(record.start_step, record.steps),
                                             record.loss_sums.width,
                                             stats["staleness_max_by_step"].width], dtype=np.int64))[0])
    counts, point_ends = block_ends(record.start_step, record.steps, width)
    losses = (comm.allreduce_sum(record.loss_sums.blocks(record.start_step, record.steps, width))
              / global_batch / np.maximum(counts, 1))
    final_loss = float(comm.allreduce_sum(np.array([record.last_loss_sum]))[0]) / global_batch
    positives = comm.allreduce_sum(record.auc.positives)
    negatives = comm.allreduce_sum(record.auc.negatives)
    steps_run = record.steps - record.start_step
    steady = record.steady_start is not None
    steady_steps = steps_run - c.warmup_steps if steady else steps_run
    steady_seconds = record.finished - (record.steady_start if steady else record.started) - record.paused
    slowest = float(comm.allreduce_max(np.array([steady_seconds]))[0])
    volume = comm.allreduce_sum(np.array([stats["keys_sent"], stats["keys_received"], stats["bytes_sent"],
                                          stats["bytes_received"]], dtype=np.int64))
    rows = comm.allreduce_sum(np.array(stats["table_rows"], dtype=np.int64))
    phases = record.timer.per_step_ms(steady_steps)
    phase_max = comm.allreduce_max(np.array(list(phases.values())))
    per_rank = lambda total: float(total) / max(steps_run, 1) / compute_ranks   # noqa: E731
    summary = {
        "steps": record.steps, "ranks": comm.size, "global_batch_size": global_batch,
        "computing_ranks": compute_ranks, "num_servers": comm.size - compute_ranks,
        "samples_per_s": steady_steps * global_batch / max(slowest, 1e-9),
        "final_loss": final_loss if len(losses) else float("nan"),
        "loss_trajectory": [float(x) for x in losses],
        "loss_trajectory_steps": [int(x) for x in point_ends],
        "loss_trajectory_every": width,
        "first_step": record.start_step, "resume_messages": list(resume_messages),
        "auc": AUCAccumulator.auc_from_histograms(positives, negatives),
        "auc_steps": [int(c.steps * (1.0 - c.auc_window)), record.steps],   # steps 0: all
        "mode": c.mode.value, "sync": c.sync.value, "staleness": c.staleness,
        "model": c.model, "data": c.data, "seed": c.seed,
        "elapsed_s": record.finished - record.started, "warmup_steps": c.warmup_steps,
        "exchange": {"keys_sent_per_step": per_rank(volume[0]),
                     "keys_received_per_step": per_rank(volume[1]),
                     "bytes_sent_per_step": per_rank(volume[2]),
                     "bytes_received_per_step": per_rank(volume[3]),
                     "per": "computing rank"},
        "table_rows": [int(r) for r in rows],
        "table_names": [t.name for t in schema.tables],
        **_consistency(comm, record, stats, width),
        **_dense_lag(comm, stats),
        "phase_ms_per_step_max_over_ranks": dict(zip(phases.keys(), map(float, phase_max))),
        "peak_rss_mb": float(comm.allreduce_max(np.array([peak_rss_mb()]))[0]),
        "peak_rss_mb_per_rank": [float(x) for x in comm.allgather_object(peak_rss_mb())],
        "start_rss_mb_per_rank": [float(x) for x in comm.allgather_object(record.start_rss_mb)],
        "samples_per_s_by_interval": _interval_rates(record, global_batch),
        "dense_parameters": int(dense_parameters),
        "table_counters": _table_counters(comm, stats),
        "table_policies": [t.policy() for t in schema.tables],
        "truncated_ids": _truncated(comm, record),
    }
    from hybridps.config import config_hash
    summary["config_hash"] = config_hash(c)
    gathered = comm.allgather_object(data_stats)
    if any(s is not None for s in gathered):
        summary["data_stats"] = combine_data_stats(gathered)
        # readers that hold their share truncate lists once, when they read the file
        for name, count in summary["data_stats"].get("truncated_ids", {}).items():
            summary["truncated_ids"][name] = summary["truncated_ids"].get(name, 0) + count
    return summary


def _consistency(comm, record, stats, width):
    """Observed staleness (all owners' reads) and the pushed == applied gradient count;
    the maximum per step (per block of ``width`` steps in long runs, as the loss curve)."""
    histogram = comm.allreduce_sum(stats["staleness_histogram"])
    per_step = comm.allreduce_max(stats["staleness_max_by_step"].blocks(record.start_step, record.steps,
                                                                        width).astype(np.int64))
    counts = comm.allreduce_sum(np.array([stats["row_grads_pushed"], stats["row_grads_applied"]],
                                         dtype=np.int64))
    reads = max(int(histogram.sum()), 1)
    nonzero = np.nonzero(histogram)[0]
    top = int(nonzero.max()) if len(nonzero) else 0
    return {"staleness_max": top,
            "staleness_mean": float((histogram * np.arange(owner_shard.STALENESS_BINS)).sum() / reads),
            "staleness_histogram": [int(x) for x in histogram[:top + 1]] if len(nonzero) else [0],
            "staleness_max_per_step": [int(x) for x in per_step],
            "row_grads_pushed": int(counts[0]), "row_grads_applied": int(counts[1])}


def _dense_lag(comm, stats):
    """How many of the latest steps' dense updates a TF step missed: max and mean over every
    step of every computing rank (where the backend measures it: the collective modes)."""
    measured = comm.allgather_object(stats["dense_lag"] is not None)
    if not any(measured):
        return {}
    worst, total, count = stats["dense_lag"] or (0, 0, 0)
    worst = int(comm.allreduce_max(np.array([worst], dtype=np.int64))[0])
    total, count = comm.allreduce_sum(np.array([total, count], dtype=np.int64))
    return {"dense_staleness_max": worst, "dense_staleness_mean": float(total) / max(int(count), 1)}


def _table_counters(comm, stats):
    names = owner_shard.TABLE_COUNTERS
    local = np.array([[c[n] for n in names] for c in stats["table_counters"]], dtype=np.int64)
    total = comm.allreduce_sum(local.reshape(len(stats["table_counters"]), len(names)))
    return [dict(zip(names, map(int, row))) for row in total]


def _truncated(comm, record):
    gathered = comm.allgather_object(record.truncated)
    total = {}
    for part in gathered:
        for name, count in part.items():
            total[name] = total.get(name, 0) + count
    return total


def _interval_rates(record, global_batch):
    """[completed steps, samples/s over the interval that ends there] (this rank's clock; a BSP
    step ends on every rank at about the same time), the first interval after the first step:
    intervals of ``log_every`` steps, of a power of two times as many in long runs (the series
    holds at most CURVE_POINTS intervals)."""
    series = record.interval_seconds
    intervals = max(record.steps - record.start_step - 1, 0) // record.log_every   # complete ones
    seconds = series.blocks(0, intervals, series.width)[:intervals // series.width]   # whole blocks
    steps = series.width * record.log_every
    return [[record.start_step + (k + 1) * steps + 1, steps * global_batch / max(float(s), 1e-9)]
            for k, s in enumerate(seconds)]


def current_rss_mb():
    """This process's resident memory now, in MiB (/proc/self/statm; 0 where it is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb():
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
