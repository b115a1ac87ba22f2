"""hybridps.sparse: sharded embedding tables and the per-step exchange of their rows.

Data moves data-parallel -> model-parallel on pull (each rank's unique keys go to their owner
ranks, rows come back) and model-parallel -> data-parallel on push (row gradients go back to the
owners along the same plan):

* :mod:`routing`: the one owner function ``(mix64(key) % num_buckets) % world_size``, buckets;
* :mod:`layout`: static layout of a schema's tables and features in a step's buffers;
* :mod:`plan`: the per-step exchange plan (unique, route, the TF step's indices) and the step
  object (``PulledBatch``) a pull hands to the TF step and the push takes back;
* :mod:`shard`: the owner side (lookup/insert, apply, evict, staleness), shared by collective
  owners and PS servers;
* :mod:`exchange`: the collective pull/push over alltoallv and its counters;
* :mod:`table`: builds a table shard from a schema table.

Tables never import mpi4py; the exchange talks to hybridps.comm.
"""
from hybridps.sparse.exchange import CollectiveExchange, ExchangeCounters, ReceivedKeys
from hybridps.sparse.layout import SparseLayout
from hybridps.sparse.plan import ExchangePlan, PulledBatch, plan_batch
from hybridps.sparse.routing import bucket_ids, owner_ranks
from hybridps.sparse.shard import STALENESS_BINS, TABLE_COUNTERS, OwnerShard

__all__ = ["CollectiveExchange", "ExchangeCounters", "ExchangePlan", "OwnerShard", "PulledBatch",
           "ReceivedKeys", "STALENESS_BINS", "SparseLayout", "TABLE_COUNTERS", "bucket_ids",
           "owner_ranks", "plan_batch"]
