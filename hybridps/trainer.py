"""The training loop: data -> pull -> TF step -> dense step + push; metrics at the end.

What lives here: :class:`Trainer`, which builds the data source, the model, the sharded
embedding and a backend from a TrainConfig, checks that every rank runs the same config, and
runs the steps. It talks to the backend only through ``pull`` / ``push`` / ``dense_step``
(hybridps.backend), so it does not know whether parameters live in the collective shards or
on parameter servers. What does not: MPI details (hybridps.comm), the exchange
(hybridps.embedding), the models' math (hybridps.models).

The TF step is one tf.function with a fixed input signature (``None`` for the batch and the
number of unique rows), so it is traced once. It takes the step's unique rows and the
(B, F) inverse index, gathers the (B, F, dim) embeddings inside the tape, and returns the
gradient w.r.t. the unique rows: TF sums the gradients of repeated keys (the gather's
gradient), so the push sends one summed row per unique key.
"""
import gc
import os
import sys
import time

import numpy as np

from hybridps import config as config_module
from hybridps import watchdog
from hybridps.config import Mode, Sync
from hybridps.errors import ConfigError
from hybridps.metrics import AUCAccumulator, PhaseTimer, Progress, write_summary


def configure_tensorflow(threads):
    """Thread pools of ``threads`` (intra and inter op) and quiet logs; call before any TF op."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already initialised in this process (tests); keep the first setting
    return tf


def horovod_cycle_time_ms(config):
    """Horovod's negotiation cycle for this run, unless HOROVOD_CYCLE_TIME is set.

    Horovod's background thread negotiates with every rank once per cycle, with blocking MPI
    calls that busy-poll. At Horovod's default of 1 ms that negotiation delayed the sparse
    exchange's collectives (alltoallv of 220 KB, 2 ranks on 2 cores: p90 latency 3.0 ms against
    0.06 ms without Horovod, 0.12 ms at 5 ms and 0.06 ms at 20 ms). BSP hands the dense allreduce
    to a thread that overlaps it with the sparse push and pull (hybridps.sync.bsp), so a 10 ms
    cycle adds no latency there: BSP ran 9% faster than at 1 ms (134k against 123k samples/s,
    median of 4 runs of the DeepFM benchmark). Under SSP the dense update is on the critical
    path of every step (the step waits for it), so it keeps Horovod's 1 ms.
    """
    if config.mode == Mode.COLLECTIVE and config.sync == Sync.SSP:
        return 1.0
    return 10.0


def default_tf_threads(config, local_size):
    """config.tf_threads, else HYBRIDPS_TF_THREADS, else the cores of this node per local rank."""
    if config.tf_threads:
        return config.tf_threads
    from_env = config_module.env_tf_threads()
    if from_env:
        return from_env
    return max(1, (os.cpu_count() or 1) // max(local_size, 1))


class Trainer:
    """Trains one model on one process of an MPI job (or alone).

    Example::

        config = make_config(overrides={"model": "deepfm", "steps": 50})
        summary = Trainer(config).run()      # under `mpirun -np 2 hybridps train ...` too
        print(summary["auc"])
    """

    def __init__(self, config, comm=None):
        from hybridps import comm as comm_module
        self.config = config
        # PS mode moves dense parameters through the servers: no Horovod, so no idle
        # negotiation thread competing with the PS traffic.
        self.comm = comm or comm_module.init(with_horovod=config.mode == Mode.COLLECTIVE,
                                             horovod_cycle_time_ms=horovod_cycle_time_ms(config))
        watchdog.configure(config.watchdog_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.tf = configure_tensorflow(default_tf_threads(config, self.comm.local_size))
        self._check_same_config()
        from hybridps.shared_dir import require_shared   # checkpoints need one directory for all
        require_shared(self.comm, {"--checkpoint-dir": config.checkpoint_dir,
                                   "--delta-export-dir": config.delta_export_dir})
        self._build()
        self.start_step = 0
        self.resume_messages = []
        if config.resume:
            from hybridps import checkpoint
            self.start_step = checkpoint.resume_trainer(self, log=self._log_resume)
            # the checkpoint holds every update of the steps before start_step
            self.sharded.applied_through = self.start_step - 1
        self.delta_exporter = None
        if config.delta_export_dir and config.delta_every:
            from hybridps.export import DeltaExporter
            self.delta_exporter = DeltaExporter.for_trainer(self, start_step=self.start_step)

    # ------------------------------------------------------------------ construction
    def _log_resume(self, message):
        """Resume messages (fallbacks to an older checkpoint included): kept and shown on rank 0."""
        self.resume_messages.append(message)
        if self.rank == 0:
            sys.stderr.write(f"[hybridps] checkpoint: {message}\n")
            sys.stderr.flush()

    def _check_same_config(self):
        mine = config_module.config_hash(self.config)
        hashes = self.comm.allgather_object(mine)
        differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differing:
            raise ConfigError(
                f"ranks {differing} run a different effective config than rank 0 (config hash "
                f"{hashes[0][:12]} on rank 0, {hashes[differing[0]][:12]} on rank {differing[0]}). "
                f"Give every rank the same --config file and flags.")

    def _build(self):
        from hybridps.data import make_dataset
        from hybridps.dense import DenseSync
        from hybridps.embedding import ShardedEmbedding
        from hybridps.models import build_model
        from hybridps.sync import make_collective_backend
        c = self.config
        # PS mode: the last num_servers ranks serve; the workers read the data exactly as the
        # same number of collective ranks would, so the two modes see identical batches.
        self.roles = None
        self.is_server = False
        self.compute_ranks = self.world_size
        if c.mode == Mode.PS:
            from hybridps.ps import PSRoles
            self.roles = PSRoles(self.world_size, c.num_servers)
            self.is_server = self.roles.is_server(self.rank)
            self.compute_ranks = self.roles.num_workers
        synthetic_options = (dict(num_fields=c.num_fields, num_dense=c.num_dense,
                                  vocab_size=c.vocab_size, zipf_a=c.zipf_a)
                             if c.data == "synthetic" else {})
        data_rank = 0 if self.is_server else self.rank
        self.dataset = make_dataset(c.data, rank=data_rank, world_size=self.compute_ranks, seed=c.seed,
                                    on_bad_line=c.on_bad_line, **synthetic_options)
        self.num_fields = getattr(self.dataset, "num_fields", c.num_fields)
        self.num_dense = getattr(self.dataset, "num_dense", c.num_dense)
        if c.table_groups is not None or c.table_layout != "shared":
            if self.num_fields != c.num_fields:
                raise ConfigError(f"the data has {self.num_fields} categorical fields but the config "
                                  f"says num_fields={c.num_fields}; set num_fields to match")
        groups = config_module.table_groups(
            c if self.num_fields == c.num_fields else _with_fields(c, self.num_fields))
        self.model = build_model(c.model, num_fields=self.num_fields, num_dense=self.num_dense,
                                 dim=c.dim, hidden=tuple(c.hidden), cross_layers=c.cross_layers,
                                 seed=c.seed)
        self.sharded = ShardedEmbedding(self.comm, c, groups)
        if c.mode == Mode.PS:
            from hybridps.ps import ParameterServer, PSWorkerBackend
            variables = self.model.trainable_variables
            if self.is_server:
                dense_size = sum(int(np.prod(v.shape)) for v in variables)
                self.server = ParameterServer(self.comm, c, self.roles, self.sharded, dense_size)
                self.backend = None
            else:
                self.backend = PSWorkerBackend(self.comm, self.roles, self.sharded, variables,
                                               c.effective_dense_optimizer,
                                               c.effective_dense_learning_rate)
        else:
            self.dense = DenseSync(self.model.trainable_variables, c.effective_dense_optimizer,
                                   c.effective_dense_learning_rate, self.world_size)
            self.backend = make_collective_backend(c, self.comm, self.sharded, self.dense)
        self.compute_step = make_compute_step(self.tf, self.model, self.num_fields, self.num_dense, c.dim)

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Train ``config.steps`` steps; returns the summary dict (also written to metrics_out)."""
        c, tf = self.config, self.tf
        global_batch = float(c.batch_size * self.compute_ranks)
        timer = PhaseTimer()
        auc = AUCAccumulator()
        auc_from_step = int(c.steps * (1.0 - c.auc_window))
        local_loss_sums = np.zeros(c.steps, dtype=np.float64)
        if self.is_server:   # serve until every worker is done, then join the metric reductions
            started = time.perf_counter()
            self.server.run(start_step=self.start_step, on_consistent_point=self._at_step_boundary)
            self._at_end_of_training()
            return self._summarize(timer, auc, local_loss_sums, 0, 0, started, None, started)
        progress = Progress(c.steps, enabled=c.progress and self.rank == 0, log_every=c.log_every)
        keys_sent = keys_received = 0
        first = self.start_step
        batches = self.dataset.iter_batches(c.batch_size, c.steps - first)
        if c.loader_delay_ms > 0 and self.rank == c.delay_rank:
            batches = _delayed(batches, c.loader_delay_ms / 1000.0)
        fences = self._consistent_points()
        from hybridps import exchange_trace        # benchmarks: HYBRIDPS_EXCHANGE_TRACE
        exchange_trace.start()
        self.backend.start(batches, start_step=first, fence_steps=fences)
        steady_start = None
        started = time.perf_counter()
        timer.start()
        for step in range(first, c.steps):
            watchdog.mark("step")              # exchange traces only (benchmarks)
            if step == first + c.warmup_steps:
                freeze_python_heap()
                steady_start = time.perf_counter()
                timer.restart()
                watchdog.mark("steady_start")
            if step == c.fail_at_step and self.rank == c.fail_rank:
                raise RuntimeError(f"injected failure at step {step} on rank {self.rank} "
                                   f"(fail_at_step testing aid)")
            batch, plan, unique_rows = self.backend.pull(step)
            timer.mark("pull")
            loss_sum, logits, dense_grads, row_grads = self.compute_step(
                batch.dense, unique_rows, plan.inverse, batch.labels, tf.constant(global_batch))
            row_grads = row_grads.numpy()
            timer.mark("compute")
            self.backend.dense_step(dense_grads, step)
            timer.mark("dense")
            self.backend.push(plan, row_grads, step)
            timer.mark("push")
            local_loss_sums[step] = float(loss_sum)
            keys_sent += plan.keys_sent
            keys_received += plan.keys_received
            if step >= auc_from_step:
                auc.update(batch.labels, 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64))))
            if step + 1 in fences:
                self.backend.at_consistent_point(step + 1, lambda: self._at_step_boundary(step + 1))
            if self.rank == 0 and c.progress:
                elapsed = time.perf_counter() - started
                progress.update(step, local_loss_sums[step] / c.batch_size,
                                (step + 1 - first) * global_batch / max(elapsed, 1e-9))
        self.backend.finish()     # every pushed gradient and dense update is applied after this
        finished = time.perf_counter()
        watchdog.mark("train_end")
        self._at_end_of_training()
        return self._summarize(timer, auc, local_loss_sums, keys_sent, keys_received,
                               started, steady_start, finished)

    def _consistent_points(self):
        """Steps (counted as completed steps) after which a checkpoint or delta is written."""
        c, points = self.config, set()
        for every in ((c.checkpoint_every if c.checkpoint_dir else 0),
                      (c.delta_every if self.delta_exporter is not None else 0)):
            if every:
                points.update(range(every, c.steps, every))
        return points

    def _at_step_boundary(self, completed, end=False):
        """Checkpoint and delta export after ``completed`` steps (the tables are consistent).

        Collective over every rank, servers included (they call it from their serving loop).
        In PS mode the dense state lives on the servers: it is first gathered into rank 0's
        model and a Keras optimizer, which the checkpoint and the delta then save.
        """
        c = self.config
        save = bool(c.checkpoint_dir) and (end or bool(c.checkpoint_every
                                                       and completed % c.checkpoint_every == 0))
        if not save and self.delta_exporter is None:
            return
        dense_optimizer = None         # collective: save_trainer takes self.dense.optimizer
        if self.roles is not None:
            from hybridps.ps.dense_state import gather_to_keras
            dense_optimizer = gather_to_keras(self)
        if save:
            from hybridps import checkpoint
            checkpoint.save_trainer(self, completed, dense_optimizer=dense_optimizer)
        if self.delta_exporter is not None:
            self.delta_exporter.maybe_export(completed)

    def _at_end_of_training(self):
        """The final checkpoint and delta (every rank; after the backend's finish)."""
        self._at_step_boundary(self.config.steps, end=True)

    # ------------------------------------------------------------------ reporting
    def _summarize(self, timer, auc, local_loss_sums, keys_sent, keys_received,
                   started, steady_start, finished):
        c = self.config
        global_batch = c.batch_size * self.compute_ranks
        losses = self.comm.allreduce_sum(local_loss_sums)[self.start_step:] / global_batch
        positives = self.comm.allreduce_sum(auc.positives)
        negatives = self.comm.allreduce_sum(auc.negatives)
        steps_run = c.steps - self.start_step
        steady_steps = steps_run - c.warmup_steps if steady_start is not None else steps_run
        steady_seconds = finished - (steady_start if steady_start is not None else started)
        slowest = float(self.comm.allreduce_max(np.array([steady_seconds]))[0])
        stats = self.backend.stats() if self.backend is not None else {
            "bytes_sent": self.sharded.bytes_sent, "bytes_received": self.sharded.bytes_received,
            "table_rows": self.sharded.table_sizes()}
        volume = self.comm.allreduce_sum(np.array(
            [keys_sent, keys_received, stats["bytes_sent"], stats["bytes_received"]], dtype=np.int64))
        rows = self.comm.allreduce_sum(np.array(stats["table_rows"], dtype=np.int64))
        phases = timer.per_step_ms(steady_steps)
        phase_max = self.comm.allreduce_max(np.array(list(phases.values())))
        summary = {
            "steps": c.steps, "ranks": self.world_size, "global_batch_size": global_batch,
            "computing_ranks": self.compute_ranks,
            "num_servers": c.num_servers if c.mode == Mode.PS else 0,
            "samples_per_s": steady_steps * global_batch / max(slowest, 1e-9),
            "final_loss": float(losses[-1]), "loss_trajectory": [float(x) for x in losses],
            "first_step": self.start_step, "resume_messages": self.resume_messages,
            "auc": AUCAccumulator.auc_from_histograms(positives, negatives),
            "auc_steps": [int(c.steps * (1.0 - c.auc_window)), c.steps],
            "mode": c.mode.value, "sync": c.sync.value, "staleness": c.staleness,
            "model": c.model, "data": c.data, "seed": c.seed,
            "elapsed_s": finished - started, "warmup_steps": c.warmup_steps,
            "exchange": {"keys_sent_per_step": float(volume[0]) / steps_run / self.compute_ranks,
                         "keys_received_per_step": float(volume[1]) / steps_run / self.compute_ranks,
                         "bytes_sent_per_step": float(volume[2]) / steps_run / self.compute_ranks,
                         "bytes_received_per_step": float(volume[3]) / steps_run / self.compute_ranks,
                         "per": "computing rank"},
            "table_rows": [int(r) for r in rows],
            **self._consistency_metrics(),
            **self._dense_lag_metrics(stats),
            "phase_ms_per_step_max_over_ranks": dict(zip(phases.keys(), map(float, phase_max))),
            "peak_rss_mb": float(self.comm.allreduce_max(np.array([_peak_rss_mb()]))[0]),
            "dense_parameters": int(sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)),
            "table_counters": self._table_counters(),
            "table_policies": self.sharded.policies,
            "config_hash": config_module.config_hash(c),
        }
        data_stats = getattr(self.dataset, "stats", None)
        if callable(data_stats):
            summary["data_stats"] = self._sum_over_ranks({} if self.is_server else data_stats())
        from hybridps import exchange_trace
        exchange_trace.write(self.rank, steady_steps, {"mode": c.mode.value, "sync": c.sync.value,
                                                       "server": self.is_server})
        if c.dump_state:
            self.dump_state(c.dump_state)
        if self.rank == 0 and c.metrics_out:
            write_summary(c.metrics_out, summary)
        return summary

    def _consistency_metrics(self):
        """Observed staleness (all owners' reads) and the pushed == applied gradient count."""
        from hybridps.embedding.sharded import STALENESS_BINS
        s = self.sharded
        histogram = self.comm.allreduce_sum(s.staleness_histogram)
        per_step = np.zeros(self.config.steps, dtype=np.int64)
        for step, value in s.staleness_max_by_step.items():
            per_step[step] = value
        per_step = self.comm.allreduce_max(per_step)[self.start_step:]
        counts = self.comm.allreduce_sum(np.array([s.row_grads_pushed, s.row_grads_applied], dtype=np.int64))
        reads = max(int(histogram.sum()), 1)
        nonzero = np.nonzero(histogram)[0]
        return {"staleness_max": int(nonzero.max()) if len(nonzero) else 0,
                "staleness_mean": float((histogram * np.arange(STALENESS_BINS)).sum() / reads),
                "staleness_histogram": [int(x) for x in histogram[:int(nonzero.max()) + 1]] if len(nonzero) else [0],
                "staleness_max_per_step": [int(x) for x in per_step],
                "row_grads_pushed": int(counts[0]), "row_grads_applied": int(counts[1])}

    def _dense_lag_metrics(self, stats):
        """How many of the latest steps' dense updates a TF step missed: max and mean over every
        step of every computing rank (collective mode; PS mode has no dense thread)."""
        if self.config.mode != Mode.COLLECTIVE:
            return {}
        worst, total, count = stats["dense_lag"]
        worst = int(self.comm.allreduce_max(np.array([worst], dtype=np.int64))[0])
        total, count = self.comm.allreduce_sum(np.array([total, count], dtype=np.int64))
        return {"dense_staleness_max": worst, "dense_staleness_mean": float(total) / max(int(count), 1)}

    def _table_counters(self):
        names = ("admitted_keys", "refused_inserts", "evicted_rows", "dropped_unadmitted_grads",
                 "dropped_missing_grads", "skipped_nonfinite_grads", "applied_row_updates")
        local = np.array([[t.counters()[n] for n in names] for t in self.sharded.tables], dtype=np.int64)
        total = self.comm.allreduce_sum(local)
        return [dict(zip(names, map(int, row))) for row in total]

    def _sum_over_ranks(self, stats):
        """Sum the integer counters of a small dict over ranks (ranks may hold different keys)."""
        total = {}
        for rank_stats in self.comm.allgather_object(
                {k: int(v) for k, v in stats.items() if isinstance(v, (int, np.integer))}):
            for key, value in rank_stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def dump_state(self, directory):
        """Write rank 0's dense weights and every rank's table shards as npz (tests, debugging)."""
        os.makedirs(directory, exist_ok=True)
        if self.rank == 0:
            np.savez(os.path.join(directory, "dense.npz"),
                     *[v.numpy() for v in self.model.trainable_variables])
        for t, shard in enumerate(self.sharded.export_shards()):
            np.savez(os.path.join(directory, f"table{t}.rank{self.rank}.npz"),
                     keys=shard["keys"], values=shard["values"], slots=shard["slots"])
        self.comm.barrier()


def freeze_python_heap():
    """Take every object alive now out of Python's cyclic garbage collector (gc.freeze).

    Called once the warm-up steps have traced the TF functions: the model, Keras and TF keep
    millions of long-lived objects, and every full collection walked all of them again (1.6 ms
    per step of the main thread here, measured with perf). Objects created later are collected
    as usual.
    """
    gc.collect()
    gc.freeze()


def _peak_rss_mb():
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _delayed(batches, seconds):
    """A slower data loader (testing aid): sleep before every batch."""
    for batch in batches:
        time.sleep(seconds)
        yield batch


def _with_fields(config, num_fields):
    import dataclasses
    return dataclasses.replace(config, num_fields=num_fields)


def make_compute_step(tf, model, num_fields, num_dense, dim):
    """The TF forward/backward on (dense, unique rows, inverse, labels), traced once.

    Returns a function -> (loss_sum, logits, dense_grads, unique_row_grads) where loss_sum is
    this rank's sum of sample losses and gradients are of (loss_sum / global_batch_size).
    """
    variables = model.trainable_variables

    @tf.function(input_signature=[
        tf.TensorSpec([None, num_dense], tf.float32), tf.TensorSpec([None, dim], tf.float32),
        tf.TensorSpec([None, num_fields], tf.int32), tf.TensorSpec([None], tf.float32),
        tf.TensorSpec([], tf.float32)])
    def compute_step(dense, unique_rows, inverse, labels, global_batch_size):
        with tf.GradientTape() as tape:
            tape.watch(unique_rows)
            embeddings = tf.gather(unique_rows, inverse)
            logits = model((dense, embeddings), training=True)
            loss_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            loss = loss_sum / global_batch_size
        grads = tape.gradient(loss, variables + [unique_rows])
        return loss_sum, logits, grads[:-1], tf.convert_to_tensor(grads[-1])

    return compute_step
