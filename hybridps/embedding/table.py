"""Table facade: build a rank's embedding table shard from the training config.

The table itself is the Cython ``EmbeddingHashTable`` (cython/hashtable.pyx); this module only
maps config fields onto its constructor so that every mode (collective, PS, tests) builds
identical tables.
"""
from hybridps._hashtable import EmbeddingHashTable, initial_rows  # noqa: F401
from hybridps.config import table_policy


def make_table(config, table_id, capacity_hint=1024):
    """A table shard for table ``table_id`` with the config's optimizer, initializer, seed and
    non-finite gradient policy (``nonfinite``), and the table's own admission threshold
    (``table_settings``, else ``min_count``)."""
    return EmbeddingHashTable(
        dim=config.dim, optimizer=config.optimizer, learning_rate=config.learning_rate,
        initializer=config.initializer, init_mean=0.0, init_std=config.init_std,
        init_low=-config.init_std, init_high=config.init_std, seed=config.seed,
        table_id=table_id, min_count=table_policy(config, table_id)["min_count"],
        nonfinite=config.nonfinite, capacity_hint=capacity_hint)
