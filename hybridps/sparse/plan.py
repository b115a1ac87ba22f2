"""The per-step exchange plan: which unique key goes to which owner, and the TF step's indices.

What lives here: :func:`plan_batch` (unique per table over a jagged batch, routing to owners,
the TF step's index arrays) and :class:`ExchangePlan`, which a pull makes and the push of the
same step reuses (keys are never resent). What does not: moving anything between ranks
(hybridps.sparse.exchange, hybridps.backends.ps), tables (hybridps.sparse.shard).

For each table t, the keys of its single-valued columns (batch-major) and of its list features
are uniqued together (``unique_inverse``, first-occurrence order); all tables' unique keys are
then bucketed by (owner, table) (``bucket_by_owner``, a stable counting sort): that is the
send order, the alltoallv buffer itself. The TF step's indices point into the TF order of the
rows (hybridps.sparse.layout): one (B, k) int32 matrix per dim group for its single-valued
features, and (ids (N,), lengths (B,)) per list feature.
"""
from dataclasses import dataclass

import numpy as np

from hybridps.sparse.routing import bucket_by_owner, unique_inverse


@dataclass
class ExchangePlan:
    """What a pull decided and a push reuses.

    Attributes:
        unique_keys: the step's unique keys of every table (U,), in send order: grouped by
            owner, then table.
        send_counts: (W, T) keys of table t sent to owner r.
        step_inputs: the TF step's index arrays (hybridps.step, in the layout's order).
        group_rows: int32 (G,) unique rows of each dim group.
        permutation: (send offsets, TF offsets, sizes) in elements of the (owner, table)
            blocks, or None when the send order is the TF order.
        step: the step of the pull.
        recv_counts, recv_keys, recv_blocks: the owner side, filled by the exchange: keys of
            table t received from rank r, the keys (grouped by source, then table), and per
            table its [key start, key stop, element start) blocks of the receive buffers.
    """
    unique_keys: np.ndarray
    send_counts: np.ndarray
    step_inputs: tuple
    group_rows: np.ndarray
    permutation: object
    step: int
    _position: np.ndarray = None
    _single_index: object = None
    recv_counts: np.ndarray = None
    recv_keys: np.ndarray = None
    recv_blocks: list = None

    @property
    def keys_sent(self):
        return int(self.send_counts.sum())

    @property
    def keys_received(self):
        return int(self.recv_counts.sum()) if self.recv_counts is not None else 0

    @property
    def inverse(self):
        """(B, S) int32 index of each single-valued (sample, feature) key into ``unique_keys``."""
        return self._position[self._single_index()]


def plan_batch(layout, batch, num_owners, num_buckets, step):
    """Unique and route one batch's keys; returns the ExchangePlan (no communication).

    Args:
        layout: hybridps.sparse.layout.SparseLayout of the run's schema.
        batch: hybridps.data.Batch.
        num_owners: ranks (collective) or servers (PS) the keys are partitioned over.
        num_buckets: the model's virtual buckets (hybridps.sparse.routing).
    """
    keys = batch.keys
    size = batch.size
    uniques, offsets, inverses = [], [0], []
    for t in range(layout.num_tables):
        columns = layout.single_columns[t]
        if t == layout.whole_keys_table:
            single = keys.reshape(-1)
        elif columns:
            single = keys[:, columns].reshape(-1)
        else:
            single = keys[:0, 0]
        parts = [single] + [batch.lists[name][0] for name in layout.list_features[t]]
        table_keys = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(single)
        uniq, inv = unique_inverse(table_keys)
        uniques.append(uniq)
        inverses.append(inv + np.int32(offsets[-1]) if offsets[-1] else inv)
        offsets.append(offsets[-1] + len(uniq))
    unique_concat = np.concatenate(uniques) if len(uniques) > 1 else uniques[0]
    send_order, send_counts = bucket_by_owner(unique_concat, np.asarray(offsets, dtype=np.int64),
                                              num_owners, num_buckets)
    total = len(send_order)
    position = np.empty(total, dtype=np.int32)
    position[send_order] = np.arange(total, dtype=np.int32)
    permutation = layout.tf_permutation(send_counts)
    tf_index = _tf_positions(layout, send_counts, permutation, position, total)

    step_inputs = []
    for g, columns in enumerate(layout.group_columns):
        if not columns:
            continue
        matrix = np.empty((size, len(columns)), dtype=np.int32)
        if layout.whole_keys_table is not None and len(columns) == keys.shape[1]:
            matrix = tf_index[inverses[layout.whole_keys_table][:size * len(columns)]].reshape(size, len(columns))
        else:
            for j, column in enumerate(columns):
                t = layout.column_table[column]
                k = len(layout.single_columns[t])
                c = layout.single_columns[t].index(column)
                matrix[:, j] = tf_index[inverses[t][c:size * k:k]]
        step_inputs.append(matrix)
    for name, t, _, _ in layout.list_specs:
        start = size * len(layout.single_columns[t])
        for other in layout.list_features[t]:
            if other == name:
                break
            start += len(batch.lists[other][0])
        values, lengths = batch.lists[name]
        step_inputs.append(tf_index[inverses[t][start:start + len(values)]])
        step_inputs.append(np.ascontiguousarray(lengths, dtype=np.int32))

    def single_index():
        out = np.empty(keys.shape, dtype=np.int64)
        for column, t in enumerate(layout.column_table):
            k = len(layout.single_columns[t])
            c = layout.single_columns[t].index(column)
            out[:, column] = inverses[t][c:size * k:k]
        return out

    return ExchangePlan(unique_keys=unique_concat[send_order], send_counts=send_counts,
                        step_inputs=tuple(step_inputs), group_rows=layout.group_rows(send_counts),
                        permutation=permutation, step=step, _position=position,
                        _single_index=single_index)


def _tf_positions(layout, counts, permutation, position, total):
    """Index of each table-concatenated unique key in its dim group's rows (TF order)."""
    world, tables = counts.shape
    per_table = counts.sum(axis=0)
    group_start_row = np.zeros(tables, dtype=np.int64)     # first row of each table's group
    row = 0
    for _, group_tables in layout.groups:
        for t in group_tables:
            group_start_row[t] = row
        row += int(per_table[group_tables].sum())
    if permutation is None:
        if not group_start_row.any():
            return position
        shift = np.repeat(-group_start_row[np.newaxis, :].repeat(world, 0).ravel(), counts.ravel())
        return (np.arange(total, dtype=np.int64) + shift).astype(np.int32)[position]
    send_rows = counts.ravel()
    send_start = np.zeros(len(send_rows), dtype=np.int64)
    np.cumsum(send_rows[:-1], out=send_start[1:])
    _, tf_offsets, _ = permutation
    dims = np.tile(np.asarray(layout.dims, dtype=np.int64), world)
    # the TF offsets are in elements; rows before a block in TF order, within its dim group:
    # the group's earlier rows are all of that group's dim
    group_start_elem = np.zeros(tables, dtype=np.int64)
    elem = 0
    for dim, group_tables in layout.groups:
        for t in group_tables:
            group_start_elem[t] = elem
        elem += int(per_table[group_tables].sum()) * dim
    tf_rows_in_group = (tf_offsets - np.tile(group_start_elem, world)) // dims
    shift = np.repeat(tf_rows_in_group - send_start, send_rows)
    return (np.arange(total, dtype=np.int64) + shift).astype(np.int32)[position]
