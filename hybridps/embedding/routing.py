"""Owner of a key: ``(mix64(key) % num_buckets) % world_size`` (splitmix64, never a plain modulo).

Structured IDs (sequential, multiples of a stride) would pile onto few ranks under a plain
modulo; the mixer spreads them. The key's virtual bucket ``mix64(key) % num_buckets`` is fixed
for a model's life (config ``num_buckets``, default 4096) and checkpoints group rows by it;
owning whole buckets lets a restore onto any world size read only its own buckets. For world
sizes that divide num_buckets this equals ``mix64(key) % world_size``. The same function places
keys on PS servers, so every mode agrees on ownership.
"""
from hybridps._kernels import owner_ranks, unique_inverse, bucket_by_owner  # noqa: F401
from hybridps._hashtable import mix64  # noqa: F401
