"""The one place that switches on mode (collective, ps) and sync (bsp, ssp, asp).

What lives here: :func:`communication` (whether this run starts Horovod, and at which
negotiation cycle), :func:`placement` (which ranks train and read data, which serve) and
:func:`make_backend` (the Backend of this rank, with every setting it needs given to its
constructors). The Trainer calls these three and then only the Backend interface, so it never
branches on mode or sync: the backend made here also chooses the rank's loop (``Backend.run``:
a PS server serves, every other rank trains).
"""
import dataclasses

from hybridps.config import Mode, Sync


def communication(config):
    """(with_horovod, Horovod cycle time in ms) for this run.

    PS mode moves dense parameters through the servers: no Horovod, so no idle negotiation
    thread competes with the PS traffic. Horovod's background thread negotiates with every rank
    once per cycle, with blocking MPI calls that busy-poll. At Horovod's default of 1 ms that
    negotiation delayed the sparse exchange's collectives (alltoallv of 220 KB, 2 ranks on 2
    cores: p90 latency 3.0 ms against 0.06 ms without Horovod, 0.12 ms at 5 ms and 0.06 ms at
    20 ms). BSP hands the dense allreduce to a thread that overlaps it with the sparse push and
    pull, so a 10 ms cycle adds no latency there: BSP ran 9% faster than at 1 ms (134k against
    123k samples/s, median of 4 runs of the DeepFM benchmark). Under SSP the dense update is on
    the critical path of every step (the step waits for it), so it keeps Horovod's 1 ms.
    """
    if config.mode == Mode.PS:
        return False, None
    return True, 1.0 if config.sync == Sync.SSP else 10.0


@dataclasses.dataclass
class Placement:
    """What this rank does: ``computes`` (reads data, runs TF steps) or serves; ``data_rank``
    of ``data_ranks`` is its share of the data (the computing ranks read the data exactly as
    the same number of collective ranks would, so the modes see identical batches)."""
    computes: bool
    data_rank: int
    data_ranks: int
    num_servers: int


def placement(config, world_size, rank):
    """This rank's Placement (PS: the last ``num_servers`` ranks serve)."""
    if config.mode == Mode.PS:
        from hybridps.backends.ps.protocol import PSRoles
        roles = PSRoles(world_size, config.num_servers)
        serves = roles.is_server(rank)
        return Placement(computes=not serves, data_rank=0 if serves else rank,
                         data_ranks=roles.num_workers, num_servers=config.num_servers)
    return Placement(computes=True, data_rank=rank, data_ranks=world_size, num_servers=0)


def make_backend(config, comm, schema, model, layout):
    """This rank's Backend: collective BSP, pipelined SSP/ASP, PS server or PS worker.

    Args:
        config: TrainConfig (mode, sync, staleness, optimizers, seed, num_buckets).
        comm: hybridps.comm.Comm.
        schema: hybridps.schema.FeatureSchema (the tables).
        model: the built Keras model (its trainable variables are the dense parameters).
        layout: the run's hybridps.sparse.layout.SparseLayout of ``schema`` (built once by the
            caller, which gives the same one to the TF step).
    """
    from hybridps.sparse.shard import OwnerShard
    shard = OwnerShard(schema, config.seed, config.nonfinite, config.adam_catch_up)
    if config.mode == Mode.PS:
        from hybridps.backends.ps.protocol import PSRoles
        roles = PSRoles(comm.size, config.num_servers)
        if roles.is_server(comm.rank):
            from hybridps.backends.ps.server import PSServerBackend
            return PSServerBackend(comm, config, roles, shard, model)
        from hybridps.backends.ps.worker import PSWorkerBackend
        return PSWorkerBackend(comm, config, roles, layout, shard, model)
    from hybridps.dense.sync import DenseSync
    from hybridps.sparse.exchange import CollectiveExchange
    dense = DenseSync(model.trainable_variables, config.effective_dense_optimizer,
                      config.effective_dense_learning_rate, comm.size)
    if config.sync == Sync.BSP:
        from hybridps.backends.collective.bsp import BSPBackend
        return BSPBackend(comm, CollectiveExchange(comm, layout, shard, config.num_buckets), dense, model)
    from hybridps.backends.collective.pipeline import POLL_INTERVAL_S, PipelinedBackend
    exchange = CollectiveExchange(comm, layout, shard, config.num_buckets, poll_interval=POLL_INTERVAL_S)
    return PipelinedBackend(comm, exchange, dense, model, sync=config.sync,
                            steps=config.steps or None, staleness=config.staleness,
                            max_inflight=config.max_inflight, dense_staleness=config.dense_staleness)
