"""BSP on the collective path: every step pulls, computes, then pushes and waits.

Reads at step t see every update of steps < t of all ranks: the push of step t-1 (an
alltoallv, so it completes only when every rank has sent its gradients) and the owners'
optimizer updates happen before any rank's pull of step t is served, because a rank serves
that pull only after finishing its own push and apply.

The dense allreduce of step t runs on a background thread (hybridps.dense.DenseAllreduceThread)
while the training thread pushes the rows of step t and pulls those of step t + 1; ``pull``
then applies the reduced gradients before it returns, so the TF step of t + 1 sees exactly the
weights a synchronous dense step would have given it.
"""
from hybridps.backends.base import Backend, BackendState, shard_stats
from hybridps.dense.thread import DenseAllreduceThread


class CollectiveBackend(Backend):
    """What the collective strategies share: the exchange, the dense path, the state."""

    def __init__(self, comm, exchange, dense, model):
        self.comm = comm
        self.exchange = exchange
        self.shard = exchange.shard
        self.dense = dense
        self.model = model
        self.batches = None          # this rank's batches, from ``start``
        self.dense_thread = None     # the dense allreduces, from ``start`` (its first step)
        self.compute_rank, self.compute_ranks = comm.rank, comm.size

    def stats(self):
        lag = self.dense_thread.lag_summary() if self.dense_thread is not None else None
        return shard_stats(self.shard, self.exchange.counters, dense_lag=lag)

    def state(self):
        return BackendState(tables=self.shard.tables, shard=(self.comm.rank, self.comm.size),
                            model=self.model, dense_optimizer=self.dense.optimizer)

    def restore_target(self):
        return self.state()

    def load_state(self, step):
        # the checkpoint holds every update of the steps before ``step``
        self.shard.applied_through = step - 1

    def read(self, batch):
        # blocking collectives on the calling thread: at a consistent point the exchange
        # thread of SSP/ASP waits at its fence, so the calls cannot interleave with its own
        return self.exchange.read(batch)


class BSPBackend(CollectiveBackend):
    """Synchronous sparse exchange + Horovod allreduce overlapped with it."""

    def start(self, batches, start_step=0, fence_steps=()):
        self.dense.broadcast_initial()
        self.batches = batches
        self.dense_thread = DenseAllreduceThread(self.dense, start_step, max_pending=1)

    def at_consistent_point(self, step, action):
        """BSP is consistent after every step: run the checkpoint or delta action once the
        dense update of step - 1 is applied."""
        self.dense_thread.apply_ready(need=step)
        action()

    def at_idle_point(self, step, action):
        """Called within ``pull(step)`` (the training thread draws the batches): every push of
        the steps < step is done; once the dense update of step - 1 is applied, run action."""
        self.at_consistent_point(step, action)

    def pull(self, step):
        """This step's PulledBatch, or None when the batches ended before it."""
        batch = next(self.batches, None)
        if batch is None:
            return None
        pulled = self.exchange.pull(batch, step)
        self.dense_thread.apply_ready(need=step)
        self.dense_thread.record_lag(step)
        return pulled

    def push(self, pulled, row_grads, step):
        self.exchange.push(pulled, row_grads, step)

    def label_counts(self, counts):
        """The exact counts over every rank (an allreduce of T numbers on the training
        thread, as the exchange's own collectives): BSP on N ranks equals one rank."""
        return self.comm.allreduce_sum(counts)

    def dense_step(self, grads, step):
        self.dense_thread.submit(grads)

    def finish(self):
        """Wait until the last dense update is applied."""
        if self.dense_thread is not None:
            self.dense_thread.close()
