"""Consistency strategies of the collective path: BSP, SSP and ASP behind one switch.

Each strategy is a Backend (hybridps.backend) composed of a ShardedEmbedding (sparse rows over
alltoallv) and a DenseSync (Horovod allreduce, issued from hybridps.dense.DenseAllreduceThread
in every mode). BSP runs the sparse exchange in the main thread; SSP and ASP run it in a
communication thread (hybridps.sync.pipeline).
"""
from hybridps.config import Sync
from hybridps.sync.bsp import BSPCollectiveBackend
from hybridps.sync.pipeline import PipelinedCollectiveBackend


def make_collective_backend(config, comm, sharded, dense):
    """The collective backend for ``config.sync``."""
    if config.sync == Sync.BSP:
        return BSPCollectiveBackend(comm, sharded, dense)
    return PipelinedCollectiveBackend(config, comm, sharded, dense)


__all__ = ["BSPCollectiveBackend", "PipelinedCollectiveBackend", "make_collective_backend"]
