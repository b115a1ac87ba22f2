"""CollectiveExchange: every table sharded over all ranks, one fused alltoallv per direction.

Pull (data-parallel -> model-parallel -> data-parallel), docs/design.md, One step:
  1. ``plan_batch``: per table, the unique keys of the batch's keys of that table (its
     single-valued columns and its list features); all tables' unique keys bucketed by (owner
     rank, table) and kept in that order (the send order);
  2. counts exchanged (Alltoall), then keys (Alltoallv): one exchange for all tables;
  3. each owner looks the received keys up, inserting new ones (``OwnerShard.lookup``);
  4. rows go back along the same plan (Alltoallv of a flat float32 buffer, each table's rows at
     its own dim), then are moved into the TF step's order (dim group, table, owner) by a block
     permutation when the two orders differ.
Push: the TF step's gradients of the unique rows (summed per key by TF) go back into send order
and along the same plan (Alltoallv) to the owners, which apply each table's optimizer once per
key (``OwnerShard.apply``). Keys are not resent: the pull's PulledBatch (hybridps.sparse.plan)
carries the sender's ExchangePlan and the owner's ReceivedKeys until the push.
"""
import numpy as np

from hybridps._kernels import permute_blocks
from hybridps.sparse.plan import PulledBatch, plan_batch
from hybridps.sparse.shard import OwnerShard


class ExchangeCounters:
    """What a rank's exchange moved in training steps (evaluation's reads are not counted):
    bytes sent and received, keys sent to owners and keys received as an owner, row gradients
    pushed. Counted at the push, so they cover exactly the steps whose gradients went out."""
    __slots__ = ("bytes_sent", "bytes_received", "keys_sent", "keys_received", "row_grads_pushed")

    def __init__(self):
        self.bytes_sent = self.bytes_received = 0
        self.keys_sent = self.keys_received = self.row_grads_pushed = 0

    def add_bytes(self, sent, received):
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)


class ReceivedKeys:
    """The owner's side of one step, built once its keys have arrived.

    Attributes:
        counts: (W, T) keys of table t received from rank r.
        keys: the received keys, grouped by source, then table.
        blocks: per table, its [key start, key stop, element start) blocks of the receive
            buffers (OwnerShard.blocks).
    """
    __slots__ = ("counts", "keys", "blocks")

    def __init__(self, counts, keys, blocks):
        self.counts = counts
        self.keys = keys
        self.blocks = blocks


class CollectiveExchange:
    """Pull and push of a step's rows over all ranks.

    Args:
        comm: hybridps.comm.Comm (rank, size, alltoallv).
        layout: hybridps.sparse.layout.SparseLayout.
        shard: the OwnerShard of this rank.
        num_buckets: the model's virtual buckets.
        poll_interval: None: blocking collectives (BSP, on the training thread). Seconds:
            non-blocking collectives tested at this interval (the SSP/ASP communication thread,
            see hybridps.comm). Evaluation's :meth:`read` always blocks.
    """

    def __init__(self, comm, layout, shard, num_buckets, poll_interval=None):
        self.comm = comm
        self.layout = layout
        self.shard = shard
        self.num_buckets = num_buckets
        self.poll_interval = poll_interval
        self.counters = ExchangeCounters()

    # ------------------------------------------------------------------ pull
    def _send_keys(self, batch, poll_interval):
        """Unique and route a batch's keys and send them to their owners: (ExchangePlan,
        ReceivedKeys)."""
        plan = plan_batch(self.layout, batch, self.comm.size, self.num_buckets)
        counts = self.comm.alltoall_counts(plan.send_counts, poll_interval)
        keys = self.comm.alltoallv(plan.unique_keys, plan.send_counts.sum(1), counts.sum(1),
                                   poll_interval=poll_interval)
        return plan, ReceivedKeys(counts, keys, self.shard.blocks(counts))

    def _rows_back(self, plan, served, served_elements, poll_interval):
        """The served rows (``served_elements`` to each rank) back to the ranks that asked,
        in the TF step's order."""
        rows = self.comm.alltoallv(served, served_elements,
                                   OwnerShard.elements(plan.send_counts, self.shard.dims),
                                   poll_interval=poll_interval)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            rows = permute_blocks(rows, send_offsets, tf_offsets, sizes)
        return rows

    def pull(self, batch, step):
        """The PulledBatch of a training step: the owners look the keys up, inserting new ones
        and measuring the staleness of every read."""
        plan, received = self._send_keys(batch, self.poll_interval)
        served_elements = OwnerShard.elements(received.counts, self.shard.dims)
        served = self.shard.lookup(received.keys, received.blocks, step, int(served_elements.sum()))
        rows = self._rows_back(plan, served, served_elements, self.poll_interval)
        self.counters.add_bytes(plan.unique_keys.nbytes + served.nbytes, received.keys.nbytes + rows.nbytes)
        return PulledBatch(batch, rows, plan, received)

    def read(self, batch):
        """The PulledBatch of evaluation and prediction: the owners read their rows without
        inserting, admitting or measuring anything (keys they do not hold read zeros), over
        blocking collectives on the calling thread; nothing is counted (evaluation traffic is
        not training traffic)."""
        plan, received = self._send_keys(batch, None)
        served_elements = OwnerShard.elements(received.counts, self.shard.dims)
        served = self.shard.read(received.keys, received.blocks, int(served_elements.sum()))
        return PulledBatch(batch, self._rows_back(plan, served, served_elements, None), plan, received)

    # ------------------------------------------------------------------ push
    def push(self, pulled, row_grads, step):
        """Row gradients (flat float32, the TF step's order) of a PulledBatch back to the
        owners, which apply their optimizer once per key; then each table's eviction policy
        runs."""
        plan, received = pulled.plan, pulled.received
        grads = np.ascontiguousarray(row_grads, dtype=np.float32).reshape(-1)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            grads = permute_blocks(grads, tf_offsets, send_offsets, sizes)
        dims = self.shard.dims
        arrived = self.comm.alltoallv(grads, OwnerShard.elements(plan.send_counts, dims),
                                      OwnerShard.elements(received.counts, dims),
                                      poll_interval=self.poll_interval)
        counters, keys_sent = self.counters, len(plan.unique_keys)
        counters.add_bytes(grads.nbytes, arrived.nbytes)
        counters.keys_sent += keys_sent
        counters.keys_received += len(received.keys)
        counters.row_grads_pushed += keys_sent
        self.shard.apply([(received.keys, arrived, received.blocks)], step)
        self.shard.applied_through = max(self.shard.applied_through, step)
