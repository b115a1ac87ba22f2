"""BSP on the collective path: every step pulls, computes, then pushes and waits.

Reads at step t see every update of steps < t of all ranks: the push of step t-1 (an
alltoallv, so it completes only when every rank has sent its gradients) and the owners'
optimizer updates happen before any rank's pull of step t is served, because a rank serves
that pull only after finishing its own push and apply.
"""


class BSPCollectiveBackend:
    """Synchronous sparse exchange + synchronous Horovod allreduce."""

    def __init__(self, comm, sharded, dense):
        self.comm = comm
        self.sharded = sharded
        self.dense = dense

    def start(self, batches, start_step=0, fence_steps=()):
        self.dense.broadcast_initial()
        self.batches = batches

    def at_consistent_point(self, step, action):
        """BSP is consistent after every step: run the checkpoint or delta action now."""
        action()

    def pull(self, step):
        batch = next(self.batches)
        plan, rows = self.sharded.pull(batch.keys, step)
        return batch, plan, rows

    def push(self, plan, unique_row_grads, step):
        self.sharded.push(plan, unique_row_grads, step)

    def dense_step(self, grads, step):
        self.dense.step(grads)

    def stats(self):
        return {"bytes_sent": self.sharded.bytes_sent, "bytes_received": self.sharded.bytes_received,
                "table_rows": self.sharded.table_sizes()}

    def finish(self):
        pass
