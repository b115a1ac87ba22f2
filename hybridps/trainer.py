"""The training loop: backend.pull -> TF step -> backend.dense_step + push, one PulledBatch a step.

What lives here: :class:`Trainer`, which builds a run from a TrainConfig (start-up checks, the
feature schema, the data source, the model, a backend from hybridps.backends.factory, the
checkpoint manager) and runs the steps, with checkpoints and delta exports at consistent
points. It talks to the backend only through the Backend interface (hybridps.backends.base),
so it does not know collective vs parameter server or BSP vs ASP: the step object a pull
returns goes to the TF step and back to the push unopened (the loop reads its batch only), and
the exchange's counters come from ``backend.stats()``. What does not: MPI details
(hybridps.comm), the exchange (hybridps.sparse), pooling and the loss (hybridps.step), the
models' math (hybridps.models), the metric reductions (hybridps.metrics.summary).
"""
import gc
import itertools
import sys
import time

import numpy as np

from hybridps import exchange_trace, startup, step_control, testing_hooks, watchdog
from hybridps.tf_runtime import configure_tensorflow, default_tf_threads
from hybridps.backends import factory
from hybridps.metrics import Progress, RunRecord, summarize_run, write_summary


class Trainer:
    """Trains one model on one process of an MPI job (or alone).

    Args:
        config: a TrainConfig (hybridps.config.make_config).
        comm: hybridps.comm.Comm (default: initialise MPI as the config needs).
        model_fn: the user's ``build(schema, config) -> tf.keras.Model`` (default: the config's
            ``model``, a built-in name or ``file.py:build``).

    Example::

        config = make_config(overrides={"model": "deepfm", "steps": 50})
        summary = Trainer(config).run()      # under `mpirun -np 2 hybridps train ...` too
        print(summary["auc"])
    """

    def __init__(self, config, comm=None, model_fn=None):
        from hybridps import comm as comm_module
        self.config = config
        with_horovod, cycle_ms = factory.communication(config)
        # MPI first, and the checks that need no TensorFlow: a config the ranks disagree on, an
        # output path that cannot be written or a rank setting out of range stops every rank
        # before Horovod imports TensorFlow (about 6 s of CPU per process)
        self.comm = comm or comm_module.init(with_horovod=False)
        watchdog.configure(config.watchdog_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.size
        startup.check_same_config(self.comm, config)
        startup.check_output_paths(self.comm, config)
        self.placement = factory.placement(config, self.world_size, self.rank)
        self.compute_ranks = self.placement.data_ranks
        testing_hooks.check_job(self.world_size, self.compute_ranks)
        if comm is None and with_horovod:       # a comm handed in comes as its caller set it up
            comm_module.init(with_horovod=True, horovod_cycle_time_ms=cycle_ms)
        self.tf = configure_tensorflow(default_tf_threads(config, self.comm.local_size))
        self._build(model_fn)
        self.start_step, self.resume_messages = 0, []
        if config.resume and self.checkpoints is not None:
            step, data_state, self.resume_messages = self.checkpoints.resume(self.backend.restore_target())
            self.backend.load_state(step)
            if data_state is not None and self.dataset is not None:
                self.dataset.restore(data_state)
            self.start_step = step
        self.deltas, self.saved_at, self.control = None, None, None
        self.held_out = self._held_out() if config.eval_data else None
        self.eval_log, self.eval_seconds = [], 0.0
        from hybridps.metrics.tensorboard import TensorBoardLog
        self.tensorboard = TensorBoardLog(self.tf, config.tensorboard_dir if self.rank == 0 else None)

    def _build(self, model_fn):
        from hybridps.checkpoint import CheckpointManager
        from hybridps.data import open_data, preset_shape
        from hybridps.models import build_model
        from hybridps.schema import build_schema
        from hybridps.sparse.layout import SparseLayout
        from hybridps.step import build_on_sample, make_train_step
        c, tf, p = self.config, self.tf, self.placement
        self.schema = build_schema(c, *preset_shape(c))
        self.dataset = (open_data(c, self.schema, rank=p.data_rank, world_size=p.data_ranks)
                        if p.computes else None)
        startup.check_data(self.comm, c, self.dataset)
        # the same initial weights on every rank count for models with unseeded initializers
        tf.keras.utils.set_random_seed(c.seed)
        self.model = (model_fn or (lambda schema, config: build_model(c.model, schema, config)))(self.schema, c)
        build_on_sample(tf, self.model, self.schema)
        self.layout = SparseLayout(self.schema)      # the one layout of the run's tables
        self.backend = factory.make_backend(c, self.comm, self.schema, self.model, self.layout)
        self.train_step = make_train_step(tf, self.model, self.layout, self.schema.num_dense,
                                          self.schema.tasks)
        self.checkpoints = CheckpointManager(c, self.schema, self.comm) if c.checkpoint_dir else None

    def _held_out(self):
        """The held-out data of ``eval_data`` (collective mode: every rank reads a share)."""
        import dataclasses
        from hybridps.inference import HeldOut
        from hybridps.step import make_predict_step
        c, p = self.config, self.placement
        self.predict_step = make_predict_step(self.tf, self.model, self.layout, self.schema.num_dense,
                                              self.schema.task_names)
        return HeldOut(self.comm, dataclasses.replace(c, data=c.eval_data), self.schema,
                       p.data_rank, p.data_ranks, c.batch_size, c.eval_batches)

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Train ``config.steps`` steps (0: until the stream ends or a stop is asked for); returns
        the summary dict (also written to metrics_out). The backend runs this rank's loop:
        :meth:`_train` on a computing rank, :meth:`_serve` on a PS server rank."""
        c = self.config
        record = RunRecord(steps=max(c.steps, self.start_step), start_step=self.start_step,
                           log_every=c.log_every)
        return self.backend.run(train=lambda: self._train(record), serve=lambda: self._serve(record))

    def _serve(self, record):
        """Serve until every worker is done, then join the reductions."""
        self.backend.serve(self.start_step, on_consistent_point=self._at_step_boundary)
        self._at_step_boundary(self.config.steps, end=True)
        self._release_checkpoint_dir()
        record.finished = time.perf_counter()
        return self._summarize(record)

    def _train(self, record):
        """The steps of a computing rank: pull -> TF step -> dense step -> push."""
        c, tf = self.config, self.tf
        last = c.steps or None                 # None: no end known in advance
        global_batch = tf.constant(float(c.batch_size * self.compute_ranks))
        auc_from_step = int(c.steps * (1.0 - c.auc_window))   # unbounded runs: every step
        progress = Progress(last, enabled=c.progress and self.rank == 0, log_every=c.log_every,
                            note=self.dataset.progress_note)
        first = self.start_step
        batches = self._batches(first, last)
        batches = testing_hooks.delayed_batches(batches, self.rank)     # tests: a straggler
        fences = self._consistent_points()
        exchange_trace.start()                 # benchmarks: HYBRIDPS_EXCHANGE_TRACE
        self.backend.start(batches, start_step=first, fence_steps=fences)
        timer = record.timer
        timer.start()
        completed = first
        steps = range(first, last) if last is not None else itertools.count(first)
        for step in testing_hooks.failing_steps(steps, self.rank):     # tests: a failing rank
            watchdog.set_step(step)
            exchange_trace.mark("step")        # exchange traces only (benchmarks)
            if step == first + c.warmup_steps:
                freeze_python_heap()
                record.steady_start = time.perf_counter()
                timer.restart()
                exchange_trace.mark("steady_start")
            pulled = self.backend.pull(step)
            if pulled is None:                 # the stream ended or a stop was agreed
                break
            timer.mark("pull")
            counts = self._label_counts(pulled.batch) if self.schema.labels else global_batch
            loss_sum, logits, dense_grads, row_grads = self.train_step(pulled, counts)
            if self.schema.labels:
                loss_sum, logits = self._reported_loss(loss_sum, counts), logits.numpy()
            row_grads = row_grads.numpy()
            timer.mark("compute")
            self.backend.dense_step(dense_grads, step)
            timer.mark("dense")
            self.backend.push(pulled, row_grads, step)
            timer.mark("push")
            batch = pulled.batch
            record.add_step(step, loss_sum, batch)
            self.tensorboard.train_step(step, record.last_loss_sum / c.batch_size,
                                        (step + 1 - first) * c.batch_size * self.compute_ranks
                                        / max(time.perf_counter() - record.started, 1e-9), c.log_every)
            if step >= auc_from_step:
                self._update_auc(record.auc, batch, logits)
            if step + 1 in fences:
                paused = self.eval_seconds
                self.backend.at_consistent_point(step + 1, lambda: self._at_step_boundary(step + 1))
                if record.steady_start is not None:     # evaluation is not training time
                    record.paused += self.eval_seconds - paused
            if self.rank == 0 and c.progress:
                elapsed = time.perf_counter() - record.started
                progress.update(step, record.last_loss_sum / c.batch_size,
                                (step + 1 - first) * c.batch_size * self.compute_ranks / max(elapsed, 1e-9))
            completed = step + 1
        self.backend.finish()     # every pushed gradient and dense update is applied after this
        record.finished = time.perf_counter()
        record.steps = completed
        exchange_trace.mark("train_end")
        self._at_step_boundary(completed, end=True)
        self._release_checkpoint_dir()
        self._report_stop(completed)
        summary = self._summarize(record)
        if self.control is not None:           # a stream source that failed: its error, now
            self.control.raise_failure(completed, c.checkpoint_dir)   # that the checkpoint is written
        return summary

    def _label_counts(self, batch):
        """Each task's present labels over every computing rank (float32 (T,))."""
        present = np.count_nonzero(~np.isnan(batch.label_matrix), axis=0).astype(np.float64)
        return self.backend.label_counts(present).astype(np.float32)

    def _reported_loss(self, loss_sums, counts):
        """This rank's share of the step's objective, scaled to a sum over a global batch as
        the one-label loss sum is (progress lines, the summary's loss curve)."""
        global_batch = self.config.batch_size * self.compute_ranks
        weights = np.array([t.loss_weight for t in self.schema.tasks])
        return float(np.sum(weights * loss_sums.numpy() / np.maximum(counts, 1.0)) * global_batch)

    def _update_auc(self, auc, batch, outputs):
        """The training AUC of the first task (when it is binary), over its present labels."""
        task = self.schema.tasks[0]
        if task.kind != "binary":
            return
        outputs = outputs if isinstance(outputs, np.ndarray) else outputs.numpy()
        scores = outputs.reshape(batch.size, -1)[:, 0].astype(np.float64)
        labels = batch.label_matrix[:, 0]
        present = ~np.isnan(labels)
        if not present.all():
            labels, scores = labels[present], scores[present]
        auc.update(labels, 1.0 / (1.0 + np.exp(-scores)))

    def _release_checkpoint_dir(self):
        """The last checkpoint is written: another job may use the directory now."""
        if self.checkpoints is not None:
            self.checkpoints.close()

    def _batches(self, first, last):
        """The batches of the steps from ``first`` (to ``last``, None: unbounded). Runs without
        a known end, on a stream, or with wall-clock deltas agree before every batch
        (hybridps.step_control): SIGTERM then stops every rank at the same step."""
        c = self.config
        count = None if last is None else last - first
        if last is None or self.dataset.streaming or c.delta_every_seconds or c.checkpoint_every_seconds:
            self.control = step_control.StepAgreement(self.comm, c.delta_every_seconds if c.delta_export_dir else 0,
                                                      c.stream_poll_s, c.checkpoint_every_seconds)
            self.control.on_idle_delta = self._delta_while_waiting
            step_control.enable_graceful_stop()
        return self.dataset.iter_batches(c.batch_size, count, control=self.control, start_step=first)

    def _report_stop(self, completed):
        if self.control is None or self.control.stopped_by is None or self.rank != 0:
            return
        where = f"; checkpoint in {self.config.checkpoint_dir}" if self.checkpoints is not None else ""
        sys.stderr.write(f"[hybridps] stopped after step {completed} ({self.control.stopped_by}){where}\n")
        sys.stderr.flush()

    def _consistent_points(self):
        """Steps (counted as completed steps) after which a checkpoint or delta is written:
        a membership test (``completed in points``), so nothing is O(steps) at start."""
        c = self.config
        everies = ((c.checkpoint_every if c.checkpoint_dir else 0),
                   (c.delta_every if c.delta_export_dir else 0),
                   (c.eval_every if c.eval_data else 0))
        return ConsistentPoints([every for every in everies if every], c.steps or None,
                                extra=self.control.timed_points if self.control is not None else ())

    def _at_step_boundary(self, completed, end=False):
        """Evaluation, checkpoint and delta export after ``completed`` steps (the tables are
        consistent).

        Collective over every rank, servers included (they call it from their serving loop).
        ``backend.state()`` gathers the dense state where it lives elsewhere (PS servers).
        """
        c = self.config
        save = self.checkpoints is not None and (end or bool(c.checkpoint_every and
                                                            completed % c.checkpoint_every == 0))
        timed = self.control is not None and completed in self.control.checkpoint_points
        save = self.checkpoints is not None and (save or timed)
        save = save and completed != self.saved_at       # a stream may end on a checkpoint step
        delta = bool(c.delta_export_dir and c.delta_every and completed % c.delta_every == 0)
        if self.control is not None and c.delta_export_dir:   # wall-clock deltas; the last one
            delta = delta or completed in self.control.delta_points or end
            delta = delta and (self.deltas is None or completed > self.deltas.last_step)
        if self.held_out is not None and (end or (c.eval_every and completed % c.eval_every == 0)):
            self._evaluate(completed)
        if not save and not delta:
            return
        state = self.backend.state()
        if save:
            self.checkpoints.save(completed, state,
                                  self.dataset.state() if self.dataset is not None else None)
            self.saved_at = completed
            if self.control is not None:
                self.control.checkpoint_written(completed)
        if delta:
            self._write_delta(completed, state)

    def _write_delta(self, completed, state):
        """The next delta (or full) export after ``completed`` steps (collective)."""
        self._delta_exporter(state).export(
            completed, position=self.dataset.state() if self.dataset is not None else None)
        if self.control is not None:
            self.control.delta_written()
            self.control.delta_points.discard(completed)

    def _delta_while_waiting(self, step):
        """A wall-clock delta fell due while every rank waits for the rows of ``step`` (a quiet
        stream): write it now if a step trained since the last export, so what was trained
        reaches serving without waiting for more data. Every rank decides alike: rank 0's clock
        came with the poll, the export step is shared. Called by the thread drawing batches."""
        exported = self.deltas.last_step if self.deltas is not None else self.start_step
        if step > exported:
            self.backend.at_idle_point(step, lambda: self._write_delta(step, self.backend.state()))

    def _evaluate(self, completed):
        """The held-out metrics of the model after ``completed`` steps (every computing rank):
        appended to the summary's ``eval`` list, printed and logged by rank 0."""
        from hybridps.evaluation import evaluation_metrics, metrics_line, predict_batches
        started = time.perf_counter()
        predicted = predict_batches(self.backend, self.predict_step, self.held_out.batches(), self.tf,
                                    self.schema.labels)
        metrics = evaluation_metrics(self.comm, predicted.scores, predicted.labels, predicted.groups,
                                     self.schema.labels)
        seconds = time.perf_counter() - started
        self.eval_seconds += seconds
        entry = {"step": int(completed), **metrics, "seconds": seconds}
        self.eval_log.append(entry)
        self.tensorboard.evaluation(completed, metrics)
        if self.rank == 0:                 # also with --no-progress, which hides the bar only
            sys.stderr.write(f"eval after step {completed}: {metrics_line(metrics)} ({metrics['rows']} rows, "
                             f"{seconds:.1f}s)\n")
            sys.stderr.flush()

    def _delta_exporter(self, state):
        if self.deltas is None:
            from hybridps.checkpoint import model_signature, signature_hash
            from hybridps.export import DeltaExporter, model_description
            c = self.config
            signature = model_signature(c, self.schema, state.tables, c.num_buckets)
            # the run's first export is a full one, then every full_export_every-th
            self.deltas = DeltaExporter(c.delta_export_dir, state.tables, comm=self.comm,
                                        model=state.model, every=c.delta_every,
                                        start_step=self.start_step,
                                        model_hash=signature_hash(signature),
                                        full_every=c.full_export_every,
                                        description=model_description(c, self.schema),
                                        position_fn=self.dataset.state if self.dataset is not None else None)
        return self.deltas

    # ------------------------------------------------------------------ reporting
    def _summarize(self, record):
        c = self.config
        summary = summarize_run(
            self.comm, c, self.schema, record, self.backend.stats(),
            compute_ranks=self.compute_ranks,
            dense_parameters=sum(int(np.prod(v.shape)) for v in self.model.trainable_variables),
            data_stats=self.dataset.stats() if self.dataset is not None else None,
            resume_messages=self.resume_messages)
        summary["stopped_by"] = self.control.stopped_by if self.control is not None else None
        if self.control is not None:
            summary["waited_for_data_s"] = self.control.waited_s
        if self.held_out is not None:
            summary["eval"] = self.eval_log
            summary["eval_seconds"] = self.eval_seconds
        self.tensorboard.run_summary(summary)
        self.tensorboard.close()
        steps_run = record.steps - self.start_step
        exchange_trace.write(self.rank, steps_run - c.warmup_steps if record.steady_start else steps_run,
                             {"mode": c.mode.value, "sync": c.sync.value, "server": not self.placement.computes})
        if c.dump_state:
            from hybridps.checkpoint.dump import dump_state
            state = self.backend.state()
            dump_state(c.dump_state, self.comm, self.model, state.tables)
        if self.rank == 0 and c.metrics_out:
            write_summary(c.metrics_out, summary)
        return summary


class ConsistentPoints:
    """Completed-step counts ``k`` with ``0 < k < steps`` that are a multiple of one of
    ``everies`` or in ``extra`` (points decided while training runs: wall-clock deltas),
    ``steps`` None: no end, as a membership test: ``k in points``."""

    def __init__(self, everies, steps, extra=()):
        self.everies, self.steps, self.extra = tuple(everies), steps, extra

    def __contains__(self, completed):
        return (0 < completed and (self.steps is None or completed < self.steps)
                and (any(completed % every == 0 for every in self.everies) or completed in self.extra))


def freeze_python_heap():
    """Take every object alive now out of Python's cyclic garbage collector (gc.freeze).

    Called once the warm-up steps have traced the TF functions: the model, Keras and TF keep
    millions of long-lived objects, and every full collection walked all of them again (1.6 ms
    per step of the main thread here, measured with perf). Objects created later are collected
    as usual.
    """
    gc.collect()
    gc.freeze()
