"""What a run measures holds bounded state: the run record, the shards' staleness statistics and
the summary stop growing however many steps a run trains (a stream trainer runs for months).

Driven without TensorFlow (one process, hybridps.comm.SingleProcessComm). Expected values come
from closed forms of the figures fed in: a loss that is linear in the step (a block's mean is
its midpoint) and a staleness of ``step % 5`` (a block's maximum by numpy over its steps).
"""
import json
import sys
import types

import numpy as np
import pytest

from hybridps.metrics.accumulate import CURVE_POINTS, StepSeries, block_ends, series_width

BATCH = 8
MILLION = 1_000_000
CHECKS = (100_000, 400_000, MILLION)


def _loss_sum(step):
    return BATCH * step * 1e-6          # the mean sample loss of a step is step * 1e-6


def deep_size(obj, seen=None):
    """Bytes held by ``obj`` and everything it references (numpy arrays by their buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return sys.getsizeof(obj) + (obj.nbytes if obj.base is None else 0)
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType,
                                                           types.BuiltinFunctionType)):
        size += deep_size(vars(obj), seen)
    return size


@pytest.fixture(scope="module")
def million_steps():
    """A RunRecord and an OwnerShard's staleness statistics driven through a million steps,
    with their deep sizes after each of CHECKS steps."""
    from hybridps.config import make_config
    from hybridps.metrics import RunRecord
    from hybridps.schema import build_schema
    from hybridps.sparse.shard import OwnerShard
    from tests.schema_data import FEATURES
    config = make_config(overrides={"features": FEATURES, "batch_size": BATCH, "steps": 0, "log_every": 20})
    schema = build_schema(config)
    record = RunRecord(steps=0, log_every=config.log_every)
    shard = OwnerShard(schema, seed=0)
    batch = types.SimpleNamespace(truncated={})
    sizes = {}
    for step in range(MILLION):
        record.add_step(step, _loss_sum(step), batch)
        shard.record_staleness(step, np.array([step - 1 - step % 5]))   # stale by step % 5
        if step + 1 in CHECKS:
            sizes[step + 1] = (deep_size(record), deep_size(shard.staleness_max_by_step))
    record.steps = MILLION
    return config, schema, record, shard, sizes


def test_run_record_and_staleness_statistics_stop_growing(million_steps):
    _, _, record, shard, sizes = million_steps
    for series in (record.loss_sums, record.interval_seconds, shard.staleness_max_by_step):
        assert len(series.values) <= CURVE_POINTS
    # a float per step would have grown them tenfold from 100k to 1M steps
    for kind in (0, 1):
        assert sizes[MILLION][kind] <= 1.25 * sizes[CHECKS[0]][kind], sizes
        assert sizes[MILLION][kind] < 4_000_000, sizes


def test_summary_of_a_million_steps_is_bounded_and_keeps_its_meaning(million_steps):
    from hybridps.backends.base import shard_stats
    from hybridps.comm import SingleProcessComm
    from hybridps.metrics import summarize_run
    from hybridps.sparse.exchange import ExchangeCounters
    config, schema, record, shard, _ = million_steps
    counters = ExchangeCounters()      # 3 keys sent and 2 received in each step
    counters.keys_sent, counters.keys_received = 3 * MILLION, 2 * MILLION
    summary = summarize_run(SingleProcessComm(), config, schema, record, shard_stats(shard, counters),
                            compute_ranks=1, dense_parameters=0)
    assert summary["exchange"]["keys_sent_per_step"] == 3
    assert summary["exchange"]["keys_received_per_step"] == 2
    assert len(json.dumps(summary)) < 400_000
    every = summary["loss_trajectory_every"]
    ends = np.array(summary["loss_trajectory_steps"])
    assert every & (every - 1) == 0 and MILLION / every <= CURVE_POINTS
    assert len(ends) == len(summary["loss_trajectory"]) == len(summary["staleness_max_per_step"])
    assert ends[-1] == MILLION and np.all(np.diff(ends)[:-1] == every) and ends[-1] - ends[-2] <= every
    starts = np.concatenate([[0], ends[:-1]])
    np.testing.assert_allclose(summary["loss_trajectory"], (starts + ends - 1) / 2 * 1e-6, rtol=1e-9)
    assert summary["final_loss"] == pytest.approx((MILLION - 1) * 1e-6, rel=1e-12)
    expected_max = np.maximum.reduceat(np.arange(MILLION) % 5, starts)
    assert summary["staleness_max_per_step"] == expected_max.tolist()
    assert summary["staleness_max"] == 4
    assert summary["staleness_histogram"] == [MILLION // 5] * 5
    intervals = summary["samples_per_s_by_interval"]
    assert 0 < len(intervals) <= CURVE_POINTS
    interval_steps = intervals[1][0] - intervals[0][0]
    assert interval_steps % config.log_every == 0
    assert [k for k, _ in intervals] == [1 + n * interval_steps for n in range(1, len(intervals) + 1)]
    assert intervals[-1][0] <= MILLION and all(rate > 0 for _, rate in intervals)


def test_a_short_run_keeps_every_step():
    """Runs of up to CURVE_POINTS steps keep one value per step (and a resumed run's steps)."""
    for first, stop in ((0, 1), (0, CURVE_POINTS), (37, 37 + CURVE_POINTS)):
        series = StepSeries()
        for step in range(first, stop):
            series.add(step, float(step))
        width = series_width(first, stop)
        assert series.width == width == 1
        assert series.blocks(first, stop, width).tolist() == list(map(float, range(first, stop)))
        counts, ends = block_ends(first, stop, width)
        assert counts.tolist() == [1] * (stop - first) and ends.tolist() == list(range(first + 1, stop + 1))


def test_series_rebinned_onto_a_wider_block_combine_whole_blocks():
    """Series of different widths over the same steps line up once rebinned (what the
    allreduce over ranks needs); steps may arrive out of order."""
    narrow, wide = StepSeries(max, capacity=64), StepSeries(max, capacity=8)
    steps = list(range(10, 75))
    for step in reversed(steps):
        narrow.add(step, step % 9)
        wide.add(step, step % 9)
    assert narrow.width == 2 and wide.width == 16
    want = [max(s % 9 for s in steps if s // 16 == b) for b in range(10 // 16, 74 // 16 + 1)]
    assert narrow.blocks(10, 75, 16).tolist() == wide.blocks(10, 75, 16).tolist() == want
    with pytest.raises(ValueError):
        wide.blocks(10, 75, 8)


def test_progress_lines_end_with_the_sources_note_and_nothing_when_it_has_none():
    """Progress takes a data source's progress_note as it is: its text ends a line; a source
    with nothing to say (None, every file and generator) adds nothing to the line."""
    import io
    from hybridps.metrics.progress import Progress
    for note, tail in ((lambda: "stream 5 rows/s", " stream 5 rows/s\n"), (lambda: None, "s\n")):
        out = io.StringIO()
        Progress(2, enabled=True, log_every=1, stream=out, note=note).update(0, 0.5, 100.0)
        line = out.getvalue()
        assert line.startswith("step 1/2 rank-0 loss 0.5000 100 samples/s elapsed ")
        assert line.endswith(tail) and "None" not in line
