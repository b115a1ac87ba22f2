"""PS worker: the Backend (hybridps.backend) a Trainer uses when parameters live on servers.

pull(step): unique keys per table -> route by the owner function (hybridps.embedding.routing) over servers -> one request per
server (a server with no keys of this batch still gets an empty request: it serves this
worker's dense chunk and keeps its clock) -> rows and dense chunks back -> the model's dense
variables are set from the chunks. push: row gradients in the pull's key order plus each
server's dense-gradient chunk; keys are not resent (the server kept them from the pull).

start: worker 0 sends every server its chunk of the initial dense parameters and of the dense
optimizer state (fresh, or restored from a checkpoint into ``initial_optimizer``).
"""
import numpy as np

from hybridps import watchdog
from hybridps.embedding.sharded import ExchangePlan, route_unique_keys
from hybridps.ps.protocol import (OP_CONSISTENT_POINT, OP_DONE, OP_PULL, OP_PUSH, TAG_COUNTS,
                                  TAG_DENSE_GRADS, TAG_HEADER, TAG_INIT_DENSE, TAG_INIT_OPTIMIZER,
                                  TAG_KEYS, TAG_REPLY_DENSE, TAG_REPLY_ROWS, TAG_ROW_GRADS,
                                  NumpyDenseOptimizer, dense_chunks, header)


class PSWorkerBackend:
    """Parameter access through the servers (one synchronous request round per step)."""

    def __init__(self, comm, roles, sharded, variables, dense_optimizer, dense_learning_rate):
        self.comm = comm
        self.mpi = comm.MPI
        self.roles = roles
        self.sharded = sharded          # this worker's bookkeeping (bytes, pushed rows); no rows
        self.variables = list(variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.chunks = dense_chunks(sum(self.sizes), roles.num_servers)
        self.worker = comm.rank
        self.pending_sends = []
        # the dense optimizer state worker 0 hands to the servers at start (a resume replaces it)
        self.initial_optimizer = NumpyDenseOptimizer(dense_optimizer, dense_learning_rate,
                                                     sum(self.sizes))

    # ------------------------------------------------------------------ lifecycle
    def start(self, batches, start_step=0, fence_steps=()):
        self.batches = batches
        if self.worker == 0:   # rank 0 initialises the dense parameters and sends them out
            flat = self._flat_dense()
            t = np.array([self.initial_optimizer.t], dtype=np.int64)
            requests, buffers = [], []
            for server, (a, b) in zip(self.roles.server_ranks, self.chunks):
                slots = self.initial_optimizer.slot_matrix(a, b)
                buffers.append(slots)
                requests += [self.comm.exchange.Isend(flat[a:b], dest=server, tag=TAG_INIT_DENSE),
                             self.comm.exchange.Isend(t, dest=server, tag=TAG_INIT_OPTIMIZER),
                             self.comm.exchange.Isend(slots, dest=server, tag=TAG_INIT_OPTIMIZER)]
            self.mpi.Request.Waitall(requests)

    def at_consistent_point(self, step, action):
        """Tell every server this worker pushed all steps < ``step``, then join ``action``."""
        self._wait_sends()
        for server in self.roles.server_ranks:
            self.comm.exchange.Send(header(OP_CONSISTENT_POINT, step, self.worker, 0), dest=server,
                                    tag=TAG_HEADER)
        action()

    def finish(self):
        """Tell every server this worker is done, then take the final dense parameters."""
        self._wait_sends()
        comm = self.comm.exchange
        for server in self.roles.server_ranks:
            comm.Send(header(OP_DONE, -1, self.worker, 0), dest=server, tag=TAG_HEADER)
        self._set_dense(self._receive_dense())

    # ------------------------------------------------------------------ pull / push
    def pull(self, step):
        batch = next(self.batches)
        plan = self._plan(batch.keys, step)
        comm = self.comm.exchange
        self._wait_sends()
        send_counts = plan.send_counts
        offsets = np.concatenate([[0], np.cumsum(send_counts.sum(1))])
        send_keys = plan.unique_keys            # in send order (grouped by server)
        requests = []
        for s, server in enumerate(self.roles.server_ranks):
            keys = send_keys[offsets[s]:offsets[s + 1]]
            requests.append(comm.Isend(header(OP_PULL, step, self.worker, len(keys)), dest=server, tag=TAG_HEADER))
            requests.append(comm.Isend(np.ascontiguousarray(send_counts[s]), dest=server, tag=TAG_COUNTS))
            requests.append(comm.Isend(keys, dest=server, tag=TAG_KEYS))
        unique_rows = np.empty((len(send_keys), self.sharded.dim), dtype=np.float32)
        receives = [comm.Irecv(unique_rows[offsets[s]:offsets[s + 1]], source=server, tag=TAG_REPLY_ROWS)
                    for s, server in enumerate(self.roles.server_ranks)]
        dense = self._receive_dense(extra=receives + requests)
        self._set_dense(dense)
        self.sharded._count_bytes(send_keys.nbytes, unique_rows.nbytes + dense.nbytes)
        self._plan_offsets = offsets
        return batch, plan, unique_rows

    def dense_step(self, grads, step):
        self._dense_grads = np.concatenate([np.asarray(g, dtype=np.float32).ravel() for g in grads])

    def push(self, plan, unique_row_grads, step):
        comm = self.comm.exchange
        grads = np.ascontiguousarray(unique_row_grads, dtype=np.float32)   # in send order already
        offsets = self._plan_offsets
        for s, server in enumerate(self.roles.server_ranks):
            a, b = self.chunks[s]
            row_part = grads[offsets[s]:offsets[s + 1]]
            dense_part = np.ascontiguousarray(self._dense_grads[a:b])
            self.pending_sends += [
                (comm.Isend(header(OP_PUSH, step, self.worker, len(row_part)), dest=server, tag=TAG_HEADER), None),
                (comm.Isend(row_part, dest=server, tag=TAG_ROW_GRADS), row_part),
                (comm.Isend(dense_part, dest=server, tag=TAG_DENSE_GRADS), dense_part)]
        watchdog.mark("ps_push_posted")
        self.sharded.row_grads_pushed += len(grads)
        self.sharded._count_bytes(grads.nbytes + self._dense_grads.nbytes, 0)

    def stats(self):
        return {"bytes_sent": self.sharded.bytes_sent, "bytes_received": self.sharded.bytes_received,
                "table_rows": self.sharded.table_sizes()}

    # ------------------------------------------------------------------ helpers
    def _plan(self, keys, step):
        unique_keys, inverse, send_counts = route_unique_keys(
            keys, self.sharded.field_groups, self.roles.num_servers, self.sharded.num_buckets)
        empty = np.zeros_like(send_counts)
        return ExchangePlan(unique_keys, inverse, send_counts, empty, unique_keys[:0], [], step)

    def _receive_dense(self, extra=()):
        flat = np.empty(sum(self.sizes), dtype=np.float32)
        receives = [self.comm.exchange.Irecv(flat[a:b], source=server, tag=TAG_REPLY_DENSE)
                    for server, (a, b) in zip(self.roles.server_ranks, self.chunks)]
        with watchdog.collective("ps_pull"):      # a dead server trips the watchdog
            self.mpi.Request.Waitall(list(extra) + receives)
        return flat

    def _wait_sends(self):
        if self.pending_sends:
            with watchdog.collective("ps_push"):
                self.mpi.Request.Waitall([r for r, _ in self.pending_sends])
            self.pending_sends = []

    def _flat_dense(self):
        return np.concatenate([v.numpy().ravel() for v in self.variables]).astype(np.float32)

    def _set_dense(self, flat):
        start = 0
        for variable, shape, size in zip(self.variables, self.shapes, self.sizes):
            variable.assign(flat[start:start + size].reshape(shape))
            start += size
