"""Parameter-server mode on the same MPI transport (for side-by-side comparisons).

The classic industrial layout: the last ``num_servers`` ranks serve, the others train. Sparse
keys are partitioned over servers by the same owner function as collective mode
(``(mix64(key) % num_buckets) % num_servers``) into the same OwnerShard (hybridps.sparse.shard);
the dense parameters are split evenly into contiguous chunks, one per server. Workers pull rows
and dense chunks, compute, and push row and dense gradients; servers apply the optimizers. Only
the parameter access differs from collective mode: models, data, seeds, optimizers and metrics
are shared.

* :mod:`protocol`: roles, message tags and headers, the dense chunking;
* :mod:`transport`: the messages, over hybridps.comm's point-to-point helpers;
* :mod:`dense_optimizer`: the Keras dense optimizers' formulas in numpy (what servers apply);
* :mod:`dense_state`: the servers' dense state to and from a Keras model and optimizer;
* :mod:`server`, :mod:`worker`: the two backends.
"""
