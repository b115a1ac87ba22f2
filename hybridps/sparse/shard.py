"""OwnerShard: the rows this rank owns of every table, served and updated in place.

What lives here: the owner side of a step, shared by collective owners and PS servers alike:
look up (inserting new keys) the keys other ranks sent, apply their row gradients (once per key
per call: duplicates from several senders are summed first), evict by each table's policy, and
measure the staleness of every read. Tables never import mpi4py: moving keys, rows and
gradients between ranks belongs to hybridps.sparse.exchange (collective) and
hybridps.backends.ps (servers).

Buffers. Keys arrive grouped by sender, then table, with a (senders, tables) count matrix; rows
and gradients travel as one flat float32 buffer in the same order, each table's rows at its own
dim, with no padding to the widest one. :meth:`OwnerShard.blocks` turns the counts into each
table's [key start, key stop, element start) blocks, which lookups and updates use as slices
in place (no gather, no scatter).

Staleness. ``applied_through`` is the last step whose push this shard has applied; every row it
holds is current through that step. A read at step t of a row with version v (the step of its
last update) is stale by ``t - 1 - max(v, applied_through)`` steps (0 under BSP), counted in
``staleness_histogram`` (the last bin holds everything beyond it), and the worst read of each
step in ``staleness_max_by_step``, a bounded hybridps.metrics.accumulate.StepSeries (every step
of a run of up to CURVE_POINTS steps, the maximum per block of consecutive steps beyond), so
neither grows with the step count.
"""
import numpy as np

from hybridps._kernels import count_staleness
from hybridps.metrics.accumulate import StepSeries
from hybridps.sparse.table import make_table

STALENESS_BINS = 256
# Every table's counters, in the order metrics and checkpoints list them.
TABLE_COUNTERS = ("admitted_keys", "refused_inserts", "evicted_rows", "dropped_unadmitted_grads",
                  "dropped_missing_grads", "skipped_nonfinite_grads", "applied_row_updates")


class OwnerShard:
    """This rank's shard of every table of a schema.

    Args:
        schema: hybridps.schema.FeatureSchema (tables in order: dims, optimizers, policies).
        seed: the run's seed (key-seeded initial rows).
        nonfinite: "raise" or "skip" for NaN/Inf row gradients.
        adam_catch_up: Adam tables apply the steps a row skipped when it is next updated.
    """

    def __init__(self, schema, seed, nonfinite="raise", adam_catch_up=False):
        self.tables = [make_table(table, t, seed, nonfinite, adam_catch_up=adam_catch_up)
                       for t, table in enumerate(schema.tables)]
        self.dims = np.array([t.dim for t in schema.tables], dtype=np.int64)
        self.policies = [table.policy() for table in schema.tables]
        self.applied_through = -1
        self.staleness_histogram = np.zeros(STALENESS_BINS, dtype=np.int64)
        self.staleness_max_by_step = StepSeries(combine=max)
        self.row_grads_applied = 0

    # ------------------------------------------------------------------ buffers
    def blocks(self, counts):
        """Per table, the [key start, key stop, element start) blocks of buffers grouped by
        sender, then table, with ``counts`` (senders, tables) keys; empty blocks dropped,
        adjacent ones merged (one table: always one block)."""
        counts = np.asarray(counts, dtype=np.int64)
        flat = counts.ravel()
        key_starts = np.concatenate([[0], np.cumsum(flat)]).tolist()
        elements = (counts * self.dims[np.newaxis, :]).ravel()
        elem_starts = np.concatenate([[0], np.cumsum(elements)]).tolist()
        senders, tables = counts.shape
        out = []
        for t in range(tables):
            table_blocks = []
            for s in range(senders):
                b = s * tables + t
                k0, k1, e0 = key_starts[b], key_starts[b + 1], elem_starts[b]
                if k1 == k0:
                    continue
                if table_blocks and table_blocks[-1][1] == k0:
                    table_blocks[-1] = (table_blocks[-1][0], k1, table_blocks[-1][2])
                else:
                    table_blocks.append((k0, k1, e0))
            out.append(table_blocks)
        return out

    @staticmethod
    def elements(counts, dims):
        """Flat float32 elements per sender of a (senders, tables) count matrix."""
        return (np.asarray(counts, dtype=np.int64) * np.asarray(dims, dtype=np.int64)[None, :]).sum(axis=1)

    # ------------------------------------------------------------------ owner side of a step
    def lookup(self, keys, blocks, step, num_elements):
        """Rows of ``keys`` (inserting keys not held yet), as one flat float32 buffer in the
        order of ``keys``; records the staleness of every read at ``step``."""
        served = np.empty(num_elements, dtype=np.float32)
        versions = np.empty(len(keys), dtype=np.int64)
        for table, dim, table_blocks in zip(self.tables, self.dims, blocks):
            for k0, k1, e0 in table_blocks:
                out = served[e0:e0 + (k1 - k0) * dim].reshape(k1 - k0, dim)
                table.lookup_or_insert(keys[k0:k1], out=out, step=step, versions=versions[k0:k1])
        self.record_staleness(step, versions)
        return served

    def read(self, keys, blocks, num_elements):
        """Rows of ``keys`` as :meth:`lookup` gives them, but read only: keys the shard does not
        hold (or has not admitted) read zeros, nothing is inserted, counted or measured (the
        read of evaluation and prediction)."""
        served = np.empty(num_elements, dtype=np.float32)
        for table, dim, table_blocks in zip(self.tables, self.dims, blocks):
            for k0, k1, e0 in table_blocks:
                table.read(keys[k0:k1], out=served[e0:e0 + (k1 - k0) * dim].reshape(k1 - k0, dim))
        return served

    def apply(self, pushes, step):
        """Apply row gradients: ``pushes`` is a list of (keys, flat grads, blocks); per table one
        optimizer call, so a key in several pushes (or from several senders) is updated once
        with its summed gradient (BSP semantics). Then evicts by policy."""
        for t, (table, dim) in enumerate(zip(self.tables, self.dims)):
            key_parts, grad_parts = [], []
            for keys, grads, blocks in pushes:
                for k0, k1, e0 in blocks[t]:
                    key_parts.append(keys[k0:k1])
                    grad_parts.append(grads[e0:e0 + (k1 - k0) * dim].reshape(k1 - k0, dim))
                    self.row_grads_applied += k1 - k0
            if len(key_parts) == 1:
                table.apply_gradients(key_parts[0], grad_parts[0], step=step)
            elif key_parts:
                table.apply_gradients(np.concatenate(key_parts), np.concatenate(grad_parts), step=step)
        self.evict(step)

    def evict(self, step):
        """Each table's eviction policy after the updates of ``step`` (counted per table in
        ``evicted_rows``): rows not updated for ``ttl_steps`` steps (checked every
        max(1, ttl_steps // 4) steps), then, above ``max_rows`` rows, the least frequently
        (lfu) or least recently updated (lru) rows down to ``max_rows``. Runs in the thread
        that owns the tables (main thread under BSP, exchange thread under SSP/ASP, server)."""
        for table, policy in zip(self.tables, self.policies):
            ttl, max_rows = policy["ttl_steps"], policy["max_rows"]
            if ttl and step % max(1, ttl // 4) == 0:
                table.evict_stale(step, ttl)
            if max_rows and table.size > max_rows:
                table.evict_to_budget(max_rows, policy["eviction"])

    def record_staleness(self, step, versions):
        # New rows (version == step) and rows with no earlier update are fully current; the
        # kernel adds each read's staleness to the histogram (last bin: >= STALENESS_BINS - 1).
        if len(versions):
            worst = count_staleness(versions, step, self.applied_through, self.staleness_histogram)
            self.staleness_max_by_step.add(step, worst)

    # ------------------------------------------------------------------ reporting
    def table_sizes(self):
        """Rows held by this rank, per table."""
        return [t.size for t in self.tables]

    def counters(self):
        """Per table, its TABLE_COUNTERS."""
        return [{name: int(t.counters()[name]) for name in TABLE_COUNTERS} for t in self.tables]

