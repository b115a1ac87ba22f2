"""The interface between the Trainer and where parameters live, and what a backend reports.

What lives here: :class:`Backend`, the base class every backend derives from (the Trainer only
ever calls these methods, so it knows neither collective vs parameter server nor BSP vs ASP),
:class:`BackendState` (what a checkpoint saves and restores: hybridps.checkpoint works on it,
never on a Trainer) and :func:`shard_stats` (the figures every backend reports alike). What
does not: choosing a backend (hybridps.backends.factory, the only switch on mode and sync).

A rank's run is ``run(train, serve)``: the backend the factory made calls the Trainer's step
loop (``train``) on a computing rank and its serving loop (``serve``) on a PS server rank, so
the Trainer never asks which one it is. A step on a computing rank: ``pull(step)`` -> a
PulledBatch (hybridps.sparse.plan) -> the TF step, which takes it as it is -> ``dense_step(grads,
step)`` -> ``push(pulled, row_grads, step)``; ``at_consistent_point(k, action)`` after step k - 1
at checkpoint and delta steps (``at_idle_point(k, action)`` while a stream has no rows for
step k); ``finish()`` at the end. What a PulledBatch carries for the push (the exchange plan,
the owners' received keys) is read by hybridps.sparse and the backends only; the counters of
the metrics file come from ``stats()``.
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass
class BackendState:
    """What a checkpoint holds of one rank, and what a restore fills.

    Attributes:
        tables: this rank's table shards in schema order (empty on ranks that own no keys).
        shard: (index, count) of this rank among the key owners, or None if it owns none
            (a PS worker).
        model: the Keras model whose variables are the dense parameters (rank 0 saves them).
        dense_optimizer: the Keras optimizer holding the dense optimizer state (rank 0), or
            None where this rank does not hold it.
    """
    tables: list
    shard: Optional[tuple]
    model: object
    dense_optimizer: object


class Backend:
    """Parameter access of one training process (see the module docstring).

    Attributes:
        compute_ranks: the number of ranks that train (read data, run TF steps).
        compute_rank: this rank's index among them (None on a server).
    """

    def run(self, train, serve):
        """This rank's part of the run: ``train()`` (the Trainer's step loop, which calls
        ``start``, ``pull``, ``push`` ... ``finish``) on a computing rank; a PS server rank runs
        ``serve()`` instead (the Trainer's serving loop around :meth:`serve`). Returns what
        the loop returns (the run's summary)."""
        return train()

    def start(self, batches, start_step=0, fence_steps=()):
        """Make the initial state identical everywhere (broadcast dense weights) and take the
        iterator of this rank's batches, starting at ``start_step``; ``k in fence_steps`` says
        whether ``at_consistent_point(k, ...)`` will be called after step k - 1."""
        raise NotImplementedError

    def pull(self, step):
        """Step ``step``'s PulledBatch (hybridps.sparse.plan: the batch and the rows of its
        unique keys, flat float32 in the TF step's order); None when the batches ended before
        this step (a stream's end or an agreed stop: hybridps.step_control)."""
        raise NotImplementedError

    def dense_step(self, grads, step):
        """This rank's dense gradients (its share of the global mean loss)."""
        raise NotImplementedError

    def push(self, pulled, row_grads, step):
        """Row gradients (flat float32, the TF step's order) of the PulledBatch ``pulled``
        returned by ``pull(step)``."""
        raise NotImplementedError

    def at_consistent_point(self, step, action):
        """Run ``action()`` (checkpoint, delta export) when the tables hold exactly the updates
        of steps < ``step`` (collective: every rank, servers included, takes part)."""
        raise NotImplementedError

    def at_idle_point(self, step, action):
        """Run ``action()`` (a delta export) from the thread that draws batches while it waits
        for the batch of ``step`` (a stream with no rows yet), once the tables and the dense
        weights hold exactly the updates of steps < ``step``. Collective: every rank calls it
        at the same poll of the step agreement (hybridps.step_control)."""
        raise NotImplementedError(f"{type(self).__name__} does not export while waiting for data")

    def label_counts(self, counts):
        """Each task's count of present labels over every computing rank, from this rank's
        (float64 (T,)), for the step's global mean per task (hybridps.models.loss). Here (SSP,
        ASP, parameter server: ranks do not step together) this rank's counts times the
        computing ranks, the estimate the global batch size is for one label."""
        return counts * self.compute_ranks

    def finish(self):
        """Drain anything in flight; after it, every pushed gradient has been applied."""
        raise NotImplementedError

    def read(self, batch):
        """The PulledBatch of a batch for evaluation, like ``pull``, but read only (unseen
        keys read zeros; nothing is inserted or counted). Collective: every computing rank
        calls it, at a consistent point."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate during training; "
                                  f"evaluate a checkpoint with `hybridps evaluate`")

    def serve(self, start_step, on_consistent_point):
        """PS server ranks only (their ``run`` calls the serving loop, which calls this):
        serve until every worker is done."""
        raise NotImplementedError(f"{type(self).__name__} does not serve")

    def stats(self):
        """The counters of the metrics file, the same keys in every backend (shard_stats)."""
        raise NotImplementedError

    def state(self):
        """This rank's BackendState to checkpoint (collective in PS mode: the servers' dense
        state is gathered into rank 0's model and optimizer)."""
        raise NotImplementedError

    def restore_target(self):
        """The BackendState a restore fills (fresh tables, the model, a dense optimizer)."""
        raise NotImplementedError

    def load_state(self, step):
        """After a restore of a checkpoint taken after ``step`` completed steps."""
        raise NotImplementedError


def shard_stats(shard, counters, dense_lag=None):
    """The stats() dict every backend returns: exchange volume (``counters``, a
    hybridps.sparse.exchange.ExchangeCounters: bytes and keys sent and received, row gradients
    pushed), table rows and counters, observed staleness (the histogram, and the worst read per
    step as a bounded StepSeries), applied row gradients, and the dense lag ([max, sum, steps]
    of the TF steps' dense staleness, None where it is not measured)."""
    return {"bytes_sent": int(counters.bytes_sent), "bytes_received": int(counters.bytes_received),
            "keys_sent": int(counters.keys_sent), "keys_received": int(counters.keys_received),
            "table_rows": shard.table_sizes(), "table_counters": shard.counters(),
            "staleness_histogram": shard.staleness_histogram,
            "staleness_max_by_step": shard.staleness_max_by_step.copy(),
            "row_grads_pushed": int(counters.row_grads_pushed), "row_grads_applied": int(shard.row_grads_applied),
            "dense_lag": dense_lag}


__all__ = ["Backend", "BackendState", "shard_stats"]
