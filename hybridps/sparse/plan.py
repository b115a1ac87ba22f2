"""The per-step exchange plan: which unique key goes to which owner, and the TF step's indices.

What lives here: :func:`plan_batch` (unique per table over a jagged batch, routing to owners,
the TF step's index arrays), :class:`ExchangePlan`, which a pull makes and the push of the
same step reuses (keys are never resent), and :class:`PulledBatch`, the one object a step
passes from ``Backend.pull`` through the TF step to ``Backend.push``. What does not: moving
anything between ranks (hybridps.sparse.exchange, hybridps.backends.ps), tables
(hybridps.sparse.shard).

For each table t, the keys of its single-valued columns (batch-major) and of its list features
are uniqued together (first-occurrence order) and all tables' unique keys bucketed by (owner,
table) (a stable counting sort): that is the send order, the alltoallv buffer itself. One C
pass does both and gives every key's position in that buffer (``unique_route``). The TF step's indices point into the TF order of the
rows (hybridps.sparse.layout): one (B, k) int32 matrix per dim group for its single-valued
features, and (ids (N,), lengths (B,)) per list feature.
"""
import numpy as np

from hybridps._kernels import permute_blocks
from hybridps.sparse.routing import unique_route


class ExchangePlan:
    """What a pull decided and the push of the same step reuses (the sender's side), built
    whole by :func:`plan_batch` and never changed afterwards.

    Attributes:
        unique_keys: the step's unique keys of every table (U,), in send order: grouped by
            owner, then table.
        send_counts: (W, T) keys of table t sent to owner r.
        group_rows: int32 (G,) unique rows of each dim group (an input of the TF step).
        feature_inputs: the TF step's index arrays (hybridps.step, in the layout's order).
        permutation: (send offsets, TF offsets, sizes) in elements of the (owner, table)
            blocks, or None when the send order is the TF order.
    """
    __slots__ = ("unique_keys", "send_counts", "group_rows", "feature_inputs", "permutation")

    def __init__(self, unique_keys, send_counts, group_rows, feature_inputs, permutation):
        self.unique_keys = unique_keys
        self.send_counts = send_counts
        self.group_rows = group_rows
        self.feature_inputs = feature_inputs
        self.permutation = permutation


class PulledBatch:
    """One step's batch with the rows of its unique keys: what ``Backend.pull`` returns, the TF
    step takes as it is (hybridps.step) and ``Backend.push`` takes back with the row gradients.

    Attributes:
        batch: the step's hybridps.data.Batch (dense features, labels, keys).
        rows: the unique rows, flat float32 in the TF step's order (hybridps.sparse.layout).
        group_rows, feature_inputs: the TF step's other inputs (from the plan).
        plan: the step's ExchangePlan; ``received``: what the owners received (the collective
            exchange's ReceivedKeys; None where the owners keep it themselves, PS servers).
            Both belong to hybridps.sparse and hybridps.backends: nothing else reads them.
    """
    __slots__ = ("batch", "rows", "plan", "received")

    def __init__(self, batch, rows, plan, received=None):
        self.batch = batch
        self.rows = rows
        self.plan = plan
        self.received = received

    @property
    def group_rows(self):
        return self.plan.group_rows

    @property
    def feature_inputs(self):
        return self.plan.feature_inputs


def plan_batch(layout, batch, num_owners, num_buckets):
    """Unique and route one batch's keys; returns the ExchangePlan (no communication).

    Args:
        layout: hybridps.sparse.layout.SparseLayout of the run's schema.
        batch: hybridps.data.Batch.
        num_owners: ranks (collective) or servers (PS) the keys are partitioned over.
        num_buckets: the model's virtual buckets (hybridps.sparse.routing).
    """
    keys = batch.keys
    size = batch.size
    parts = []                     # each table's keys: its single-valued columns, its lists
    for t in range(layout.num_tables):
        columns = layout.single_columns[t]
        if t == layout.whole_keys_table:
            single = keys.reshape(-1)
        elif columns:
            single = keys[:, columns].reshape(-1)
        else:
            single = keys[:0, 0]
        lists = [batch.lists[name][0] for name in layout.list_features[t]]
        parts.append(np.concatenate([single] + lists) if lists else single)
    send_keys, send_counts, send_index = unique_route(parts, num_owners, num_buckets)
    permutation = layout.tf_permutation(send_counts)
    tf_of_send = _tf_rows_of_send(layout, send_counts, permutation)
    # each key's row in its dim group's rows (TF order)
    tf_index = send_index if tf_of_send is None else tf_of_send[send_index]
    starts = np.zeros(layout.num_tables + 1, dtype=np.int64)
    np.cumsum([len(part) for part in parts], out=starts[1:])

    feature_inputs = []
    for g, columns in enumerate(layout.group_columns):
        if not columns:
            continue
        if layout.whole_keys_table is not None and len(columns) == keys.shape[1]:
            first = starts[layout.whole_keys_table]
            matrix = tf_index[first:first + size * len(columns)].reshape(size, len(columns))
        else:
            matrix = np.empty((size, len(columns)), dtype=np.int32)
            for j, column in enumerate(columns):
                t = layout.column_table[column]
                k = len(layout.single_columns[t])
                c = layout.single_columns[t].index(column)
                matrix[:, j] = tf_index[starts[t] + c:starts[t] + size * k:k]
        feature_inputs.append(matrix)
    for name, t, _, _ in layout.list_specs:
        start = starts[t] + size * len(layout.single_columns[t])
        for other in layout.list_features[t]:
            if other == name:
                break
            start += len(batch.lists[other][0])
        values, lengths = batch.lists[name]
        feature_inputs.append(tf_index[start:start + len(values)])
        feature_inputs.append(np.ascontiguousarray(lengths, dtype=np.int32))
    return ExchangePlan(send_keys, send_counts, layout.group_rows(send_counts),
                        tuple(feature_inputs), permutation)


def pull_locally(layout, batch, num_buckets, rows_of_table):
    """The PulledBatch of ``batch`` with one owner and no tables to ask: the rows of table t's
    unique keys are ``rows_of_table(t, keys)`` (the compute-only ceiling of ``hybridps bench
    train``, which times the TF step alone)."""
    plan = plan_batch(layout, batch, 1, num_buckets)
    parts, start = [], 0           # one owner: the send order is table order
    for t, count in enumerate(plan.send_counts[0].tolist()):
        parts.append(np.ravel(rows_of_table(t, plan.unique_keys[start:start + count])))
        start += count
    rows = np.concatenate(parts).astype(np.float32)
    if plan.permutation is not None:
        rows = permute_blocks(rows, *plan.permutation)
    return PulledBatch(batch, rows, plan)


def _tf_rows_of_send(layout, counts, permutation):
    """Row of each send-order key in its dim group's rows (TF order), int32 (U,), or None
    when that row is the key's send position (one dim group in send order)."""
    world, tables = counts.shape
    per_table = counts.sum(axis=0)
    group_start_row = np.zeros(tables, dtype=np.int64)     # first row of each table's group
    row = 0
    for _, group_tables in layout.groups:
        for t in group_tables:
            group_start_row[t] = row
        row += int(per_table[group_tables].sum())
    total = int(per_table.sum())
    if permutation is None:
        if not group_start_row.any():
            return None
        shift = np.repeat(-group_start_row[np.newaxis, :].repeat(world, 0).ravel(), counts.ravel())
        return (np.arange(total, dtype=np.int64) + shift).astype(np.int32)
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
    return (np.arange(total, dtype=np.int64) + shift).astype(np.int32)
