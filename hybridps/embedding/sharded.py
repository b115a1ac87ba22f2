"""ShardedEmbedding: every table partitioned over the ranks, one fused exchange per step.

Pull (data-parallel -> model-parallel -> data-parallel), DESIGN.md section 3:
  1. per table, ``unique_inverse`` of the batch's keys of that table's fields;
  2. all tables' unique keys bucketed by (owner rank, table) and kept in that order (the send
     order), with the batch's inverse index pointing into it;
  3. counts exchanged (Alltoall), then keys (Alltoallv): one exchange for all tables;
  4. each owner looks the received keys up (inserting new ones), one call per table;
  5. rows go back along the same plan (Alltoallv); in send order they already are the step's
     unique-row array the TF step gathers from.
Push (row gradients, summed per unique key by the TF step) retraces the plan: the gradients are
in send order already -> Alltoallv -> owner, where each table applies its optimizer once per key
(the same key arriving from several ranks is summed inside ``apply_gradients``). Keys are not
resent: the plan from the pull is kept until the push. Because the unique keys are kept in send
order, no step permutes rows or gradients (two 1.8 MB copies per step for DeepFM at 4096).
"""
from dataclasses import dataclass

import numpy as np

from hybridps.config import check_table_settings, table_policy
from hybridps._kernels import count_staleness
from hybridps.embedding.routing import bucket_by_owner, unique_inverse
from hybridps.embedding.table import make_table

STALENESS_BINS = 256   # observed staleness above 255 steps is counted in the last bin


@dataclass
class ExchangePlan:
    """What a pull decided and a push reuses: who sends which unique key where.

    Attributes:
        unique_keys: all tables' unique keys of this rank's batch (U,), in send order: grouped
            by owner rank, then by table (``route_unique_keys``).
        inverse: (B, F) int32 index of each (sample, field) key into ``unique_keys``.
        send_counts: (W, T) keys of table t sent to rank r.
        recv_counts: (W, T) keys of table t received from rank r.
        recv_keys: keys this rank owns and serves this step, grouped by source rank.
        recv_table_blocks: per table, the [start, stop) blocks of ``recv_keys`` holding that
            table's keys (one per source rank; adjacent blocks merged, so a single table is one
            block). Owners work on these slices in place: no gather or scatter copies.
        step: the step of the pull.
    """
    unique_keys: np.ndarray
    inverse: np.ndarray
    send_counts: np.ndarray
    recv_counts: np.ndarray
    recv_keys: np.ndarray
    recv_table_blocks: list
    step: int

    @property
    def keys_sent(self):
        return int(self.send_counts.sum())

    @property
    def keys_received(self):
        return int(self.recv_counts.sum())


class ShardedEmbedding:
    """The local shards of every embedding table, and the pull/push exchange over them.

    Args:
        comm: hybridps.comm.Comm (rank, size, alltoallv).
        config: TrainConfig (dim, optimizer, initializer, seed, min_count).
        field_groups: list of field-index lists, one per table.
    """

    def __init__(self, comm, config, field_groups):
        self.comm = comm
        self.dim = config.dim
        self.num_buckets = config.num_buckets
        check_table_settings(config, len(field_groups))
        self.policies = [table_policy(config, t) for t in range(len(field_groups))]
        self.field_groups = [np.asarray(g, dtype=np.int64) for g in field_groups]
        self.num_fields = sum(len(g) for g in field_groups)
        self.tables = [make_table(config, table_id=t) for t in range(len(field_groups))]
        self.bytes_sent = 0
        self.bytes_received = 0
        # Consistency bookkeeping (owner side). applied_through: the last step whose push this
        # rank has applied; every row it holds is current through that step (rows without a
        # gradient in a push had nothing to apply). Staleness of a read at step t is
        # t - 1 - max(row version, applied_through): the number of most recent steps whose
        # updates the read does not see (0 under BSP).
        self.applied_through = -1
        self.staleness_histogram = np.zeros(STALENESS_BINS, dtype=np.int64)
        self.staleness_max_by_step = {}
        self.row_grads_pushed = 0
        self.row_grads_applied = 0
        # None: blocking collectives (BSP, main thread). Seconds: non-blocking collectives
        # tested at this interval (the SSP/ASP communication thread, see hybridps.comm).
        self.poll_interval = None

    # ------------------------------------------------------------------ pull
    def plan(self, keys, step):
        """Unique, route and exchange the keys of a (B, F) batch; returns the ExchangePlan."""
        unique_keys, inverse, send_counts = route_unique_keys(keys, self.field_groups, self.comm.size,
                                                              self.num_buckets)
        recv_counts = self.comm.alltoall_counts(send_counts, self.poll_interval)
        recv_keys = self.comm.alltoallv(unique_keys, send_counts.sum(1), recv_counts.sum(1),
                                        poll_interval=self.poll_interval)
        self._count_bytes(send_counts.sum() * 8, recv_counts.sum() * 8)
        return ExchangePlan(unique_keys, inverse, send_counts, recv_counts, recv_keys,
                            _table_blocks(recv_counts), step)

    def pull(self, keys, step):
        """Rows of a (B, F) batch's unique keys: returns (plan, unique_rows (U, dim) float32)."""
        plan = self.plan(keys, step)
        served = np.empty((len(plan.recv_keys), self.dim), dtype=np.float32)
        versions = np.empty(len(plan.recv_keys), dtype=np.int64)
        for table, blocks in zip(self.tables, plan.recv_table_blocks):
            for start, stop in blocks:
                table.lookup_or_insert(plan.recv_keys[start:stop], out=served[start:stop], step=step,
                                       versions=versions[start:stop])
        self._record_staleness(step, versions)
        unique_rows = self.comm.alltoallv(served, plan.recv_counts.sum(1), plan.send_counts.sum(1),
                                          poll_interval=self.poll_interval)
        self._count_bytes(served.nbytes, unique_rows.nbytes)
        return plan, unique_rows

    # ------------------------------------------------------------------ push
    def push(self, plan, unique_row_grads, step):
        """Send row gradients (U, dim) back to the owners, who apply their optimizer once per key."""
        grads = np.ascontiguousarray(unique_row_grads, dtype=np.float32)   # in send order already
        received = self.comm.alltoallv(grads, plan.send_counts.sum(1), plan.recv_counts.sum(1),
                                       poll_interval=self.poll_interval)
        self._count_bytes(grads.nbytes, received.nbytes)
        for table, blocks in zip(self.tables, plan.recv_table_blocks):
            if len(blocks) == 1:         # one block (always so with one table): slices, no copies
                (start, stop), = blocks
                table.apply_gradients(plan.recv_keys[start:stop], received[start:stop], step=step)
            elif blocks:                 # one call per table: a key sent by several ranks is summed
                table.apply_gradients(                      # into one update (BSP semantics)
                    np.concatenate([plan.recv_keys[a:b] for a, b in blocks]),
                    np.concatenate([received[a:b] for a, b in blocks]), step=step)
        self.row_grads_pushed += len(grads)
        self.row_grads_applied += len(received)
        self.applied_through = max(self.applied_through, step)
        self.evict(step)

    def evict(self, step):
        """Apply each table's eviction policy after the updates of ``step`` (counted per table
        in ``evicted_rows``): rows not updated for ``ttl_steps`` steps (checked every
        max(1, ttl_steps // 4) steps), then, above ``max_rows`` rows, the least frequently
        (lfu) or least recently updated (lru) rows down to ``max_rows``. Runs in the thread
        that owns the tables (main thread under BSP, exchange thread under SSP/ASP, server)."""
        for table, policy in zip(self.tables, self.policies):
            ttl, max_rows = policy["ttl_steps"], policy["max_rows"]
            if ttl and step % max(1, ttl // 4) == 0:
                table.evict_stale(step, ttl)
            if max_rows and table.size > max_rows:
                table.evict_to_budget(max_rows, policy["eviction"])

    def _record_staleness(self, step, versions):
        # New rows (version == step) and rows with no earlier update are fully current; the
        # kernel adds each read's staleness to the histogram (last bin: >= STALENESS_BINS - 1).
        if len(versions):
            worst = count_staleness(versions, step, self.applied_through, self.staleness_histogram)
            self.staleness_max_by_step[step] = max(self.staleness_max_by_step.get(step, 0), worst)

    # ------------------------------------------------------------------ reporting
    def _count_bytes(self, sent, received):
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)

    def table_sizes(self):
        """Rows held by this rank, per table."""
        return [t.size for t in self.tables]

    def export_shards(self):
        """Every local table's export() (rows, slots, metadata), in table order."""
        return [t.export() for t in self.tables]


def route_unique_keys(keys, field_groups, num_owners, num_buckets):
    """A (B, F) batch's unique keys per table, in send order, and the batch's index into them.

    The keys are grouped by owner (``bucket_by_owner``: rank, or PS server), then by table: the
    alltoallv send buffer itself, and the order in which rows come back.

    Returns:
        (unique_keys (U,), inverse (B, F) int32 index into unique_keys, send_counts (owners, T)).
    """
    unique_keys, inverse, offsets = unique_by_table(keys, field_groups)
    send_order, send_counts = bucket_by_owner(unique_keys, offsets, num_owners, num_buckets)
    position = np.empty(len(send_order), dtype=np.int32)
    position[send_order] = np.arange(len(send_order), dtype=np.int32)
    return unique_keys[send_order], position[inverse], send_counts


def unique_by_table(keys, field_groups):
    """Each table's unique keys of a (B, F) batch, concatenated in table order.

    Returns:
        (unique_keys (U,), inverse (B, F) int32 index into unique_keys, table offsets (T + 1,)).
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    batch, num_fields = keys.shape
    if len(field_groups) == 1 and len(field_groups[0]) == num_fields and \
            np.array_equal(field_groups[0], np.arange(num_fields)):   # one table of every field
        uniq, inv = unique_inverse(keys.ravel())
        return uniq, inv.reshape(batch, num_fields), np.array([0, len(uniq)], dtype=np.int64)
    inverse = np.empty((batch, num_fields), dtype=np.int32)
    uniques, offsets = [], [0]
    for fields in field_groups:
        table_keys = keys[:, fields].ravel() if len(fields) < num_fields else keys.ravel()
        uniq, inv = unique_inverse(table_keys)
        inverse[:, fields] = (inv + offsets[-1]).reshape(batch, len(fields))
        uniques.append(uniq)
        offsets.append(offsets[-1] + len(uniq))
    unique_keys = np.concatenate(uniques) if len(uniques) > 1 else uniques[0]
    return unique_keys, inverse, np.asarray(offsets, dtype=np.int64)


def _table_blocks(recv_counts):
    """Per table, [start, stop) blocks of the receive buffer (grouped by source, then table)
    holding its keys; empty blocks dropped, adjacent ones merged."""
    world, num_tables = recv_counts.shape
    starts = np.concatenate([[0], np.cumsum(recv_counts.ravel())]).tolist()
    blocks = []
    for t in range(num_tables):
        table_blocks = []
        for r in range(world):
            start, stop = starts[r * num_tables + t], starts[r * num_tables + t + 1]
            if stop == start:
                continue
            if table_blocks and table_blocks[-1][1] == start:
                table_blocks[-1] = (table_blocks[-1][0], stop)
            else:
                table_blocks.append((start, stop))
        blocks.append(table_blocks)
    return blocks
