"""Delta export: the rows changed since the previous delta, written while training continues.

What lives here: :func:`write_delta` (collective, atomic, checksummed), :class:`DeltaExporter`
(every N completed steps), :func:`list_deltas`, :func:`load_delta` and :func:`apply_delta`
(bring an exported model forward by one delta, in place or into a new SavedModel version).
What does not: the SavedModel itself (hybridps.export.saved_model), the checkpoint format
(hybridps.checkpoint, whose atomic-directory and signed-manifest functions this reuses).

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
"""
import io
import os
import time

import numpy as np

from hybridps.checkpoint.files import (agree, begin_atomic_dir, commit_atomic_dir, load_signed_json,
                                       sha256_file, signed_json_bytes, write_file)
from hybridps.checkpoint.format import DENSE_FILE, FORMAT_VERSION, MANIFEST
from hybridps.comm import SingleProcessComm
from hybridps.errors import CheckpointError
from hybridps.export.saving import save_atomically

DELTA_FORMAT = "hybridps-delta"
DELTA_PREFIX = "delta-"
DELTA_TMP_PREFIX = ".tmp-delta-"


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


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
    comm = comm or SingleProcessComm()
    root = os.path.abspath(root)
    final_dir = os.path.join(root, delta_name(from_step, to_step))
    tmp_dir = os.path.join(root, DELTA_TMP_PREFIX + delta_name(from_step, to_step)[len(DELTA_PREFIX):])
    what = f"writing delta {from_step}-{to_step} under {root}"
    begin_atomic_dir(comm, root, tmp_dir, DELTA_TMP_PREFIX, what)
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
                sha, size = write_file(os.path.join(tmp_dir, name), [buffer.getbuffer()])
                entries.append({"name": name, "sha256": sha, "bytes": size, "table": t,
                                "rank": comm.rank, "kind": suffix})
            counts.append(int(len(keys)))
        dense = None
        if comm.rank == 0 and model is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **{f"model_{i:04d}": v.numpy() for i, v in enumerate(model.variables)})
            sha, size = write_file(os.path.join(tmp_dir, DENSE_FILE), [buffer.getbuffer()])
            entries.append({"name": DENSE_FILE, "sha256": sha, "bytes": size, "rank": 0,
                            "kind": "dense"})
            dense = [{"name": v.name, "shape": list(v.shape)} for v in model.variables]
    except OSError as exc:
        error = f"writing into {tmp_dir} failed: {exc}"
    gathered = comm.allgather_object(None if error else {"entries": entries, "rows": counts,
                                                         "dense": dense})
    agree(comm, error, what)

    def manifest_bytes():
        files = {e["name"]: {k: v for k, v in e.items() if k != "name"}
                 for g in gathered for e in g["entries"]}
        manifest = {
            "format": DELTA_FORMAT, "format_version": FORMAT_VERSION,
            "from_step": int(from_step), "to_step": int(to_step), "world_size": comm.size,
            "model_hash": model_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tables": [{"table": t, "dim": int(table.dim), "rows": sum(g["rows"][t] for g in gathered),
                        "rows_per_rank": [g["rows"][t] for g in gathered]}
                       for t, table in enumerate(tables)],
            "dense": gathered[0]["dense"], "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values())}
        return signed_json_bytes(manifest)

    commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, lambda: None, what)
    return final_dir


class DeltaExporter:
    """Writes a delta every ``every`` completed steps while training continues.

    Example (at a consistent point after a step)::

        exporter = DeltaExporter(root, tables, comm=comm, model=model, every=100, start_step=0)
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

    def maybe_export(self, completed_steps):
        """Write a delta if ``completed_steps`` is a multiple of ``every``; returns its path or None."""
        if self.every and completed_steps % self.every == 0 and completed_steps > self.last_step:
            return self.export(completed_steps)
        return None

    def export(self, completed_steps, position=None):
        """Write the delta ``last_step -> completed_steps`` now; returns its path."""
        path = write_delta(self.root, self.last_step, completed_steps, tables=self.tables,
                           comm=self.comm, model=self.model, model_hash=self.model_hash)
        self.last_step = int(completed_steps)
        self.written.append(path)
        return path


def load_delta(delta_dir):
    """(manifest, per table (keys, values) over all ranks, dense values or None), sha256-checked."""
    manifest = load_signed_json(os.path.join(delta_dir, MANIFEST), DELTA_FORMAT)
    for name, entry in manifest["files"].items():
        path = os.path.join(delta_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the delta manifest lists it)")
        if os.path.getsize(path) != entry["bytes"]:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated?)")
        if sha256_file(path) != entry["sha256"]:
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
        with np.load(os.path.join(delta_dir, DENSE_FILE)) as z:
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
    for t, (keys, values) in enumerate(tables):
        if len(keys):
            getattr(module, f"apply_rows_{t}")(tf.constant(keys, tf.int64),
                                              tf.constant(values.astype(np.float32)))
    if dense is not None:
        module.assign_dense([tf.constant(v) for v in dense])
    module.step.assign(manifest["to_step"])
    if out_dir is not None:
        save_atomically(tf, module, out_dir, overwrite)
    return module
