"""Unit tests of hybridps.dense.DenseStepThread (one process, a stand-in for DenseSync).

The thread must apply every submitted step exactly once and in order, let a waiter through
only once the steps it waits for are applied, bound what is queued, and hand a failure of the
dense step to whoever waits on it instead of hanging.
"""
import threading
import time

import pytest

from hybridps.dense import DenseStepThread
from hybridps.errors import HybridPSError


class RecordingDense:
    """Records the gradients of each step; a step can be held back until released."""

    def __init__(self, fail_at=None):
        self.applied = []
        self.release = threading.Event()
        self.release.set()
        self.fail_at = fail_at

    def step(self, grads):
        self.release.wait(5)
        if self.fail_at is not None and grads[0] == self.fail_at:
            raise ValueError(f"allreduce of step {grads[0]} failed")
        self.applied.append(grads[0])


def test_steps_are_applied_once_in_order_and_waits_see_them():
    dense = RecordingDense()
    worker = DenseStepThread(dense, first_step=10, max_pending=3)
    worker.wait_applied(10)                      # nothing to wait for at the first step
    for step in range(10, 30):
        worker.submit([step])
        worker.wait_applied(step + 1)
        assert dense.applied[-1] == step         # the step waited for is applied...
    worker.close()
    assert dense.applied == list(range(10, 30))  # ...each one once, in order


def test_submit_blocks_while_max_pending_steps_wait():
    dense = RecordingDense()
    dense.release.clear()                        # the first step cannot finish yet
    worker = DenseStepThread(dense, first_step=0, max_pending=2)
    worker.submit([0])
    worker.submit([1])
    third = threading.Thread(target=worker.submit, args=([2],))
    third.start()
    time.sleep(0.3)
    assert third.is_alive() and dense.applied == []     # held: two steps already wait
    dense.release.set()
    third.join(5)
    assert not third.is_alive()
    worker.wait_applied(3)
    worker.close()
    assert dense.applied == [0, 1, 2]


def test_a_failing_step_is_raised_to_the_waiter_not_hung():
    dense = RecordingDense(fail_at=2)
    worker = DenseStepThread(dense, first_step=0, max_pending=4)
    for step in range(4):
        worker.submit([step])
    started = time.perf_counter()
    with pytest.raises(HybridPSError, match="allreduce of step 2 failed"):
        worker.wait_applied(4)
    assert time.perf_counter() - started < 2
    assert dense.applied == [0, 1]
    with pytest.raises(HybridPSError, match="dense update thread failed"):
        worker.submit([4])
    with pytest.raises(HybridPSError):
        worker.close()
