"""CollectiveExchange: every table sharded over all ranks, one fused alltoallv per direction.

Pull (data-parallel -> model-parallel -> data-parallel), docs/design.md, One step:
  1. ``plan_batch``: per table, ``unique_inverse`` of the batch's keys of that table (its
     single-valued columns and its list features); all tables' unique keys bucketed by (owner
     rank, table) and kept in that order (the send order);
  2. counts exchanged (Alltoall), then keys (Alltoallv): one exchange for all tables;
  3. each owner looks the received keys up, inserting new ones (``OwnerShard.lookup``);
  4. rows go back along the same plan (Alltoallv of a flat float32 buffer, each table's rows at
     its own dim), then are moved into the TF step's order (dim group, table, owner) by a block
     permutation when the two orders differ.
Push: the TF step's gradients of the unique rows (summed per key by TF) go back into send order
and along the same plan (Alltoallv) to the owners, which apply each table's optimizer once per
key (``OwnerShard.apply``). Keys are not resent: the plan from the pull is kept until the push.
"""
import numpy as np

from hybridps._kernels import permute_blocks
from hybridps.sparse.plan import plan_batch
from hybridps.sparse.shard import OwnerShard


class CollectiveExchange:
    """Pull and push of a step's rows over all ranks.

    Args:
        comm: hybridps.comm.Comm (rank, size, alltoallv).
        layout: hybridps.sparse.layout.SparseLayout.
        shard: the OwnerShard of this rank.
        num_buckets: the model's virtual buckets.
    """

    def __init__(self, comm, layout, shard, num_buckets):
        self.comm = comm
        self.layout = layout
        self.shard = shard
        self.num_buckets = num_buckets
        self.bytes_sent = 0
        self.bytes_received = 0
        self.row_grads_pushed = 0
        # None: blocking collectives (BSP, main thread). Seconds: non-blocking collectives
        # tested at this interval (the SSP/ASP communication thread, see hybridps.comm).
        self.poll_interval = None

    # ------------------------------------------------------------------ pull
    def plan(self, batch, step):
        """Unique, route and exchange a batch's keys; returns the ExchangePlan."""
        plan = plan_batch(self.layout, batch, self.comm.size, self.num_buckets, step)
        plan.recv_counts = self.comm.alltoall_counts(plan.send_counts, self.poll_interval)
        plan.recv_keys = self.comm.alltoallv(plan.unique_keys, plan.send_counts.sum(1),
                                             plan.recv_counts.sum(1), poll_interval=self.poll_interval)
        plan.recv_blocks = self.shard.blocks(plan.recv_counts)
        self._count_bytes(plan.send_counts.sum() * 8, plan.recv_counts.sum() * 8)
        return plan

    def pull(self, batch, step, read_only=False):
        """Rows of a batch's unique keys: (plan, flat float32 rows in the TF step's order).

        ``read_only``: the owners read their rows without inserting, admitting or measuring
        anything (keys they do not hold read zeros): evaluation and prediction.
        """
        plan = self.plan(batch, step)
        dims = self.shard.dims
        served_elements = OwnerShard.elements(plan.recv_counts, dims)
        wanted_elements = OwnerShard.elements(plan.send_counts, dims)
        if read_only:
            served = self.shard.read(plan.recv_keys, plan.recv_blocks, int(served_elements.sum()))
        else:
            served = self.shard.lookup(plan.recv_keys, plan.recv_blocks, step, int(served_elements.sum()))
        rows = self.comm.alltoallv(served, served_elements, wanted_elements,
                                   poll_interval=self.poll_interval)
        self._count_bytes(served.nbytes, rows.nbytes)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            rows = permute_blocks(rows, send_offsets, tf_offsets, sizes)
        return plan, rows

    # ------------------------------------------------------------------ push
    def push(self, plan, row_grads, step):
        """Row gradients (flat float32, the TF step's order) back to the owners, which apply
        their optimizer once per key; then each table's eviction policy runs."""
        grads = np.ascontiguousarray(row_grads, dtype=np.float32).reshape(-1)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            grads = permute_blocks(grads, tf_offsets, send_offsets, sizes)
        dims = self.shard.dims
        received = self.comm.alltoallv(grads, OwnerShard.elements(plan.send_counts, dims),
                                       OwnerShard.elements(plan.recv_counts, dims),
                                       poll_interval=self.poll_interval)
        self._count_bytes(grads.nbytes, received.nbytes)
        self.row_grads_pushed += plan.keys_sent
        self.shard.apply([(plan.recv_keys, received, plan.recv_blocks)], step)
        self.shard.applied_through = max(self.shard.applied_through, step)

    def _count_bytes(self, sent, received):
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
