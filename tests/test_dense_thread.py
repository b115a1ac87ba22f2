"""Unit tests of hybridps.dense.DenseAllreduceThread (one process, a stand-in for DenseSync).

The background thread must reduce every submitted step exactly once and in order; the
training thread applies the reduced steps in that order, gets through ``apply_ready`` only once
the steps it needs are applied, is bounded in what it may queue, and sees a failure of the
allreduce as an error instead of a hang.
"""
import threading
import time

import pytest

from hybridps.dense import DenseAllreduceThread
from hybridps.errors import HybridPSError


class RecordingDense:
    """``reduce`` doubles a step's marker (and can be held back or fail); ``apply_local``
    records what is applied and by which thread."""

    def __init__(self, fail_at=None):
        self.reduced = []
        self.applied = []
        self.apply_threads = set()
        self.release = threading.Event()
        self.release.set()
        self.fail_at = fail_at

    def reduce(self, grads):
        self.release.wait(5)
        if self.fail_at is not None and grads[0] == self.fail_at:
            raise ValueError(f"allreduce of step {grads[0]} failed")
        self.reduced.append(grads[0])
        return [2 * grads[0]]

    def apply_local(self, grads):
        self.applied.append(grads[0] // 2)
        self.apply_threads.add(threading.get_ident())


def test_steps_are_reduced_and_applied_once_in_order_by_the_training_thread():
    dense = RecordingDense()
    worker = DenseAllreduceThread(dense, first_step=10, max_pending=1)
    worker.apply_ready(10)                       # nothing to wait for at the first step
    for step in range(10, 30):
        worker.submit([step])
        worker.apply_ready(step + 1)             # BSP: the update of step is in before step + 1
        worker.record_lag(step + 1)
        assert dense.applied[-1] == step
    worker.close()
    assert dense.reduced == dense.applied == list(range(10, 30))
    assert dense.apply_threads == {threading.get_ident()}
    assert worker.lag_summary() == [0, 0, 20]


def test_submit_blocks_while_max_pending_steps_wait_and_lag_is_counted():
    dense = RecordingDense()
    dense.release.clear()                        # no allreduce can finish yet
    worker = DenseAllreduceThread(dense, first_step=0, max_pending=2)
    worker.submit([0])
    worker.submit([1])
    third = threading.Thread(target=worker.submit, args=([2],))
    third.start()
    time.sleep(0.3)
    assert third.is_alive() and dense.applied == []     # held: two steps already wait
    worker.record_lag(2)                                # step 2 starts without steps 0 and 1
    dense.release.set()
    third.join(5)
    assert not third.is_alive()
    worker.close()
    assert dense.applied == [0, 1, 2]
    assert worker.lag_summary() == [2, 2, 1]


@pytest.mark.timeout(60)            # a waiter left hanging fails here (how long it took is not asserted)
def test_a_failing_allreduce_is_raised_to_the_waiter_not_hung():
    dense = RecordingDense(fail_at=2)
    worker = DenseAllreduceThread(dense, first_step=0, max_pending=4)
    for step in range(4):
        worker.submit([step])
    with pytest.raises(HybridPSError, match="allreduce of step 2 failed"):
        worker.apply_ready(4)
    assert dense.applied == [0, 1]
    with pytest.raises(HybridPSError, match="dense allreduce thread failed"):
        worker.submit([4])
    with pytest.raises(HybridPSError):
        worker.close()
