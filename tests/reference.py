"""Independent reference implementations the tests compare hybridps against.

The splitmix64 finalizer (behind owner ranks, buckets, slots, initial rows and integer feature
keys), written in plain Python and in numpy, never calling hybridps' Cython code.
"""
import numpy as np

MASK64 = (1 << 64) - 1


def mix64_int(z):
    """splitmix64 finalizer of one Python int (taken mod 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix64_array(keys):
    """splitmix64 finalizer of an array: int64 keys are taken bit for bit as uint64."""
    keys = np.asarray(keys)
    z = keys.view(np.uint64).copy() if keys.dtype == np.int64 else np.array(keys, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def send_order_index(unique_keys, send_counts, keys, column_tables):
    """(B, S) position of each single-valued (sample, column) key in a step's send-order
    unique keys (grouped by owner, then table), found by a dictionary over (table, key): the
    inverse the exchange plan keeps implicit. ``column_tables``: each column's table index.
    A key missing from its table's blocks raises KeyError."""
    world, tables = np.asarray(send_counts).shape
    table_of_position = np.repeat(np.tile(np.arange(tables), world), np.asarray(send_counts).ravel())
    position = {(int(t), int(k)): i for i, (t, k) in enumerate(zip(table_of_position, unique_keys))}
    keys = np.asarray(keys)
    out = np.empty(keys.shape, dtype=np.int64)
    for b in range(keys.shape[0]):
        for column, table in enumerate(column_tables):
            out[b, column] = position[(int(table), int(keys[b, column]))]
    return out
