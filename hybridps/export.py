"""Export for serving: a SavedModel with its embeddings, and delta export of fresh rows.

What lives here: :func:`export_saved_model` (checkpoint -> TensorFlow SavedModel that maps raw
feature IDs to a click probability on one machine), :class:`DeltaExporter` (rows changed since
the previous delta, written while training continues) and :func:`apply_delta` (bring an
exported model forward by one delta). What does not: the checkpoint format and its
verification (hybridps.checkpoint), the models' math (hybridps.models).

The exported module (:class:`ServingModule`)
--------------------------------------------
* One ``tf.lookup.experimental.MutableHashTable`` per embedding table, int64 key -> float32
  row of ``dim`` (the value only; optimizer slots are not needed to serve). A mutable table
  rather than a static one so a delta can be applied in place. Its default value is a row of
  zeros: a key the training never admitted (min_count), never saw, or evicted reads zeros.
  (Training would give a never-seen key its key-seeded initial row, whose values are noise of
  scale init_std; zeros are the neutral choice for serving.)
* The model's variables (rebuilt with hybridps.models.build_model from the manifest, loaded
  from dense.npz), tracked as ``dense_variables``.
* ``serve(dense float32 [None, num_dense], keys int64 [None, num_fields]) -> {"probability",
  "logit"}``: each field's keys are looked up in its table (config table_groups/table_layout,
  recorded in the manifest), the rows stacked in field order, the model run in inference mode.
  Saved as the ``serving_default`` signature, so TF Serving and ``tf.saved_model.load`` both
  run it.
* ``apply_rows(keys, values, table_index)`` and ``assign_dense(values)``: the in-place update
  used by :func:`apply_delta`; ``step`` (int64) and ``model_hash`` (string) variables say which
  training step the module holds and which model it is.

Deltas
------
``DIR/delta-<from:010d>-<to:010d>/`` holds, per rank and table, the keys and values of the rows
whose ``last_update_step`` (the 0-based index of the training step that last changed or
inserted them) is ``>= from``, the model's dense variables after ``to`` completed steps, and a
signed manifest (step range, per-file sha256 and size). A delta is written like a checkpoint:
into a temporary directory, renamed when complete. Applying the deltas of a chain in order
onto a model exported from the checkpoint of step ``from`` of the first one gives the model
after ``to`` steps: :func:`apply_delta` refuses a delta whose ``from`` is not the module's
``step`` (a missing delta would silently lose updates) or whose model hash differs.
Rows evicted between two deltas are not deleted from the serving tables (they keep their last
value); a fresh full export drops them.

Two ways to apply: in a serving process, ``apply_delta(loaded_module, delta_dir)`` updates the
loaded module in place (no reload); for TF Serving, ``apply_delta(model_dir, delta_dir,
out_dir=BASE/<next version>)`` writes a new SavedModel version that the server picks up.
"""
import io
import os
import shutil
import time

import numpy as np

from hybridps import checkpoint as ckpt
from hybridps.errors import CheckpointError

DELTA_FORMAT = "hybridps-delta"
DELTA_PREFIX = "delta-"
DELTA_TMP_PREFIX = ".tmp-delta-"


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


# ---------------------------------------------------------------------------- SavedModel
def _field_groups(manifest):
    groups = manifest["model_signature"].get("field_groups")
    if groups is None:
        groups = [info["fields"] for info in manifest["tables"]]
    if any(g is None for g in groups):
        raise CheckpointError("the checkpoint does not record which fields use which table "
                              "(saved without field_groups); cannot export")
    return groups


def build_model_from_manifest(manifest):
    """The Keras model the checkpoint was trained with (fresh weights)."""
    info = manifest.get("model")
    if not info:
        raise CheckpointError("the checkpoint was saved without a config (no model description); "
                              "cannot rebuild the model")
    from hybridps.models import build_model
    return build_model(info["name"], num_fields=info["num_fields"], num_dense=info["num_dense"],
                       dim=info["dim"], hidden=tuple(info["hidden"]),
                       cross_layers=info["cross_layers"], seed=info["seed"])


def _make_serving_module_class(tf):
    class ServingModule(tf.Module):
        """A CTR model with its embedding tables, served from raw int64 feature keys."""

        def __init__(self, model, field_groups, dim, num_dense, tables_rows, step, model_hash):
            super().__init__(name="hybridps_serving")
            num_fields = sum(len(g) for g in field_groups)
            self.dense_variables = list(model.variables)
            self.tables = []
            for t, (keys, values) in enumerate(tables_rows):
                table = tf.lookup.experimental.MutableHashTable(
                    tf.int64, tf.float32, default_value=tf.zeros([dim], tf.float32), name=f"table_{t}")
                if len(keys):
                    table.insert(tf.constant(keys, tf.int64), tf.constant(values, tf.float32))
                self.tables.append(table)
            self.step = tf.Variable(int(step), dtype=tf.int64, trainable=False, name="step")
            self.model_hash = tf.Variable(model_hash, dtype=tf.string, trainable=False, name="model_hash")
            tables = self.tables
            groups = [np.asarray(g, dtype=np.int32) for g in field_groups]
            # rows come out grouped by table; this puts them back in field order
            field_order = np.argsort(np.concatenate(groups)).astype(np.int32)

            @tf.function(input_signature=[tf.TensorSpec([None, num_dense], tf.float32, name="dense"),
                                          tf.TensorSpec([None, num_fields], tf.int64, name="keys")])
            def serve(dense, keys):
                parts = [table.lookup(tf.gather(keys, fields, axis=1))
                         for table, fields in zip(tables, groups)]
                emb = parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)
                if len(parts) > 1:
                    emb = tf.gather(emb, field_order, axis=1)
                emb = tf.ensure_shape(emb, [None, num_fields, dim])
                logit = model((dense, emb), training=False)
                return {"logit": logit, "probability": tf.sigmoid(logit)}

            @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="keys"),
                                          tf.TensorSpec([None, dim], tf.float32, name="values"),
                                          tf.TensorSpec([None], tf.int32, name="table_index")])
            def apply_rows(keys, values, table_index):
                for t, table in enumerate(tables):
                    mask = tf.equal(table_index, t)
                    table.insert(tf.boolean_mask(keys, mask), tf.boolean_mask(values, mask))
                return tf.size(keys)

            variables = self.dense_variables

            @tf.function(input_signature=[[tf.TensorSpec(v.shape, v.dtype) for v in variables]])
            def assign_dense(values):
                for variable, value in zip(variables, values):
                    variable.assign(value)
                return tf.constant(len(variables))

            self.serve = serve
            self.apply_rows = apply_rows
            self.assign_dense = assign_dense

    return ServingModule


def build_serving_module(checkpoint):
    """The :class:`ServingModule` of a checkpoint (directory or root), not yet saved.

    Reads every table's rows (CRC-checked per bucket) and the dense state (sha256-checked).
    Returns:
        (module, manifest).
    """
    tf = _tf()
    ckpt_dir = ckpt.resolve_checkpoint(checkpoint)
    problems = ckpt.verify_checkpoint(ckpt_dir, level="quick")
    if problems:
        raise CheckpointError(f"cannot export the damaged checkpoint {ckpt_dir}: " + "; ".join(problems))
    manifest = ckpt.load_manifest(ckpt_dir)
    model = build_model_from_manifest(manifest)
    model_values, _ = ckpt.read_dense(ckpt_dir, manifest)
    if len(model_values) != len(model.variables):
        raise CheckpointError(f"{ckpt_dir}: {len(model_values)} dense variables saved, the rebuilt "
                              f"model has {len(model.variables)}")
    for variable, value in zip(model.variables, model_values):
        variable.assign(value)
    tables_rows = []
    for t in range(len(manifest["tables"])):
        rows = ckpt.read_table_rows(ckpt_dir, manifest, t)
        tables_rows.append((rows["keys"], rows["values"]))
    module = _make_serving_module_class(tf)(
        model, _field_groups(manifest), manifest["model"]["dim"], manifest["model"]["num_dense"],
        tables_rows, manifest["step"], manifest["model_hash"])
    return module, manifest


def _serving_signature(module):
    signatures = getattr(module, "signatures", None)
    if signatures and "serving_default" in signatures:
        return signatures["serving_default"]
    return module.serve.get_concrete_function()


def _save_atomically(tf, module, out_dir, overwrite):
    """tf.saved_model.save into OUT.tmp-<pid>, then rename to OUT (replacing it if allowed)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass overwrite=True (--overwrite) or another path "
                              f"(for TF Serving: a new version directory)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures={"serving_default": _serving_signature(module)})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    ckpt._fsync_dir(parent)
    return out_dir


def export_saved_model(checkpoint, out_dir, *, overwrite=False, deltas=()):
    """Write a SavedModel that serves the checkpoint's model from raw feature keys.

    Args:
        checkpoint: a checkpoint directory or a checkpoint root (its ``latest``).
        out_dir: the SavedModel directory (for TF Serving: ``BASE/<version>``).
        overwrite: replace an existing ``out_dir``.
        deltas: delta directories to apply, in order, before saving.
    Returns:
        dict: ``path``, ``step``, ``rows`` per table, ``seconds``.
    Raises:
        CheckpointError: damaged checkpoint, no model description, ``out_dir`` exists.
    """
    started = time.perf_counter()
    tf = _tf()
    module, manifest = build_serving_module(checkpoint)
    for delta_dir in deltas:
        apply_delta(module, delta_dir)
    path = _save_atomically(tf, module, out_dir, overwrite)
    return {"path": path, "step": int(module.step.numpy()),
            "rows": [int(t.size().numpy()) for t in module.tables],
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------- deltas
def delta_name(from_step, to_step):
    return f"{DELTA_PREFIX}{int(from_step):010d}-{int(to_step):010d}"


def list_deltas(root):
    """Complete deltas under ``root`` as (from_step, to_step, path), in step order."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        parts = name[len(DELTA_PREFIX):].split("-") if name.startswith(DELTA_PREFIX) else []
        if len(parts) == 2 and all(p.isdigit() and len(p) == 10 for p in parts):
            found.append((int(parts[0]), int(parts[1]), os.path.join(root, name)))
    return sorted(found)


def write_delta(root, from_step, to_step, *, tables, comm=None, model=None, model_hash=None):
    """Write the rows changed by steps ``from_step..to_step-1`` (collective, atomic).

    Args:
        root: delta directory (created if missing).
        from_step: rows with ``last_update_step >= from_step`` are written.
        to_step: completed steps at the time of the call (names the delta).
        tables: this rank's table shards.
        model: Keras model whose variables (after ``to_step`` steps) go into the delta (rank 0).
        model_hash: the checkpoint's model hash (checked by :func:`apply_delta`).
    Returns:
        the delta directory path.
    """
    comm = comm or ckpt.SingleProcessComm()
    root = os.path.abspath(root)
    final_dir = os.path.join(root, delta_name(from_step, to_step))
    tmp_dir = os.path.join(root, DELTA_TMP_PREFIX + delta_name(from_step, to_step)[len(DELTA_PREFIX):])
    what = f"writing delta {from_step}-{to_step} under {root}"
    ckpt.begin_atomic_dir(comm, root, tmp_dir, DELTA_TMP_PREFIX, what)
    entries, counts, error = [], [], None
    try:
        for t, table in enumerate(tables):
            exported = table.export()
            fresh = exported["last_update_step"] >= from_step
            keys, values = exported["keys"][fresh], exported["values"][fresh]
            order = np.argsort(keys, kind="stable")
            base = f"table-{t:03d}.rank-{comm.rank:05d}"
            for suffix, array in (("keys", keys[order]), ("values", values[order])):
                buffer = io.BytesIO()
                np.save(buffer, array)
                name = f"{base}.{suffix}.npy"
                sha, size = ckpt._write_file(os.path.join(tmp_dir, name), [buffer.getbuffer()])
                entries.append({"name": name, "sha256": sha, "bytes": size, "table": t,
                                "rank": comm.rank, "kind": suffix})
            counts.append(int(len(keys)))
        dense = None
        if comm.rank == 0 and model is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **{f"model_{i:04d}": v.numpy() for i, v in enumerate(model.variables)})
            sha, size = ckpt._write_file(os.path.join(tmp_dir, ckpt.DENSE_FILE), [buffer.getbuffer()])
            entries.append({"name": ckpt.DENSE_FILE, "sha256": sha, "bytes": size, "rank": 0,
                            "kind": "dense"})
            dense = [{"name": v.name, "shape": list(v.shape)} for v in model.variables]
    except OSError as exc:
        error = f"writing into {tmp_dir} failed: {exc}"
    gathered = comm.allgather_object(None if error else {"entries": entries, "rows": counts,
                                                         "dense": dense})
    ckpt._agree(comm, error, what)

    def manifest_bytes():
        files = {e["name"]: {k: v for k, v in e.items() if k != "name"}
                 for g in gathered for e in g["entries"]}
        manifest = {
            "format": DELTA_FORMAT, "format_version": ckpt.FORMAT_VERSION,
            "from_step": int(from_step), "to_step": int(to_step), "world_size": comm.size,
            "model_hash": model_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tables": [{"table": t, "dim": int(table.dim), "rows": sum(g["rows"][t] for g in gathered),
                        "rows_per_rank": [g["rows"][t] for g in gathered]}
                       for t, table in enumerate(tables)],
            "dense": gathered[0]["dense"], "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values())}
        return ckpt.signed_json_bytes(manifest)

    ckpt.commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, lambda: None, what)
    return final_dir


class DeltaExporter:
    """Writes a delta every ``every`` completed steps while training continues.

    Example (in the step loop, after the step's push)::

        exporter = DeltaExporter.for_trainer(trainer, start_step=resumed_step)
        ...
        exporter.maybe_export(step + 1)      # step + 1 = completed steps

    Args:
        root: delta directory.
        tables: this rank's table shards.
        comm: hybridps.comm.Comm (collective: every rank calls maybe_export), None for one process.
        model: Keras model (its variables go into every delta).
        every: steps between deltas (0 = never automatically; :meth:`export` still works).
        start_step: completed steps of the model the first delta applies to (the step of the
            checkpoint it was exported from).
        model_hash: the checkpoint's model hash.
    """

    def __init__(self, root, tables, *, comm=None, model=None, every=0, start_step=0, model_hash=None):
        self.root, self.tables, self.comm, self.model = root, tables, comm, model
        self.every, self.last_step, self.model_hash = int(every), int(start_step), model_hash
        self.written = []

    @classmethod
    def for_trainer(cls, trainer, start_step=0):
        c = trainer.config
        signature = ckpt.model_signature(c, trainer.sharded.field_groups, trainer.num_fields,
                                         trainer.num_dense, trainer.sharded.tables, c.num_buckets)
        return cls(c.delta_export_dir, trainer.sharded.tables, comm=trainer.comm, model=trainer.model,
                   every=c.delta_every, start_step=start_step,
                   model_hash=ckpt.signature_hash(signature))

    def maybe_export(self, completed_steps):
        """Write a delta if ``completed_steps`` is a multiple of ``every``; returns its path or None."""
        if self.every and completed_steps % self.every == 0 and completed_steps > self.last_step:
            return self.export(completed_steps)
        return None

    def export(self, completed_steps):
        """Write the delta ``last_step -> completed_steps`` now; returns its path."""
        path = write_delta(self.root, self.last_step, completed_steps, tables=self.tables,
                           comm=self.comm, model=self.model, model_hash=self.model_hash)
        self.last_step = int(completed_steps)
        self.written.append(path)
        return path


def load_delta(delta_dir):
    """(manifest, per table (keys, values) over all ranks, dense values or None), sha256-checked."""
    manifest = ckpt.load_signed_json(os.path.join(delta_dir, ckpt.MANIFEST), DELTA_FORMAT)
    for name, entry in manifest["files"].items():
        path = os.path.join(delta_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the delta manifest lists it)")
        if os.path.getsize(path) != entry["bytes"]:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated?)")
        if ckpt._sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch: the file is damaged")
    tables = []
    for t, info in enumerate(manifest["tables"]):
        keys, values = [], []
        for rank in range(manifest["world_size"]):
            base = os.path.join(delta_dir, f"table-{t:03d}.rank-{rank:05d}")
            keys.append(np.load(base + ".keys.npy"))
            values.append(np.load(base + ".values.npy"))
        tables.append((np.concatenate(keys), np.concatenate(values).reshape(-1, info["dim"])))
    dense = None
    if manifest.get("dense"):
        with np.load(os.path.join(delta_dir, ckpt.DENSE_FILE)) as z:
            dense = [z[f"model_{i:04d}"] for i in range(len(manifest["dense"]))]
    return manifest, tables, dense


def apply_delta(target, delta_dir, out_dir=None, *, check_step=True, overwrite=False):
    """Apply one delta to an exported model: in place, and optionally save a new SavedModel.

    Args:
        target: a SavedModel directory, a module loaded with tf.saved_model.load, or a
            :class:`ServingModule`.
        delta_dir: a ``delta-<from>-<to>`` directory.
        out_dir: if given, save the updated model there (atomically).
        check_step: refuse a delta whose ``from`` is not the model's ``step`` (deltas must be
            applied in order, none skipped).
    Returns:
        the updated module (its ``step`` is now the delta's ``to``).
    Raises:
        CheckpointError: damaged delta, another model, or a delta out of order.
    """
    tf = _tf()
    module = tf.saved_model.load(target) if isinstance(target, (str, os.PathLike)) else target
    manifest, tables, dense = load_delta(delta_dir)
    held_hash = module.model_hash.numpy().decode()
    if manifest["model_hash"] and held_hash and manifest["model_hash"] != held_hash:
        raise CheckpointError(f"{delta_dir} belongs to another model (model hash "
                              f"{manifest['model_hash'][:12]}, the exported model has {held_hash[:12]})")
    held_step = int(module.step.numpy())
    if check_step and manifest["from_step"] != held_step:
        raise CheckpointError(f"{delta_dir} covers steps {manifest['from_step']}..{manifest['to_step']} "
                              f"but the model holds step {held_step}: apply the deltas in order "
                              f"starting at delta-{held_step:010d}-*")
    if len(tables) != len(module.tables):
        raise CheckpointError(f"{delta_dir} has {len(tables)} tables, the model {len(module.tables)}")
    keys = np.concatenate([k for k, _ in tables])
    if len(keys):
        values = np.concatenate([v for _, v in tables]).astype(np.float32)
        index = np.concatenate([np.full(len(k), t, dtype=np.int32) for t, (k, _) in enumerate(tables)])
        module.apply_rows(tf.constant(keys, tf.int64), tf.constant(values), tf.constant(index))
    if dense is not None:
        module.assign_dense([tf.constant(v) for v in dense])
    module.step.assign(manifest["to_step"])
    if out_dir is not None:
        _save_atomically(tf, module, out_dir, overwrite)
    return module


# ---------------------------------------------------------------------------- CLI
def add_export_arguments(parser):
    """Arguments of ``hybridps export``; sets ``func`` to :func:`export_main`."""
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a checkpoint root (its latest)")
    parser.add_argument("--out", required=True,
                        help="SavedModel directory to write (for TF Serving: BASE/<version>)")
    parser.add_argument("--delta", action="append", default=[],
                        help="a delta directory to apply before saving (repeat, in order)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=export_main)


def export_main(args):
    """``hybridps export --checkpoint DIR --out SAVEDMODEL``: print what was written."""
    result = export_saved_model(args.checkpoint, args.out, overwrite=args.overwrite, deltas=args.delta)
    print(f"exported step {result['step']} ({', '.join(map(str, result['rows']))} rows per table) "
          f"to {result['path']} in {result['seconds']:.1f}s; serving signature 'serving_default': "
          f"serve(dense float32 [None, num_dense], keys int64 [None, num_fields]) -> "
          f"{{probability, logit}}")
    return 0
