"""BSP on the collective path: every step pulls, computes, then pushes and waits.

Reads at step t see every update of steps < t of all ranks: the push of step t-1 (an
alltoallv, so it completes only when every rank has sent its gradients) and the owners'
optimizer updates happen before any rank's pull of step t is served, because a rank serves
that pull only after finishing its own push and apply.

The dense allreduce of step t runs on a background thread (hybridps.dense.DenseAllreduceThread)
while the main thread pushes the rows of step t and pulls those of step t + 1; ``pull`` then
applies the reduced gradients before it returns, so the TF step of t + 1 sees exactly the
weights a synchronous dense step would have given it.
"""
from hybridps.dense import DenseAllreduceThread


class BSPCollectiveBackend:
    """Synchronous sparse exchange + Horovod allreduce overlapped with it."""

    def __init__(self, comm, sharded, dense):
        self.comm = comm
        self.sharded = sharded
        self.dense = dense
        self.dense_thread = None

    def start(self, batches, start_step=0, fence_steps=()):
        self.dense.broadcast_initial()
        self.batches = batches
        self.dense_thread = DenseAllreduceThread(self.dense, start_step, max_pending=1)

    def at_consistent_point(self, step, action):
        """BSP is consistent after every step: run the checkpoint or delta action once the
        dense update of step - 1 is applied."""
        self.dense_thread.apply_ready(need=step)
        action()

    def pull(self, step):
        batch = next(self.batches)
        plan, rows = self.sharded.pull(batch.keys, step)
        self.dense_thread.apply_ready(need=step)
        self.dense_thread.record_lag(step)
        return batch, plan, rows

    def push(self, plan, unique_row_grads, step):
        self.sharded.push(plan, unique_row_grads, step)

    def dense_step(self, grads, step):
        self.dense_thread.submit(grads)

    def stats(self):
        return {"bytes_sent": self.sharded.bytes_sent, "bytes_received": self.sharded.bytes_received,
                "table_rows": self.sharded.table_sizes(), "dense_lag": self.dense_thread.lag_summary()}

    def finish(self):
        """Wait until the last dense update is applied."""
        if self.dense_thread is not None:
            self.dense_thread.close()
