"""The PS worker: the backend of a training rank when parameters live on servers.

pull(step): the batch's unique keys per table, routed over the servers by the owner function
(hybridps.sparse.plan, with the servers as owners) -> one request per server (a server with no
keys of this batch still gets an empty request: it serves this worker's dense chunk and keeps
its clock) -> rows and dense chunks back -> the model's dense variables are set from the
chunks; rows move into the TF step's order as in collective mode. push: row gradients in the
pull's key order plus each server's dense-gradient chunk; keys are not resent (the server kept
them from the pull).

start: worker 0 sends every server its chunk of the initial dense parameters and of the dense
optimizer state (fresh, or restored from a checkpoint into ``initial_optimizer``).
"""
import numpy as np

from hybridps import exchange_trace
from hybridps._kernels import permute_blocks
from hybridps.backends.base import Backend, BackendState, shard_stats
from hybridps.backends.ps.dense_optimizer import NumpyDenseOptimizer
from hybridps.backends.ps.dense_state import gather_dense_state, worker_optimizer_from_keras
from hybridps.backends.ps.protocol import (OP_CONSISTENT_POINT, OP_DONE, OP_PULL, OP_PUSH,
                                           dense_chunks)
from hybridps.backends.ps.transport import Pending, Transport
from hybridps.sparse.exchange import ExchangeCounters
from hybridps.sparse.plan import PulledBatch, plan_batch
from hybridps.sparse.shard import OwnerShard


class PSWorkerBackend(Backend):
    """Parameter access through the servers (one synchronous request round per step).

    Args:
        comm, config: hybridps.comm.Comm, TrainConfig.
        roles: PSRoles.
        layout: hybridps.sparse.layout.SparseLayout.
        shard: an OwnerShard that stays empty (the worker owns no keys; it only reports
            through it and gives a checkpoint the table layout).
        model: the Keras model whose dense variables the worker sets from the servers.
    """

    def __init__(self, comm, config, roles, layout, shard, model):
        self.comm = comm
        self.config = config
        self.roles = roles
        self.layout = layout
        self.shard = shard
        self.model = model
        self.transport = Transport(comm)
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.chunks = dense_chunks(sum(self.sizes), roles.num_servers)
        self.worker = comm.rank
        self.compute_rank, self.compute_ranks = comm.rank, roles.num_workers
        self.pending = Pending(comm)
        # keys received stay 0: a worker owns no keys (the servers do not count theirs)
        self.counters = ExchangeCounters()
        self.batches = None          # this rank's batches, from ``start``
        self._offsets = None         # the pull's (key offsets, element offsets) per server
        self._dense_grads = None     # the step's flat dense gradients, from ``dense_step``
        # the dense optimizer state worker 0 hands to the servers at start (a resume replaces it)
        self.initial_optimizer = NumpyDenseOptimizer(config.effective_dense_optimizer,
                                                     config.effective_dense_learning_rate,
                                                     sum(self.sizes))
        self.restored_optimizer = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, batches, start_step=0, fence_steps=None):
        self.batches = batches
        if self.worker == 0:   # rank 0 initialises the dense parameters and sends them out
            flat = self._flat_dense()
            initial = Pending(self.comm)
            for server, (a, b) in zip(self.roles.server_ranks, self.chunks):
                self.transport.send_initial_dense(server, flat[a:b], self.initial_optimizer.t,
                                                  self.initial_optimizer.slot_matrix(a, b), initial)
            initial.wait()

    def at_consistent_point(self, step, action):
        """Tell every server this worker pushed all steps < ``step``, then join ``action``."""
        self.pending.wait()
        for server in self.roles.server_ranks:
            self.transport.send_control(server, OP_CONSISTENT_POINT, step, self.worker)
        action()

    def finish(self):
        """Tell every server this worker is done, then take the final dense parameters."""
        self.pending.wait()
        for server in self.roles.server_ranks:
            self.transport.send_control(server, OP_DONE, -1, self.worker)
        self._set_dense(self._receive_dense(Pending(self.comm)))

    # ------------------------------------------------------------------ pull / push
    def pull(self, step):
        batch = next(self.batches)
        plan = plan_batch(self.layout, batch, self.roles.num_servers, self.config.num_buckets)
        self.pending.wait("ps_push")
        counts = plan.send_counts
        key_offsets = np.concatenate([[0], np.cumsum(counts.sum(1))])
        elements = OwnerShard.elements(counts, self.shard.dims)
        elem_offsets = np.concatenate([[0], np.cumsum(elements)])
        rows = np.empty(int(elem_offsets[-1]), dtype=np.float32)
        requests = Pending(self.comm)
        for s, server in enumerate(self.roles.server_ranks):
            keys = plan.unique_keys[key_offsets[s]:key_offsets[s + 1]]
            self.transport.send_pull(server, OP_PULL, step, self.worker, counts[s], keys, requests)
            self.transport.post_rows(server, rows[elem_offsets[s]:elem_offsets[s + 1]], requests)
        dense = self._receive_dense(requests)
        self._set_dense(dense)
        self.counters.add_bytes(plan.unique_keys.nbytes, rows.nbytes + dense.nbytes)
        self._offsets = (key_offsets, elem_offsets)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            rows = permute_blocks(rows, send_offsets, tf_offsets, sizes)
        return PulledBatch(batch, rows, plan)

    def dense_step(self, grads, step):
        self._dense_grads = np.concatenate([np.asarray(g, dtype=np.float32).ravel() for g in grads])

    def push(self, pulled, row_grads, step):
        plan = pulled.plan
        grads = np.ascontiguousarray(row_grads, dtype=np.float32).reshape(-1)
        if plan.permutation is not None:
            send_offsets, tf_offsets, sizes = plan.permutation
            grads = permute_blocks(grads, tf_offsets, send_offsets, sizes)
        key_offsets, elem_offsets = self._offsets
        for s, server in enumerate(self.roles.server_ranks):
            a, b = self.chunks[s]
            self.transport.send_push(server, OP_PUSH, step, self.worker,
                                     int(key_offsets[s + 1] - key_offsets[s]),
                                     grads[elem_offsets[s]:elem_offsets[s + 1]],
                                     self._dense_grads[a:b], self.pending)
        exchange_trace.mark("ps_push_posted")
        counters, keys_sent = self.counters, len(plan.unique_keys)
        counters.keys_sent += keys_sent
        counters.row_grads_pushed += keys_sent
        counters.add_bytes(grads.nbytes + self._dense_grads.nbytes, 0)

    # ------------------------------------------------------------------ state and reports
    def stats(self):
        return shard_stats(self.shard, self.counters)

    def state(self):
        optimizer = gather_dense_state(self.comm, self.config, None,
                                       self.model if self.comm.rank == 0 else None)
        return BackendState(tables=self.shard.tables, shard=None, model=self.model,
                            dense_optimizer=optimizer)

    def restore_target(self):
        from hybridps.dense.sync import make_dense_optimizer
        c = self.config
        if self.comm.rank == 0 and self.restored_optimizer is None:
            self.restored_optimizer = make_dense_optimizer(c.effective_dense_optimizer,
                                                           c.effective_dense_learning_rate)
        return BackendState(tables=self.shard.tables, shard=None,
                            model=self.model if self.comm.rank == 0 else None,
                            dense_optimizer=self.restored_optimizer)

    def load_state(self, step):
        if self.comm.rank == 0 and self.restored_optimizer is not None:   # handed to the servers
            self.initial_optimizer = worker_optimizer_from_keras(self.config, self.model,
                                                                 self.restored_optimizer)

    # ------------------------------------------------------------------ helpers
    def _receive_dense(self, requests):
        flat = np.empty(sum(self.sizes), dtype=np.float32)
        for server, (a, b) in zip(self.roles.server_ranks, self.chunks):
            self.transport.post_dense(server, flat[a:b], requests)
        requests.wait("ps_pull")
        return flat

    def _flat_dense(self):
        return np.concatenate([v.numpy().ravel() for v in self.variables]).astype(np.float32)

    def _set_dense(self, flat):
        start = 0
        for variable, shape, size in zip(self.variables, self.shapes, self.sizes):
            variable.assign(flat[start:start + size].reshape(shape))
            start += size
