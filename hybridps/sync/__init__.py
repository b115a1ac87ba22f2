"""Consistency strategies of the collective path (BSP now; SSP and ASP build on the same pieces).

Each strategy is a Backend (hybridps.backend) composed of a ShardedEmbedding (sparse rows over
alltoallv) and a DenseSync (Horovod allreduce).
"""
from hybridps.sync.bsp import BSPCollectiveBackend


def make_collective_backend(config, comm, sharded, dense):
    """The collective backend for ``config.sync``."""
    return BSPCollectiveBackend(comm, sharded, dense)


__all__ = ["BSPCollectiveBackend", "make_collective_backend"]
