"""Dense path: Horovod allreduce of dense gradients and broadcast of initial dense weights.

What lives here: the dense optimizer (Keras), the initial broadcast from rank 0, the summing
allreduce followed by the update, compiled once as a tf.function (``DenseSync``), and the
background thread that runs the allreduces in order while the main thread does the sparse
exchange (``DenseAllreduceThread``). Embedding state never comes here: row gradients travel through
hybridps.embedding (alltoallv), so nothing of the sharded tables is ever allreduced or
broadcast.

Gradients are *summed* over ranks (not averaged): each rank's loss is its share of the mean
over the global batch (sum of its sample losses / global batch size), so the sum of the
ranks' gradients is exactly the gradient of the global mean loss.
"""
import collections
import threading

import tensorflow as tf

from hybridps import watchdog
from hybridps.errors import HybridPSError


def make_dense_optimizer(name, learning_rate):
    """A Keras optimizer with the same formulas and defaults as the sparse table optimizers."""
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adagrad":
        return tf.keras.optimizers.Adagrad(learning_rate=learning_rate,
                                           initial_accumulator_value=0.1, epsilon=1e-7)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-7)
    raise ValueError(f"unknown dense optimizer {name!r}")


class DenseSync:
    """Keeps a model's dense variables identical on every rank.

    Args:
        variables: the model's trainable variables (same order on every rank).
        optimizer_name, learning_rate: dense optimizer.
        world_size: number of ranks; with 1 rank no Horovod op is issued.
    """

    def __init__(self, variables, optimizer_name, learning_rate, world_size):
        self.variables = list(variables)
        self.world_size = world_size
        self.optimizer = make_dense_optimizer(optimizer_name, learning_rate)
        specs = [tf.TensorSpec(v.shape, v.dtype) for v in self.variables]
        self._apply = tf.function(self._apply_eager, input_signature=[specs])

    def broadcast_initial(self):
        """Overwrite every rank's dense weights with rank 0's."""
        if self.world_size > 1:
            import horovod.tensorflow as hvd
            hvd.broadcast_variables(self.variables, root_rank=0)

    def _apply_eager(self, grads):
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return grads

    def reduce(self, grads):
        """The ranks' dense gradients summed (Horovod allreduce; unchanged on one rank).

        The allreduce is issued eagerly and the update runs as a separate compiled tf.function.
        Putting both in one tf.function was measured 3x slower here (25 ms vs 8 ms per step for
        DeepFM's 143k dense parameters on 2 ranks): with one inter-op thread the graph executor
        idles while Horovod's asynchronous op completes on its background thread.
        """
        if self.world_size == 1:
            return list(grads)
        import horovod.tensorflow as hvd
        with watchdog.collective("dense_allreduce"):
            return hvd.grouped_allreduce(list(grads), op=hvd.Sum)

    def apply_local(self, grads):
        """Apply already-reduced gradients (no communication)."""
        return self._apply(list(grads))


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
                    with watchdog.traced("dense_wait"):     # exchange traces (benchmarks)
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
