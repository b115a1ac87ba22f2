"""DenseAllreduceThread: the dense allreduces of every step, in order, off the training thread.

What lives here: the thread that takes each step's dense gradients, allreduces them through
DenseSync (hybridps.dense.sync) and hands the reduced gradients back; the bounded queue between
them; the measured dense lag. What does not: the arithmetic (DenseSync).
"""
import collections
import threading

from hybridps import exchange_trace
from hybridps.errors import HybridPSError


class DenseAllreduceThread:
    """Allreduces each training step's dense gradients on a background thread, in step order;
    the thread that trains applies the reduced gradients (``apply_ready``) right before its
    next TF step.

    Why a thread: Horovod performs an allreduce on its own background thread at its next
    negotiation cycle, so a dense step that waited for it would stall the main thread. Handed
    over right after the TF step, the allreduce runs while the main thread pushes and pulls
    rows. Why the update stays in the training thread: TF here runs graphs on one inter-op
    thread, so an update issued from another thread waits behind the whole next TF step (the
    update then lagged a step and the queue of pending steps filled up).

    ``apply_ready(need)`` applies, in order, every reduced step not applied yet, waiting
    until the dense updates of every step < ``need`` are in: BSP and SSP pass ``need = step``
    (minus SSP's ``dense_staleness``), so the TF step sees exactly the weights a synchronous
    dense step would give; ASP passes ``step - max_inflight``.

    Args:
        dense: the DenseSync (``reduce`` here, ``apply_local`` in the training thread).
        first_step: the step of the first gradients to be submitted.
        max_pending: how many submitted steps may wait to be applied; ``submit`` blocks beyond it.
    """

    def __init__(self, dense, first_step, max_pending):
        self.dense = dense
        self.applied = first_step          # the updates of every step < applied are applied
        self.submitted_through = first_step   # gradients of every step < this were submitted
        self.max_pending = max(1, int(max_pending))
        self.submitted = collections.deque()   # gradients waiting for their allreduce
        self.reduced = collections.deque()     # reduced gradients waiting to be applied
        self.cond = threading.Condition()
        self.error = None
        self.closing = False
        self.lag_counts = collections.Counter()   # dense lag of each TF step -> number of steps
        self.thread = threading.Thread(target=self._loop, name="hybridps-dense", daemon=True)
        self.thread.start()

    def submit(self, grads):
        """Queue one step's dense gradients (this rank's share of the global mean loss)."""
        while True:
            self._apply_reduced()            # make room with what is already reduced
            with self.cond:
                self._raise_if_failed()
                if len(self.submitted) + len(self.reduced) < self.max_pending:
                    self.submitted.append(list(grads))
                    self.submitted_through += 1
                    self.cond.notify_all()
                    return
                if not self.reduced:
                    self.cond.wait(0.1)

    def apply_ready(self, need):
        """Apply every reduced step in order; block until the updates of steps < ``need`` are
        applied."""
        while True:
            self._apply_reduced()
            with self.cond:
                self._raise_if_failed()
                if self.applied >= need:
                    return
                if not self.reduced:
                    with exchange_trace.traced("dense_wait"):     # exchange traces (benchmarks)
                        self.cond.wait(0.1)

    def record_lag(self, step):
        """Count how many of the latest steps' dense updates the TF step ``step`` misses (0: it
        sees every update of steps < step). Call it right before that TF step."""
        with self.cond:
            self.lag_counts[max(step - self.applied, 0)] += 1

    def lag_summary(self):
        """[max lag, sum of lags, steps counted] of the recorded TF steps."""
        with self.cond:
            counts = dict(self.lag_counts)
        return [max(counts, default=0), sum(lag * n for lag, n in counts.items()),
                sum(counts.values())]

    def close(self):
        """Apply every submitted step (the end of training), then end the thread (re-raises
        its failure, if any)."""
        self.apply_ready(self.submitted_through)
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        while self.thread.is_alive():
            self.thread.join(0.1)
        with self.cond:
            self._raise_if_failed()

    def _apply_reduced(self):
        # Only the training thread applies, so the order is the submission order; the lock is
        # not held while TF runs the update.
        while True:
            with self.cond:
                if not self.reduced:
                    return
                grads = self.reduced.popleft()
            self.dense.apply_local(grads)
            with self.cond:
                self.applied += 1
                self.cond.notify_all()

    def _raise_if_failed(self):
        if self.error is not None:
            raise HybridPSError(f"the dense allreduce thread failed: {type(self.error).__name__}: "
                                f"{self.error}") from self.error

    def _loop(self):
        try:
            while True:
                with self.cond:
                    while not self.submitted and not self.closing:
                        self.cond.wait()
                    if not self.submitted:
                        return
                    grads = self.submitted[0]
                reduced = self.dense.reduce(grads)
                with self.cond:
                    self.submitted.popleft()
                    self.reduced.append(reduced)
                    self.cond.notify_all()
        except BaseException as exc:   # noqa: B902 - handed to the waiting thread, which raises it
            with self.cond:
                self.error = exc
                self.cond.notify_all()
