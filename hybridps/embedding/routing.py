"""Owner of a key: ``mix64(key) % world_size`` (splitmix64, never a plain modulo).

Structured IDs (sequential, multiples of a stride) would pile onto few ranks under a plain
modulo; the mixer spreads them. The same function places keys on PS servers and decides which
rank reads which checkpoint bucket, so every mode agrees on ownership.
"""
from hybridps._kernels import owner_ranks, unique_inverse, bucket_by_owner  # noqa: F401
from hybridps._hashtable import mix64  # noqa: F401
