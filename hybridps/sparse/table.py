"""Build one rank's shard of an embedding table from the schema's TableConfig.

The table itself is the Cython ``EmbeddingHashTable`` (cython/hashtable.pyx); this module only
maps a table's settings onto its constructor so that every mode (collective owners, PS servers,
tests) builds identical tables. A key's initial row depends on (seed, table index, key) only.
"""
from hybridps._hashtable import EmbeddingHashTable, initial_rows  # noqa: F401


def make_table(table, table_id, seed, nonfinite="raise", capacity_hint=1024, adam_catch_up=False):
    """A table shard with ``table``'s (a hybridps.schema.TableConfig) dim, optimizer, learning
    rate, initializer and admission threshold; ``table_id`` is its index in the schema.
    ``adam_catch_up`` makes an Adam table Keras's Adam (skipped steps applied when a row is
    next updated); other optimizers ignore it."""
    return EmbeddingHashTable(
        dim=table.dim, optimizer=table.optimizer, learning_rate=table.learning_rate,
        initializer=table.initializer, init_mean=0.0, init_std=table.init_std,
        init_low=-table.init_std, init_high=table.init_std, seed=seed, table_id=table_id,
        min_count=table.min_count, nonfinite=nonfinite, capacity_hint=capacity_hint,
        adam_catch_up=adam_catch_up and table.optimizer == "adam")
