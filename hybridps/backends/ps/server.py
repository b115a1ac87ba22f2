"""The parameter server: one rank's key shard and dense chunk, serving every worker.

Requests are taken from any worker in arrival order (any source on the header tag), so a
slow worker never blocks the others unless the consistency mode requires it:
  * asp: a pull is served at once; a push is applied on arrival.
  * ssp(s): pushes are applied on arrival; a pull at clock c waits until the slowest worker
    has pushed step c - s - 1.
  * bsp: the pushes of step t are aggregated over all workers and applied once (the same
    arithmetic as collective BSP: one optimizer update per key per step on the summed
    gradient); a pull of step t + 1 waits for that.
Waiting pulls are queued, never waited on. Replies go out with non-blocking sends, so a
worker that has not yet posted its receive cannot stall the server. The rows live in an
OwnerShard (hybridps.sparse.shard), the same owner side collective ranks run.

Checkpoints and delta exports: a worker that reaches one sends OP_CONSISTENT_POINT after its
last push (MPI keeps one source's messages in order, so every push before it has arrived);
when every worker has sent it, the server has applied every update of the earlier steps, and
it joins the collective action (``on_consistent_point``) with the workers.
"""
import numpy as np

from hybridps.backends.base import Backend, BackendState, shard_stats
from hybridps.backends.ps.dense_optimizer import NumpyDenseOptimizer
from hybridps.backends.ps.dense_state import gather_dense_state
from hybridps.backends.ps.protocol import (OP_CONSISTENT_POINT, OP_DONE, OP_PULL, OP_PUSH,
                                           TAG_REPLY_DENSE, dense_chunks)
from hybridps.backends.ps.transport import Pending, Transport
from hybridps.config import Sync
from hybridps.sparse.exchange import ExchangeCounters


class PSServerBackend(Backend):
    """Serves one key shard and one dense chunk until every worker is done.

    Args:
        comm: hybridps.comm.Comm.
        config: TrainConfig (sync, staleness, dense optimizer).
        roles: hybridps.backends.ps.protocol.PSRoles.
        shard: the OwnerShard this server holds.
        model: the Keras model (the dense size; rank 0 gathers the servers' state into it).
    """

    def __init__(self, comm, config, roles, shard, model):
        self.comm = comm
        self.config = config
        self.roles = roles
        self.shard = shard
        self.model = model
        self.transport = Transport(comm)
        self.index = roles.server_index(comm.rank)
        self.compute_rank, self.compute_ranks = None, roles.num_workers
        dense_size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        start, stop = dense_chunks(dense_size, roles.num_servers)[self.index]
        self.chunk = (int(start), int(stop))
        self.dense = np.empty(stop - start, dtype=np.float32)
        self.optimizer = NumpyDenseOptimizer(config.effective_dense_optimizer,
                                             config.effective_dense_learning_rate, stop - start)
        self.num_tables = len(shard.tables)
        self.clock = np.full(roles.num_workers, -1, dtype=np.int64)   # last pushed step per worker
        self.last_pull = {}          # worker -> (step, keys, counts): a push reuses its pull's keys
        self.pending_pulls = []      # (worker, step) waiting for the consistency condition
        self.bsp_buffer = {}         # step -> list of (worker, keys, blocks, row grads, dense grads)
        self.replies = Pending(comm)
        self.done = 0
        self.at_consistent_point = []   # workers waiting at a checkpoint / delta step

    # ------------------------------------------------------------------ main loop
    def run(self, train, serve):
        """A server rank does not train: it runs the serving loop (which calls :meth:`serve`)."""
        return serve()

    def serve(self, start_step, on_consistent_point):
        """Serve until every worker has sent DONE and every push is applied.

        Args:
            start_step: the first step the workers train (after a resume: every worker's
                clock starts there, as if it had pushed the steps before).
            on_consistent_point: ``f(step)`` run when every worker waits at ``step`` (a
                checkpoint or delta export, collective with the workers).
        """
        slots = self.optimizer.slot_matrix()
        t = self.transport.receive_initial_dense(self.dense, slots)
        self.optimizer.load(t, slots)
        self.clock[:] = start_step - 1
        while self.done < self.roles.num_workers:
            op, step, worker, num_keys, source = self.transport.receive_header()
            if op == OP_PULL:
                counts, keys = self.transport.receive_pull(source, num_keys, self.num_tables)
                self.last_pull[worker] = (step, keys, counts)
                self.pending_pulls.append((worker, step))
            elif op == OP_PUSH:
                pull_step, keys, counts = self.last_pull.pop(worker)
                assert pull_step == step, f"worker {worker} pushed step {step} after pulling {pull_step}"
                elements = int((counts * self.shard.dims).sum())
                row_grads, dense_grads = self.transport.receive_push(source, elements, len(self.dense))
                self._on_push(worker, step, keys, counts, row_grads, dense_grads)
            elif op == OP_DONE:
                self.done += 1
            elif op == OP_CONSISTENT_POINT:
                self._on_consistent_point(worker, step, on_consistent_point)
            self._serve_ready_pulls()
            self.replies.reap()
        self.replies.wait()
        self._send_final_dense()

    def _on_consistent_point(self, worker, step, action):
        self.at_consistent_point.append(worker)
        if len(self.at_consistent_point) < self.roles.num_workers:
            return
        # every worker pushed steps < step and waits: nothing may be half-applied now
        assert not self.bsp_buffer and not self.pending_pulls and not self.last_pull, \
            f"server {self.index}: steps in flight at the consistent point {step}"
        self.replies.wait()
        self.at_consistent_point = []
        if action is not None:
            action(step)

    # ------------------------------------------------------------------ pushes
    def _on_push(self, worker, step, keys, counts, row_grads, dense_grads):
        blocks = self.shard.blocks(counts[np.newaxis, :])
        if self.config.sync == Sync.BSP:
            batch = self.bsp_buffer.setdefault(step, [])
            batch.append((worker, keys, blocks, row_grads, dense_grads))
            self.clock[worker] = step
            if len(batch) == self.roles.num_workers:
                batch.sort(key=lambda item: item[0])   # worker order: deterministic sums
                self.shard.apply([(k, g, b) for _, k, b, g, _ in batch], step)
                self.optimizer.apply(self.dense, np.sum([b[4] for b in batch], axis=0))
                del self.bsp_buffer[step]
                self.shard.applied_through = step
        else:
            self.shard.apply([(keys, row_grads, blocks)], step)
            self.optimizer.apply(self.dense, dense_grads)
            self.clock[worker] = step
            self.shard.applied_through = int(self.clock.min())

    # ------------------------------------------------------------------ pulls
    def _may_serve(self, step):
        sync = self.config.sync
        if sync == Sync.ASP:
            return True
        if sync == Sync.BSP:
            return self.shard.applied_through >= step - 1
        return int(self.clock.min()) >= step - self.config.staleness - 1

    def _serve_ready_pulls(self):
        still_waiting = []
        for worker, step in self.pending_pulls:
            if self._may_serve(step):
                _, keys, counts = self.last_pull[worker]
                blocks = self.shard.blocks(counts[np.newaxis, :])
                rows = self.shard.lookup(keys, blocks, step, int((counts * self.shard.dims).sum()))
                self.transport.reply(worker, rows, self.dense.copy(), self.replies)
            else:
                still_waiting.append((worker, step))
        self.pending_pulls = still_waiting

    def _send_final_dense(self):
        """After the last push of every worker: the final dense chunk to every worker."""
        final = Pending(self.comm)
        for w in range(self.roles.num_workers):
            final.send(self.dense, w, TAG_REPLY_DENSE)
        final.wait()

    # ------------------------------------------------------------------ state
    def dense_state(self):
        """(chunk start, chunk stop, dense values, optimizer t, optimizer slot matrix)."""
        return (*self.chunk, self.dense.copy(), self.optimizer.t, self.optimizer.slot_matrix())

    def stats(self):
        return shard_stats(self.shard, ExchangeCounters())   # the workers count the traffic

    def state(self):
        gather_dense_state(self.comm, self.config, self.dense_state(), None)
        return BackendState(tables=self.shard.tables, shard=(self.index, self.roles.num_servers),
                            model=None, dense_optimizer=None)

    def restore_target(self):
        return BackendState(tables=self.shard.tables, shard=(self.index, self.roles.num_servers),
                            model=None, dense_optimizer=None)

    def load_state(self, step):
        self.shard.applied_through = step - 1
