"""The PS messages between workers and servers, over hybridps.comm's point-to-point helpers.

What lives here: each message of the protocol (hybridps.backends.ps.protocol) as one function
pair, sender side and receiver side, so the worker and the server read as their logic. All
payloads are contiguous numpy buffers; non-blocking sends keep their buffer alive with the
request (``Pending``). What does not: MPI itself (hybridps.comm is its one owner), consistency
rules (the server), the exchange plan (hybridps.sparse).
"""
import numpy as np

from hybridps import watchdog
from hybridps.backends.ps.protocol import (HEADER_LEN, TAG_COUNTS, TAG_DENSE_GRADS, TAG_HEADER,
                                           TAG_INIT_DENSE, TAG_INIT_OPTIMIZER, TAG_KEYS,
                                           TAG_REPLY_DENSE, TAG_REPLY_ROWS, TAG_ROW_GRADS, header)


class Pending:
    """Non-blocking requests with the buffers they send from (kept alive until completion)."""

    def __init__(self, comm):
        self.comm = comm
        self.items = []

    def add(self, request, buffer=None):
        self.items.append((request, buffer))

    def send(self, array, dest, tag):
        array = np.ascontiguousarray(array)
        self.add(self.comm.isend(array, dest, tag), array)

    def reap(self):
        """Drop the completed requests (without waiting)."""
        self.items = [(r, b) for r, b in self.items if not self.comm.test(r)]

    def wait(self, name=None):
        """Wait for every request; ``name`` runs the wait under the collective watchdog (a
        worker waiting for a dead server trips it instead of hanging)."""
        if self.items:
            if name is None:
                self.comm.waitall([r for r, _ in self.items])
            else:
                with watchdog.collective(name):
                    self.comm.waitall([r for r, _ in self.items])
            self.items = []


class Transport:
    """One rank's end of the PS traffic (on hybridps.comm's exchange communicator)."""

    def __init__(self, comm):
        self.comm = comm

    # ------------------------------------------------------------------ start
    def send_initial_dense(self, server, dense_chunk, t, slots, pending):
        """Worker 0: a server's chunk of the initial dense parameters and optimizer state."""
        pending.send(dense_chunk, server, TAG_INIT_DENSE)
        pending.send(np.array([t], dtype=np.int64), server, TAG_INIT_OPTIMIZER)
        pending.send(slots, server, TAG_INIT_OPTIMIZER)

    def receive_initial_dense(self, dense, slots):
        """Server: fills ``dense`` and ``slots``; returns the optimizer's update count."""
        t = np.empty(1, dtype=np.int64)
        self.comm.recv(dense, 0, TAG_INIT_DENSE)
        self.comm.recv(t, 0, TAG_INIT_OPTIMIZER)
        self.comm.recv(slots, 0, TAG_INIT_OPTIMIZER)
        return int(t[0])

    # ------------------------------------------------------------------ requests
    def send_pull(self, server, op, step, worker, counts, keys, pending):
        """Worker: a pull request (header, per-table key counts, keys)."""
        pending.send(header(op, step, worker, len(keys)), server, TAG_HEADER)
        pending.send(np.ascontiguousarray(counts, dtype=np.int64), server, TAG_COUNTS)
        pending.send(keys, server, TAG_KEYS)

    def send_push(self, server, op, step, worker, num_keys, row_grads, dense_grads, pending):
        """Worker: a push (header, row gradients in the pull's key order, dense chunk)."""
        pending.send(header(op, step, worker, num_keys), server, TAG_HEADER)
        pending.send(row_grads, server, TAG_ROW_GRADS)
        pending.send(dense_grads, server, TAG_DENSE_GRADS)

    def send_control(self, server, op, step, worker):
        """Worker: a message with no payload (done, consistent point), blocking."""
        self.comm.send(header(op, step, worker, 0), server, TAG_HEADER)

    def receive_header(self):
        """Server: the next request from any worker: (op, step, worker, num_keys, source)."""
        head = np.empty(HEADER_LEN, dtype=np.int64)
        source = self.comm.recv(head, self.comm.ANY_SOURCE, TAG_HEADER)
        op, step, worker, num_keys = (int(x) for x in head)
        return op, step, worker, num_keys, source

    def receive_pull(self, source, num_keys, num_tables):
        """Server: (per-table counts, keys) of a pull whose header came from ``source``."""
        counts = np.empty(num_tables, dtype=np.int64)
        keys = np.empty(num_keys, dtype=np.int64)
        self.comm.recv(counts, source, TAG_COUNTS)
        self.comm.recv(keys, source, TAG_KEYS)
        return counts, keys

    def receive_push(self, source, num_elements, dense_size):
        """Server: (flat row gradients, dense gradient chunk) of a push from ``source``."""
        row_grads = np.empty(num_elements, dtype=np.float32)
        dense_grads = np.empty(dense_size, dtype=np.float32)
        self.comm.recv(row_grads, source, TAG_ROW_GRADS)
        self.comm.recv(dense_grads, source, TAG_DENSE_GRADS)
        return row_grads, dense_grads

    # ------------------------------------------------------------------ replies
    def reply(self, worker, rows, dense, pending):
        """Server: the rows of a pull and the current dense chunk (non-blocking)."""
        pending.send(rows, worker, TAG_REPLY_ROWS)
        pending.send(dense, worker, TAG_REPLY_DENSE)

    def post_rows(self, server, rows_view, pending):
        """Worker: receive a server's rows into ``rows_view`` (non-blocking)."""
        pending.add(self.comm.irecv(rows_view, server, TAG_REPLY_ROWS), rows_view)

    def post_dense(self, server, dense_view, pending):
        """Worker: receive a server's dense chunk into ``dense_view`` (non-blocking)."""
        pending.add(self.comm.irecv(dense_view, server, TAG_REPLY_DENSE), dense_view)
