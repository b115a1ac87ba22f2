"""The parameter server loop: one rank's key shard and dense chunk, serving every worker.

Requests are taken from any worker in arrival order (MPI_ANY_SOURCE on the header tag), so a
slow worker never blocks the others unless the consistency mode requires it:
  * asp: a pull is served at once; a push is applied on arrival.
  * ssp(s): pushes are applied on arrival; a pull at clock c waits until the slowest worker
    has pushed step c - s - 1.
  * bsp: the pushes of step t are aggregated over all workers and applied once (the same
    arithmetic as collective BSP: one optimizer update per key per step on the summed
    gradient); a pull of step t + 1 waits for that.
Waiting pulls are queued, never waited on. Replies go out with non-blocking sends, so a
worker that has not yet posted its receive cannot stall the server.

Checkpoints and delta exports: a worker that reaches one sends OP_CONSISTENT_POINT after its
last push (MPI keeps one source's messages in order, so every push before it has arrived);
when every worker has sent it, the server has applied every update of the earlier steps, and
it joins the collective action (``on_consistent_point``) with the workers.
"""
import numpy as np

from hybridps.config import Sync
from hybridps.ps.protocol import (HEADER_LEN, OP_CONSISTENT_POINT, OP_DONE, OP_PULL, OP_PUSH,
                                  TAG_COUNTS, TAG_DENSE_GRADS, TAG_HEADER, TAG_INIT_DENSE,
                                  TAG_INIT_OPTIMIZER, TAG_KEYS, TAG_REPLY_DENSE, TAG_REPLY_ROWS,
                                  TAG_ROW_GRADS, NumpyDenseOptimizer, dense_chunks)


class ParameterServer:
    """Serves one key shard (``shard.tables``) and one dense chunk until every worker is done.

    Args:
        comm: hybridps.comm.Comm (its ``exchange`` communicator carries the PS traffic).
        config: TrainConfig (sync, staleness, dense optimizer, steps).
        roles: PSRoles.
        shard: ShardedEmbedding whose tables and staleness bookkeeping this server uses.
        dense_size: number of dense parameters (all variables flattened).
    """

    def __init__(self, comm, config, roles, shard, dense_size):
        self.comm = comm
        self.mpi = comm.MPI
        self.config = config
        self.roles = roles
        self.shard = shard
        self.index = roles.server_index(comm.rank)
        start, stop = dense_chunks(dense_size, roles.num_servers)[self.index]
        self.chunk = (int(start), int(stop))
        self.dense = np.empty(stop - start, dtype=np.float32)
        self.optimizer = NumpyDenseOptimizer(config.effective_dense_optimizer,
                                             config.effective_dense_learning_rate, stop - start)
        self.num_tables = len(shard.tables)
        self.clock = np.full(roles.num_workers, -1, dtype=np.int64)   # last pushed step per worker
        self.last_pull = {}          # worker -> (step, keys, counts): a push reuses its pull's keys
        self.pending_pulls = []      # (worker, step) waiting for the consistency condition
        self.bsp_buffer = {}         # step -> list of (keys, counts, row grads, dense grads)
        self.outstanding = []        # (request, buffers) of non-blocking replies
        self.done = 0
        self.at_consistent_point = []   # workers waiting at a checkpoint / delta step

    # ------------------------------------------------------------------ main loop
    def run(self, start_step=0, on_consistent_point=None):
        """Serve until every worker has sent DONE and every push is applied.

        Args:
            start_step: the first step the workers train (after a resume: every worker's
                clock starts there, as if it had pushed the steps before).
            on_consistent_point: ``f(step)`` run when every worker waits at ``step`` (a
                checkpoint or delta export, collective with the workers).
        """
        comm = self.comm.exchange
        comm.Recv(self.dense, source=0, tag=TAG_INIT_DENSE)
        t = np.empty(1, dtype=np.int64)
        slots = self.optimizer.slot_matrix()
        comm.Recv(t, source=0, tag=TAG_INIT_OPTIMIZER)
        comm.Recv(slots, source=0, tag=TAG_INIT_OPTIMIZER)
        self.optimizer.load(int(t[0]), slots)
        self.clock[:] = start_step - 1
        head = np.empty(HEADER_LEN, dtype=np.int64)
        status = self.mpi.Status()
        while self.done < self.roles.num_workers:
            comm.Recv(head, source=self.mpi.ANY_SOURCE, tag=TAG_HEADER, status=status)
            op, step, worker, num_keys = (int(x) for x in head)
            source = status.Get_source()
            if op == OP_PULL:
                counts = np.empty(self.num_tables, dtype=np.int64)
                comm.Recv(counts, source=source, tag=TAG_COUNTS)
                keys = np.empty(num_keys, dtype=np.int64)
                comm.Recv(keys, source=source, tag=TAG_KEYS)
                self.last_pull[worker] = (step, keys, counts)
                self.pending_pulls.append((worker, step))
            elif op == OP_PUSH:
                pull_step, keys, counts = self.last_pull.pop(worker)
                assert pull_step == step, f"worker {worker} pushed step {step} after pulling {pull_step}"
                row_grads = np.empty((num_keys, self.shard.dim), dtype=np.float32)
                comm.Recv(row_grads, source=source, tag=TAG_ROW_GRADS)
                dense_grads = np.empty_like(self.dense)
                comm.Recv(dense_grads, source=source, tag=TAG_DENSE_GRADS)
                self._on_push(worker, step, keys, counts, row_grads, dense_grads)
            elif op == OP_DONE:
                self.done += 1
            elif op == OP_CONSISTENT_POINT:
                self._on_consistent_point(worker, step, on_consistent_point)
            self._serve_ready_pulls()
            self._reap_replies()
        for request, _ in self.outstanding:
            request.Wait()
        self._send_final_dense()

    def _on_consistent_point(self, worker, step, action):
        self.at_consistent_point.append(worker)
        if len(self.at_consistent_point) < self.roles.num_workers:
            return
        # every worker pushed steps < step and waits: nothing may be half-applied now
        assert not self.bsp_buffer and not self.pending_pulls and not self.last_pull, \
            f"server {self.index}: steps in flight at the consistent point {step}"
        for request, _ in self.outstanding:
            request.Wait()
        self.outstanding = []
        self.at_consistent_point = []
        if action is not None:
            action(step)

    def dense_state(self):
        """(chunk start, chunk stop, dense values, optimizer t, optimizer slot matrix)."""
        return (*self.chunk, self.dense.copy(), self.optimizer.t, self.optimizer.slot_matrix())

    # ------------------------------------------------------------------ pushes
    def _on_push(self, worker, step, keys, counts, row_grads, dense_grads):
        self.shard.row_grads_applied += len(keys)
        if self.config.sync == Sync.BSP:
            batch = self.bsp_buffer.setdefault(step, [])
            batch.append((worker, keys, counts, row_grads, dense_grads))
            self.clock[worker] = step
            if len(batch) == self.roles.num_workers:
                batch.sort(key=lambda item: item[0])   # worker order: deterministic sums
                self._apply_rows([b[1:4] for b in batch], step)
                self.optimizer.apply(self.dense, np.sum([b[4] for b in batch], axis=0))
                del self.bsp_buffer[step]
                self.shard.applied_through = step
                self.shard.evict(step)
        else:
            self._apply_rows([(keys, counts, row_grads)], step)
            self.optimizer.apply(self.dense, dense_grads)
            self.clock[worker] = step
            self.shard.applied_through = int(self.clock.min())
            self.shard.evict(step)

    def _apply_rows(self, pushes, step):
        """Apply row gradients; the same key from several pushes is summed into one update."""
        for t, table in enumerate(self.shard.tables):
            keys, grads = [], []
            for push_keys, counts, row_grads in pushes:
                start = int(counts[:t].sum())
                keys.append(push_keys[start:start + counts[t]])
                grads.append(row_grads[start:start + counts[t]])
            keys = np.concatenate(keys)
            if len(keys):
                table.apply_gradients(keys, np.concatenate(grads), step=step)

    # ------------------------------------------------------------------ pulls
    def _may_serve(self, step):
        sync = self.config.sync
        if sync == Sync.ASP:
            return True
        slowest = int(self.clock.min())
        if sync == Sync.BSP:
            return self.shard.applied_through >= step - 1
        return slowest >= step - self.config.staleness - 1

    def _serve_ready_pulls(self):
        still_waiting = []
        for worker, step in self.pending_pulls:
            if self._may_serve(step):
                self._serve(worker, step)
            else:
                still_waiting.append((worker, step))
        self.pending_pulls = still_waiting

    def _serve(self, worker, step):
        _, keys, counts = self.last_pull[worker]
        rows = np.empty((len(keys), self.shard.dim), dtype=np.float32)
        versions = np.empty(len(keys), dtype=np.int64)
        start = 0
        for t, table in enumerate(self.shard.tables):
            stop = start + int(counts[t])
            if stop > start:
                table.lookup_or_insert(keys[start:stop], out=rows[start:stop], step=step,
                                       versions=versions[start:stop])
            start = stop
        self.shard._record_staleness(step, versions)
        dense = self.dense.copy()
        comm = self.comm.exchange
        self.outstanding.append((comm.Isend(rows, dest=worker, tag=TAG_REPLY_ROWS), rows))
        self.outstanding.append((comm.Isend(dense, dest=worker, tag=TAG_REPLY_DENSE), dense))

    def _reap_replies(self):
        self.outstanding = [(r, b) for r, b in self.outstanding if not r.Test()]

    def _send_final_dense(self):
        """After the last push of every worker: the final dense chunk to every worker."""
        requests = [self.comm.exchange.Isend(self.dense, dest=w, tag=TAG_REPLY_DENSE)
                    for w in range(self.roles.num_workers)]
        self.mpi.Request.Waitall(requests)
