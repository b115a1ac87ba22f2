"""A live serving model: one model-worker thread runs batched predictions and applies exports
between model calls; a follower thread watches the export directory.

What lives here: :class:`LiveModel`. What does not: choosing and verifying exports
(hybridps.serving.follower), raw values -> inputs (hybridps.serving.inputs), HTTP and metrics
(hybridps.serving.server).

Versions swap atomically: the worker thread alone calls the model and changes it, so a model
call (one batch of requests) runs entirely on one version, and every request of the batch is
answered with that version. A delta's tombstones, rows, dense variables and step are applied
by the worker between two model calls. A full export of another model (or the first one) is
built into a new module by the follower thread, traced on one row, and swapped in by the
worker; a full export of the held model replaces its rows in place. Nothing is written to
disk: a server killed at any point rebuilds its version from the export directory.
"""
import dataclasses
import queue
import sys
import threading
import time

import numpy as np

from hybridps.errors import HybridPSError
from hybridps.export.delta import apply_export
from hybridps.serving.follower import ExportFollower, ServedVersion
from hybridps.serving.inputs import serving_inputs

_STOP = object()


@dataclasses.dataclass
class _Predict:
    schema: object
    inputs: dict
    rows: int
    deliver: object            # deliver(predictions or None, version, error or None)


@dataclasses.dataclass
class _Update:
    loaded: object
    module: object = None      # a new module to swap in (else: apply onto the held one)
    schema: object = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def log(message):
    sys.stderr.write(f"[hybridps serve] {message}\n")
    sys.stderr.flush()


def concat_inputs(parts):
    """One batch of serving inputs from several (lists padded with -1 to the widest)."""
    out = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if arrays[0].ndim == 2 and name not in ("dense", "keys"):
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1) for a in arrays]
        out[name] = np.concatenate(arrays, axis=0)
    return out


class LiveModel:
    """The served model of an export directory, kept current (module doc).

    Args:
        root: the export directory.
        poll_seconds: how often the follower looks for new exports.
        max_batch_rows: rows of one model call at most (requests waiting together share one).
        apply_pause: seconds to sleep inside each delta apply (a testing aid,
            HYBRIDPS_SERVE_APPLY_DELAY).
        on_apply(version, loaded), on_refusal(refusal), on_batch(rows, requests): hooks for
            metrics.
        model: the operator's ``--model``: the user build function that rebuilds an export of a
            user model (it must be the one recorded); None serves built-in models only.
    """

    def __init__(self, root, *, poll_seconds=0.3, max_batch_rows=4096, apply_pause=0.0,
                 on_apply=None, on_refusal=None, on_batch=None, model=None):
        self.root, self.poll_seconds, self.max_batch_rows = root, poll_seconds, max_batch_rows
        self.apply_pause = apply_pause
        self.on_apply = on_apply or (lambda version, loaded: None)
        self.on_batch = on_batch or (lambda rows, requests: None)
        self._on_refusal = on_refusal or (lambda refusal: None)
        self.model = model
        self.follower = ExportFollower(root, on_refusal=self._refused, model=model)
        self.module = self.schema = self.version = None
        self._queue = queue.Queue()
        self._stopped = threading.Event()
        self._threads = []

    # ------------------------------------------------------------------ life cycle
    def catch_up(self):
        """Load the newest full export and apply what follows it, in this thread (before
        :meth:`start`); returns the version held (None: no full export yet)."""
        while True:
            update = self._prepare()
            if update is None:
                return self.version
            self._do_update(update)

    def start(self):
        for target, name in ((self._work, "hybridps-model-worker"), (self._follow, "hybridps-follower")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self):
        self._stopped.set()
        self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=10)

    # ------------------------------------------------------------------ requests
    def predict(self, schema, inputs, rows, deliver):
        """Queue one request (inputs built for ``schema``); ``deliver(predictions, version,
        error)`` is called from the worker thread: ``predictions`` the probabilities (rows,) of
        a one-task model, {task: (rows,)} of a model of several tasks."""
        self._queue.put(_Predict(schema, inputs, rows, deliver))

    # ------------------------------------------------------------------ the worker thread
    def _work(self):
        pending = None
        while True:
            item, pending = pending or self._queue.get(), None
            if item is _STOP:
                return
            if isinstance(item, _Update):
                self._do_update(item)
                continue
            batch, rows = [item], item.rows
            while rows < self.max_batch_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(more, _Predict):
                    pending = more
                    break
                batch.append(more)
                rows += more.rows
            self._run_batch(batch)

    def _run_batch(self, batch):
        import tensorflow as tf
        module, schema, version = self.module, self.schema, self.version
        stale = [p for p in batch if p.schema is not schema]
        for p in stale:
            p.deliver(None, version, HybridPSError("the model changed while the request waited; "
                                                   "send it again"))
        # the schema's tasks (hybridps.export.saved_model.task_names_of); None: one label
        tasks = module.task_names if module is not None else None
        for p in batch:
            if p.schema is schema and not p.rows:
                p.deliver(_empty_predictions(tasks), version, None)
        batch = [p for p in batch if p.schema is schema and p.rows]
        if not batch:
            return
        try:
            inputs = concat_inputs([p.inputs for p in batch])
            names = ["dense"] + (["keys"] if schema.preset == "criteo" else [f.name for f in schema.sparse])
            out = module.serve(*[tf.constant(inputs[n]) for n in names])
            predictions = ({task: out[task].numpy() for task in tasks} if tasks
                           else out["probability"].numpy())
        except Exception as exc:      # a TF error must not stop the worker: report it
            for p in batch:
                p.deliver(None, version, exc)
            return
        self.on_batch(sum(p.rows for p in batch), len(batch))
        start = 0
        for p in batch:
            p.deliver(_rows_of(predictions, start, p.rows), version, None)
            start += p.rows

    def _do_update(self, update):
        loaded = update.loaded
        try:
            started = time.perf_counter()
            if update.module is not None:
                self.module, self.schema = update.module, update.schema
            else:
                if self.apply_pause:
                    log(f"applying {loaded.manifest.get('kind', 'delta')} {_name(loaded)} (testing aid "
                        f"HYBRIDPS_SERVE_APPLY_DELAY: pausing {self.apply_pause}s inside the apply)")
                apply_export(self.module, loaded, pause_seconds=self.apply_pause)
            manifest = loaded.manifest
            self.version = ServedVersion(
                sequence=int(loaded.sequence), step=loaded.to_step, position=manifest.get("position"),
                applied_at=time.time(), kind=loaded.kind, export=_name(loaded),
                model_hash=manifest.get("model_hash") or "")
            rows = sum(len(k) for k, _ in loaded.rows)
            tombstones = sum(len(t) for t in loaded.tombstones)
            log(f"applied {_name(loaded)}: version {self.version.sequence}, step {self.version.step}, "
                f"{rows} rows" + (f", {tombstones} tombstones" if loaded.kind == "delta" else "")
                + f" in {1000 * (time.perf_counter() - started):.0f} ms")
            self.on_apply(self.version, loaded)
        except Exception as exc:          # keep serving the version held
            self.follower._refuse(_entry_of(loaded), f"could not be applied: {exc}")
        finally:
            update.done.set()

    # ------------------------------------------------------------------ the follower thread
    def _follow(self):
        while not self._stopped.is_set():
            try:
                update = self._prepare()
            except Exception as exc:      # never let the follower die
                log(f"error while following {self.root}: {type(exc).__name__}: {exc}")
                update = None
            if update is None:
                self._stopped.wait(self.poll_seconds)
                continue
            self._queue.put(update)
            while not update.done.wait(0.5):
                if self._stopped.is_set():
                    return

    def _prepare(self):
        """The next update (loaded; with a new module when one must be built), or None."""
        loaded = self.follower.next_export(self.version, self.module)
        if loaded is None:
            return None
        if loaded.kind == "full" and not self._same_model(loaded):
            from hybridps.export.saved_model import serving_module_of
            from hybridps.schema import schema_from_dict
            module = serving_module_of(loaded.manifest, loaded.dense, loaded.rows, loaded.to_step,
                                       loaded.path, self.model)
            schema = schema_from_dict(loaded.manifest["schema"]) if loaded.manifest.get("schema") else None
            if schema is None:
                from hybridps.checkpoint.format import schema_of
                schema = schema_of(loaded.manifest)
            _warm_up(module, schema)
            return _Update(loaded, module, schema)
        return _Update(loaded)

    def _same_model(self, loaded):
        if self.module is None:
            return False
        held = self.module.model_hash.numpy().decode()
        dims = [int(t["dim"]) for t in loaded.manifest["tables"]]
        return bool(held) and held == loaded.manifest.get("model_hash") and dims == list(self.schema.dims)

    def _refused(self, refusal):
        held = self.version
        log(f"refused {refusal.export}: {refusal.reason} (serving version "
            f"{held.sequence if held else None}, step {held.step if held else None})")
        self._on_refusal(refusal)


def _empty_predictions(tasks):
    empty = np.empty(0, np.float32)
    return {task: empty for task in tasks} if tasks else empty


def _rows_of(predictions, start, rows):
    """Rows ``start .. start + rows`` of predictions (an array, or {task: array})."""
    if isinstance(predictions, dict):
        return {task: values[start:start + rows] for task, values in predictions.items()}
    return predictions[start:start + rows]


def _warm_up(module, schema):
    import tensorflow as tf
    inputs = serving_inputs(schema, {}, 1)
    names = ["dense"] + (["keys"] if schema.preset == "criteo" else [f.name for f in schema.sparse])
    module.serve(*[tf.constant(inputs[n]) for n in names])


def _name(loaded):
    import os
    return os.path.basename(os.path.normpath(loaded.path))


def _entry_of(loaded):
    from hybridps.export.delta import ExportEntry
    return ExportEntry(int(loaded.sequence or 0), loaded.kind, loaded.from_step, loaded.to_step, loaded.path)
