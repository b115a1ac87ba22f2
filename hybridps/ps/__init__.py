"""Parameter-server mode on the same MPI transport (for side-by-side comparisons).

The classic industrial layout: the last ``num_servers`` ranks serve, the others train. Sparse
keys are partitioned over servers by the same owner function as collective mode
(``(mix64(key) % num_buckets) % num_servers``) into the same Cython tables; the dense parameters are split
evenly into contiguous chunks, one per server. Workers pull rows and dense chunks, compute, and
push row and dense gradients; servers apply the optimizers. Only the parameter access differs
from collective mode: models, data, seeds, optimizers and metrics are shared.
"""
from hybridps.ps.protocol import PSRoles
from hybridps.ps.server import ParameterServer
from hybridps.ps.worker import PSWorkerBackend

__all__ = ["PSRoles", "ParameterServer", "PSWorkerBackend"]
