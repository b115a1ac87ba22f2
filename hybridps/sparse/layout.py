"""SparseLayout: where each table's rows and each feature's ids sit in a step's buffers.

What lives here: the static facts the exchange plan, the owner shard and the TF step share,
derived once from the FeatureSchema: each table's dim, which columns of ``Batch.keys`` and which
list features read it, and the TF step's row order. What does not: per-step arrays
(hybridps.sparse.plan), MPI (hybridps.comm), TensorFlow (hybridps.step).

Two orders of a step's unique rows:

* send order: grouped by owner rank, then table (the alltoallv buffers; one contiguous block
  per (owner, table));
* TF order: grouped by *dim group* (tables of one dim, in table order), then table, then owner.
  The TF step splits the flat row buffer once per dim group, so all single-valued features of a
  dim gather from one (U_g, dim) tensor, however many tables they read.

Both orders consist of the same (owner, table) blocks, so moving rows between them is a block
permutation (``hybridps._kernels.permute_blocks``), and none at all when the two orders agree
(one table, or one rank with tables already in dim-group order).
"""
import numpy as np


class SparseLayout:
    """Static layout of a schema's sparse features and tables.

    Attributes:
        dims: each table's dim, in table order.
        groups: the dim groups, each ``(dim, [table indices])`` in first-appearance order.
        group_of_table: the dim group of each table.
        tf_tables: table indices in TF order (dim group, then table).
        single_columns: per table, the ``Batch.keys`` columns of its single-valued features.
        list_features: per table, the names of its list features (schema order).
        group_columns: per dim group, the ``Batch.keys`` columns of every single-valued feature
            of that dim, in schema order: the TF step's (B, k) index matrix of the group.
    """

    def __init__(self, schema):
        self.schema = schema
        self.num_tables = len(schema.tables)
        self.dims = [t.dim for t in schema.tables]
        groups = {}
        for t, dim in enumerate(self.dims):
            groups.setdefault(dim, []).append(t)
        self.groups = list(groups.items())
        self.group_of_table = [0] * self.num_tables
        for g, (_, tables) in enumerate(self.groups):
            for t in tables:
                self.group_of_table[t] = g
        self.tf_tables = [t for _, tables in self.groups for t in tables]
        singles = schema.single_features
        self.single_names = [f.name for f in singles]
        self.column_table = [schema.table_index(f.table) for f in singles]
        self.single_columns = [[c for c, t in enumerate(self.column_table) if t == table]
                               for table in range(self.num_tables)]
        self.list_specs = [(f.name, schema.table_index(f.table), f.pooling, f.max_len)
                           for f in schema.list_features]
        self.list_features = [[name for name, t, _, _ in self.list_specs if t == table]
                              for table in range(self.num_tables)]
        self.group_columns = [[c for c, t in enumerate(self.column_table)
                               if self.group_of_table[t] == g] for g in range(len(self.groups))]
        # the single-valued columns of a table are all of Batch.keys, in order: the batch's
        # keys need no gather to be uniqued (the Criteo preset's shared table)
        self.whole_keys_table = next(
            (t for t in range(self.num_tables)
             if self.single_columns[t] == list(range(len(singles))) and not self.list_features[t]),
            None)

    def block_elements(self, counts):
        """Elements (rows x dim) of each (owner, table) block of a (W, T) count matrix."""
        return np.asarray(counts, dtype=np.int64) * np.asarray(self.dims, dtype=np.int64)[None, :]

    def tf_permutation(self, counts):
        """(send offsets, TF offsets, sizes) in elements of every (owner, table) block of a
        step with ``counts`` (W, T) unique keys, or None when both orders agree."""
        elements = self.block_elements(counts)
        world, tables = elements.shape
        if tables == 1 or (world == 1 and self.tf_tables == list(range(tables))):
            return None
        sizes = elements.ravel()                                   # send order: (owner, table)
        send_offsets = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], out=send_offsets[1:])
        tf_sizes = elements[:, self.tf_tables].T.ravel()           # TF order: (table, owner)
        tf_starts = np.zeros(len(tf_sizes), dtype=np.int64)
        np.cumsum(tf_sizes[:-1], out=tf_starts[1:])
        tf_offsets = np.empty((world, tables), dtype=np.int64)
        tf_offsets[:, self.tf_tables] = tf_starts.reshape(tables, world).T
        return send_offsets, tf_offsets.ravel(), sizes

    def group_rows(self, counts):
        """Rows of each dim group in a step with ``counts`` (W, T) unique keys (int32 (G,))."""
        per_table = np.asarray(counts, dtype=np.int64).sum(axis=0)
        return np.array([per_table[tables].sum() for _, tables in self.groups], dtype=np.int32)
