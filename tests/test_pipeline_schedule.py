"""The SSP/ASP operation schedule (hybridps.backends.collective.pipeline) is lazy and equals the eager one.

The reference is the eager ``with_fences`` hybridps shipped before (it rebuilt the whole
operation list once per fence, so a run of 1e5 steps with 1,000 fences spent 45 s in it before
its first step): the lazy generator must give exactly its operation sequence on small cases,
produce the first operations of a 1e6-step schedule with a fence every 5 steps without building
it (what was allocated is measured with tracemalloc, not the time: a loaded machine is slow), and
run on an unbounded schedule (``steps=None``, train until stopped).
"""
import itertools
import tracemalloc

import pytest

from hybridps.backends.collective.pipeline import asp_schedule, ssp_schedule, with_fences
from hybridps.trainer import ConsistentPoints


def peak_bytes(work):
    """(work()'s result, the most bytes Python held for it at once)."""
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def eager_with_fences(schedule, fences):
    """The old implementation, kept verbatim as the reference."""
    ops, fences = list(schedule), sorted(set(fences))
    for k in fences:
        at = next((i for i, op in enumerate(ops) if op == ("pull", k)), len(ops))
        late = [op for op in ops[at:] if op[0] == "push" and op[1] < k]
        rest = [op for op in ops[at:] if not (op[0] == "push" and op[1] < k)]
        ops = ops[:at] + late + [("fence", k)] + rest
    return ops


SCHEDULES = [("ssp", s) for s in (0, 1, 2, 5)] + [("asp", lag) for lag in (1, 2, 4, 9)]
FENCE_SETS = [[], [3], [1, 2, 3], [5, 10, 15], [4, 4, 8], [0, 3, 7, 11, 25, 40], list(range(0, 30, 3)),
              [12], [13, 14]]


def make(kind, start, steps, bound):
    return ssp_schedule(start, steps, bound) if kind == "ssp" else asp_schedule(start, steps, bound)


@pytest.mark.parametrize("kind, bound", SCHEDULES)
@pytest.mark.parametrize("start, steps", [(0, 1), (0, 7), (0, 20), (3, 14), (5, 6), (2, 30)])
def test_lazy_fences_equal_the_eager_reference(kind, bound, start, steps):
    for fences in FENCE_SETS:
        expected = eager_with_fences(make(kind, start, steps, bound), fences)
        got = list(with_fences(make(kind, start, steps, bound), fences))
        assert got == expected, (kind, bound, start, steps, fences)
        # the trainer's membership-only form (no list of fences) gives the same order when
        # every fence has its pull
        inside = [k for k in fences if start <= k < steps]
        got = list(with_fences(make(kind, start, steps, bound), _Only(inside)))
        assert got == eager_with_fences(make(kind, start, steps, bound), inside)


class _Only:
    """Membership only, like the trainer's ConsistentPoints: not iterable."""

    def __init__(self, steps):
        self._steps = frozenset(steps)

    def __contains__(self, k):
        return k in self._steps


@pytest.mark.parametrize("kind, bound", [("ssp", 1), ("asp", 4)])
def test_a_million_steps_with_a_fence_every_five_start_at_once(kind, bound):
    steps = 1_000_000
    first, peak = peak_bytes(lambda: list(itertools.islice(
        with_fences(make(kind, 0, steps, bound), ConsistentPoints([5], steps)), 100)))
    assert peak < 200_000, f"{peak} bytes for the first 100 operations: the schedule was built"
    reference = eager_with_fences(make(kind, 0, 60, bound), range(5, 60, 5))
    assert first == reference[:100]
    assert ("fence", 5) in first and ("fence", 0) not in first


@pytest.mark.parametrize("kind, bound", [("ssp", 0), ("ssp", 2), ("asp", 3)])
def test_unbounded_schedule_with_fences(kind, bound):
    """steps=None never ends; its first operations are those of a long bounded schedule."""
    for start in (0, 7):
        unbounded = with_fences(make(kind, start, None, bound), ConsistentPoints([4], None))
        got = list(itertools.islice(unbounded, 300))
        bounded = eager_with_fences(make(kind, start, start + 1000, bound),
                                    [k for k in range(4, start + 1000, 4) if k > start])
        assert got == bounded[:300]
        pulls = [step for op, step in got if op == "pull"]
        assert pulls == list(range(start, start + len(pulls)))


def test_consistent_points_are_a_cheap_predicate():
    points = ConsistentPoints([5, 7], 30)
    assert [k for k in range(40) if k in points] == [5, 7, 10, 14, 15, 20, 21, 25, 28]
    assert 0 not in ConsistentPoints([5], 10) and 10 not in ConsistentPoints([5], 10)
    assert 10 ** 12 in ConsistentPoints([5], None)
    assert 3 not in ConsistentPoints([], 10)
    _, peak = peak_bytes(lambda: 10 ** 12 - 1 in ConsistentPoints([1], 10 ** 12))
    assert peak < 20_000, f"{peak} bytes: the points were listed"
