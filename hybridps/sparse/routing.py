"""Owner of a key: ``(mix64(key) % num_buckets) % world_size`` (splitmix64, never a plain modulo).

The one owner function of hybridps (the C loop ``hybridps._kernels.owner_ranks``): the
collective exchange, the PS workers (over servers instead of ranks) and checkpoint restore all
use it. Structured IDs (sequential, multiples of a stride) would pile onto few ranks under a
plain modulo; the mixer spreads them. A key's virtual bucket ``mix64(key) % num_buckets`` is
fixed for a model's life (config ``num_buckets``, default 4096) and checkpoints group rows by
it; owning whole buckets lets a restore onto any world size read only its own buckets. For
world sizes that divide num_buckets this equals ``mix64(key) % world_size``.
"""
import numpy as np

from hybridps._hashtable import mix64  # noqa: F401
from hybridps._kernels import bucket_by_owner, owner_ranks, unique_inverse, unique_route  # noqa: F401

OWNER_FUNCTION = "(mix64(key) % num_buckets) % world_size"
DEFAULT_NUM_BUCKETS = 4096


def bucket_ids(keys, num_buckets):
    """Virtual bucket of each key: ``mix64(key) % num_buckets`` (int64)."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return (mix64(keys) % np.uint64(num_buckets)).astype(np.int64)


def buckets_of_rank(rank, world_size, num_buckets):
    """The buckets rank ``rank`` of ``world_size`` owns (and reads on restore)."""
    return np.arange(rank, num_buckets, world_size, dtype=np.int64)
