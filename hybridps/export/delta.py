"""Delta and full exports: what online serving needs to follow a training run.

What lives here: :func:`write_delta` and :func:`write_full_export` (collective, atomic,
sha256-checksummed; every rank writes its own rows, nothing is gathered to rank 0),
:class:`DeltaExporter` (the exporter the trainer holds: every N completed steps, or when the
trainer asks, the next delta or full export as due), :func:`list_exports`,
:func:`list_deltas`, :func:`load_export` / :func:`load_delta` (verified reads) and
:func:`apply_delta` / :func:`apply_export` (bring a serving module forward by one export, in
place or into a new SavedModel version). What does not: the SavedModel itself
(hybridps.export.saved_model), the server that follows a directory (hybridps.serving), the
checkpoint format (hybridps.checkpoint, whose atomic-directory and checksummed-manifest functions
this reuses).

The export directory
--------------------
One ``--delta-export-dir`` holds both kinds, numbered by one **sequence** (1, 2, 3 ... per
directory; a resumed run continues after the largest number it finds there), so name order is
sequence order:

* ``full-<seq:010d>-<step:010d>/``: every live row of every table (per rank and table:
  ``table-<t>.rank-<r>.keys.npy`` / ``.values.npy``), the dense variables (``dense.npz``), and
  in the manifest the model description a server needs to rebuild the model without the
  checkpoint (``config``, ``schema``, ``model``: what hybridps.checkpoint.format's
  ``schema_of`` / ``model_config_of`` read).
* ``delta-<seq:010d>-<from:010d>-<to:010d>/``: the rows whose ``last_update_step`` (the 0-based
  index of the training step that last changed or inserted them) is ``>= from``, the keys the
  eviction policies erased since the previous export (``.tombstones.npy``, per rank and
  table), and the dense variables after ``to`` completed steps.

Every manifest (with its own checksum, an HMAC signature when a signing key is set, and each
file's sha256 and size; hybridps.checkpoint.files) holds ``kind``, ``sequence``,
``from_step``, ``to_step``, ``position`` (the data or stream position the trainer passed,
stored verbatim; may be null), ``created_unix`` and the model hash. An export is written into
``.tmp-delta-<name>`` and renamed when complete: a reader never sees half of one.

Applying: tombstones first, then rows (a key evicted and re-inserted within one interval is
in both, and ends up a row). A delta applies to the model of its ``from`` step (the previous
export's step): :func:`apply_delta` refuses one whose ``from`` is not the module's ``step`` (a
missing delta would silently lose updates) or whose model hash differs. A full export replaces
every row. The first export of every training run (fresh or resumed) is a full one, and then
every ``full_every``-th, so a server never depends on deltas written before a resume.

Deltas of earlier hybridps (``delta-<from:010d>-<to:010d>``, no sequence, no tombstones) are
still listed by :func:`list_deltas` and applied by :func:`apply_delta`.
"""
import dataclasses
import io
import os
import re
import time

import numpy as np

from hybridps.checkpoint.files import (agree, begin_atomic_dir, commit_atomic_dir, load_manifest_json,
                                       sha256_file, manifest_json_bytes, write_file)
from hybridps.checkpoint.format import DENSE_FILE, FORMAT_VERSION, MANIFEST, model_summary
from hybridps.comm import SingleProcessComm
from hybridps.errors import CheckpointError, ConfigError
from hybridps.export.saving import save_atomically
from hybridps.tf_compat import model_weights

DELTA_FORMAT = "hybridps-delta"
FULL_FORMAT = "hybridps-full-export"
EXPORT_VERSION = 2                        # 1: deltas without sequence and tombstones
DELTA_PREFIX = "delta-"
FULL_PREFIX = "full-"
DELTA_TMP_PREFIX = ".tmp-delta-"
_DELTA_NAME = re.compile(r"^delta-(\d{10})-(\d{10})-(\d{10})$")
_FULL_NAME = re.compile(r"^full-(\d{10})-(\d{10})$")
_LEGACY_DELTA_NAME = re.compile(r"^delta-(\d{10})-(\d{10})$")


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


def delta_name(sequence, from_step, to_step):
    return f"{DELTA_PREFIX}{int(sequence):010d}-{int(from_step):010d}-{int(to_step):010d}"


def full_name(sequence, step):
    return f"{FULL_PREFIX}{int(sequence):010d}-{int(step):010d}"


@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """One complete export found in a directory (from its name; not yet verified)."""
    sequence: int
    kind: str                 # "delta" or "full"
    from_step: int            # a full export: its step
    to_step: int
    path: str

    @property
    def name(self):
        return os.path.basename(self.path)


def list_exports(root):
    """Complete exports under ``root`` with a sequence number, as ExportEntry in sequence order
    (deltas of earlier hybridps, without one, are left out; see :func:`list_deltas`)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        delta, full = _DELTA_NAME.match(name), _FULL_NAME.match(name)
        if delta:
            found.append(ExportEntry(int(delta.group(1)), "delta", int(delta.group(2)),
                                     int(delta.group(3)), os.path.join(root, name)))
        elif full:
            found.append(ExportEntry(int(full.group(1)), "full", int(full.group(2)),
                                     int(full.group(2)), os.path.join(root, name)))
    return sorted(found, key=lambda e: (e.sequence, e.kind))


def list_deltas(root):
    """Complete deltas under ``root`` as (from_step, to_step, path): those of earlier hybridps
    (no sequence) in step order, then the numbered ones in sequence order."""
    if not os.path.isdir(root):
        return []
    legacy = []
    for name in os.listdir(root):
        match = _LEGACY_DELTA_NAME.match(name)
        if match:
            legacy.append((int(match.group(1)), int(match.group(2)), os.path.join(root, name)))
    return sorted(legacy) + [(e.from_step, e.to_step, e.path) for e in list_exports(root)
                             if e.kind == "delta"]


def next_sequence(root, comm=None):
    """1 + the largest sequence number under ``root`` (1 for a new directory); rank 0 reads
    the directory and every rank gets its answer."""
    comm = comm or SingleProcessComm()
    sequence = None
    if comm.rank == 0:
        sequence = max((e.sequence for e in list_exports(root)), default=0) + 1
    return int(comm.bcast_object(sequence))


def model_description(config, schema):
    """What a server needs to rebuild the model (the checkpoint manifest's ``config``,
    ``schema`` and ``model``, read by hybridps.checkpoint.format.schema_of / model_config_of)."""
    return {"config": config.to_dict(), "schema": schema.to_dict(), "model": model_summary(config, schema)}


def _save_npy(tmp_dir, name, array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_file(os.path.join(tmp_dir, name), [buffer.getbuffer()])


def _write_export(root, name, manifest_fields, *, tables, comm, model, rows_of, tombstones):
    """Collective: every rank writes its rows (``rows_of(t, table) -> (keys, values)``) and
    tombstones, rank 0 the dense variables and the manifest; atomic (module doc)."""
    comm = comm or SingleProcessComm()
    root = os.path.abspath(root)
    final_dir = os.path.join(root, name)
    tmp_dir = os.path.join(root, DELTA_TMP_PREFIX + name)
    what = f"writing {name} under {root}"
    begin_atomic_dir(comm, root, tmp_dir, DELTA_TMP_PREFIX, what)
    entries, counts, dropped, error = [], [], [], None
    try:
        for t, table in enumerate(tables):
            keys, values = rows_of(t, table)
            order = np.argsort(keys, kind="stable")
            base = f"table-{t:03d}.rank-{comm.rank:05d}"
            parts = [("keys", keys[order]), ("values", values[order])]
            if tombstones is not None:
                parts.append(("tombstones", np.asarray(tombstones[t], np.int64)))
            for suffix, array in parts:
                file_name = f"{base}.{suffix}.npy"
                sha, size = _save_npy(tmp_dir, file_name, array)
                entries.append({"name": file_name, "sha256": sha, "bytes": size, "table": t,
                                "rank": comm.rank, "kind": suffix})
            counts.append(int(len(keys)))
            dropped.append(int(len(tombstones[t])) if tombstones is not None else 0)
        dense = None
        if comm.rank == 0 and model is not None:
            buffer = io.BytesIO()
            weights = model_weights(model)     # named by position: the same on every Keras
            np.savez(buffer, **{f"model_{i:04d}": v.numpy() for i, v in enumerate(weights)})
            sha, size = write_file(os.path.join(tmp_dir, DENSE_FILE), [buffer.getbuffer()])
            entries.append({"name": DENSE_FILE, "sha256": sha, "bytes": size, "rank": 0,
                            "kind": "dense"})
            dense = [{"name": f"model_{i:04d}", "shape": list(v.shape)} for i, v in enumerate(weights)]
    except OSError as exc:
        error = f"writing into {tmp_dir} failed: {exc}"
    gathered = comm.allgather_object(None if error else {"entries": entries, "rows": counts,
                                                         "tombstones": dropped, "dense": dense})
    agree(comm, error, what)

    def manifest_bytes():
        files = {e["name"]: {k: v for k, v in e.items() if k != "name"}
                 for g in gathered for e in g["entries"]}
        manifest = dict(manifest_fields)
        manifest.update({
            "format_version": FORMAT_VERSION, "export_version": EXPORT_VERSION,
            "world_size": comm.size, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "tables": [{"table": t, "dim": int(table.dim),
                        "rows": sum(g["rows"][t] for g in gathered),
                        "rows_per_rank": [g["rows"][t] for g in gathered],
                        "tombstones": sum(g["tombstones"][t] for g in gathered),
                        "tombstones_per_rank": [g["tombstones"][t] for g in gathered]}
                       for t, table in enumerate(tables)],
            "dense": gathered[0]["dense"], "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values())})
        return manifest_json_bytes(manifest)

    commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, lambda: None, what)
    return final_dir


def write_delta(root, from_step, to_step, *, tables, comm=None, model=None, model_hash=None,
                sequence=None, tombstones=None, position=None):
    """Write the rows changed by steps ``from_step..to_step-1`` (collective, atomic).

    Args:
        root: export directory (created if missing).
        from_step: rows with ``last_update_step >= from_step`` are written.
        to_step: completed steps at the time of the call.
        tables: this rank's table shards.
        model: Keras model whose variables (after ``to_step`` steps) go into the delta (rank 0).
        model_hash: the checkpoint's model hash (checked by :func:`apply_delta`).
        sequence: the delta's sequence number (default: the next one in ``root``).
        tombstones: per table, this rank's keys evicted since the previous export (default none).
        position: JSON-able data / stream position (rank 0's is stored verbatim).
    Returns:
        the delta directory path.
    """
    comm = comm or SingleProcessComm()
    sequence = next_sequence(root, comm) if sequence is None else int(sequence)
    tombstones = tombstones if tombstones is not None else [np.empty(0, np.int64)] * len(tables)

    def rows_of(t, table):
        exported = table.export()
        fresh = exported["last_update_step"] >= from_step
        return exported["keys"][fresh], exported["values"][fresh]

    fields = {"format": DELTA_FORMAT, "kind": "delta", "sequence": sequence,
              "from_step": int(from_step), "to_step": int(to_step), "model_hash": model_hash,
              "position": position}
    return _write_export(root, delta_name(sequence, from_step, to_step), fields, tables=tables,
                         comm=comm, model=model, rows_of=rows_of, tombstones=tombstones)


def write_full_export(root, step, *, tables, comm=None, model=None, model_hash=None,
                      description=None, sequence=None, position=None):
    """Write every live row of every table, the dense variables and the model description
    (collective, atomic; each rank writes its own rows).

    Args:
        root: export directory (created if missing).
        step: completed steps of the model written.
        tables, comm, model, model_hash, sequence, position: as :func:`write_delta`.
        description: :func:`model_description` of the run (a server rebuilds the model from it).
    Returns:
        the full export's directory path.
    """
    comm = comm or SingleProcessComm()
    sequence = next_sequence(root, comm) if sequence is None else int(sequence)

    def rows_of(t, table):
        exported = table.export()
        return exported["keys"], exported["values"]

    fields = {"format": FULL_FORMAT, "kind": "full", "sequence": sequence,
              "from_step": int(step), "to_step": int(step), "model_hash": model_hash,
              "position": position, **(description or {})}
    return _write_export(root, full_name(sequence, step), fields, tables=tables, comm=comm,
                         model=model, rows_of=rows_of, tombstones=None)


class DeltaExporter:
    """Writes the next delta or full export every ``every`` completed steps, or when asked.

    Example (at a consistent point after a step)::

        exporter = DeltaExporter(root, tables, comm=comm, model=model, every=100, start_step=0,
                                 full_every=10, description=model_description(config, schema))
        exporter.maybe_export(step + 1)                 # step + 1 = completed steps
        exporter.export(step + 1, position=data_state)  # now (e.g. by wall-clock time)

    Args:
        root: export directory.
        tables: this rank's table shards (their evictions are recorded from now on).
        comm: hybridps.comm.Comm (collective: every rank calls the same exports), None for one
            process.
        model: Keras model (its variables go into every export).
        every: steps between exports for :meth:`maybe_export` (0 = never automatically).
        start_step: completed steps of the model when the exporter starts (a resume's step).
        model_hash: the checkpoint's model hash.
        full_every: every ``full_every``-th export of this run, the first included, is a full
            export (0: only deltas, the first of them from ``start_step``, for a model exported
            from the checkpoint of ``start_step``).
        description: :func:`model_description`, needed by full exports.
        position_fn: called (every rank) for the position of an export given none.
    Raises:
        ConfigError: full exports without a model description.
    """

    def __init__(self, root, tables, *, comm=None, model=None, every=0, start_step=0, model_hash=None,
                 full_every=0, description=None, position_fn=None):
        if full_every and description is None:
            raise ConfigError("DeltaExporter: full exports (full_every > 0) need the model "
                              "description (hybridps.export.delta.model_description)")
        self.root, self.tables, self.comm, self.model = root, tables, comm, model
        self.every, self.last_step, self.model_hash = int(every), int(start_step), model_hash
        self.full_every, self.description, self.position_fn = int(full_every), description, position_fn
        self.sequence = next_sequence(root, comm)
        self.exports_this_run = 0
        for table in tables:
            table.record_evictions(True)

    def next_is_full(self):
        """Whether the next export is a full one (the first of the run, then every full_every-th)."""
        return bool(self.full_every) and self.exports_this_run % self.full_every == 0

    def maybe_export(self, completed_steps, position=None):
        """Export if ``completed_steps`` is a multiple of ``every``; returns its path or None."""
        if self.every and completed_steps % self.every == 0 and completed_steps > self.last_step:
            return self.export(completed_steps, position)
        return None

    def export(self, completed_steps, position=None):
        """Write the next export now, a full one or the delta ``last_step -> completed_steps``
        (as :meth:`next_is_full` says); returns its path. Collective."""
        if position is None and self.position_fn is not None:
            position = self.position_fn()
        tombstones = [table.take_evicted() for table in self.tables]
        if self.next_is_full():       # it holds every live row: the tombstones are moot
            path = write_full_export(self.root, completed_steps, tables=self.tables, comm=self.comm,
                                     model=self.model, model_hash=self.model_hash,
                                     description=self.description, sequence=self.sequence,
                                     position=position)
        else:
            path = write_delta(self.root, self.last_step, completed_steps, tables=self.tables,
                               comm=self.comm, model=self.model, model_hash=self.model_hash,
                               sequence=self.sequence, tombstones=tombstones, position=position)
        self.sequence += 1
        self.exports_this_run += 1
        self.last_step = int(completed_steps)
        return path


@dataclasses.dataclass
class LoadedExport:
    """A verified export in memory: ``rows`` and ``tombstones`` per table over all ranks."""
    path: str
    manifest: dict
    rows: list                # per table (keys int64 (n,), values float32 (n, dim))
    tombstones: list          # per table int64 keys (empty for full exports and old deltas)
    dense: object             # list of arrays, or None

    @property
    def kind(self):
        return self.manifest.get("kind", "delta")

    @property
    def sequence(self):
        return self.manifest.get("sequence")

    @property
    def from_step(self):
        return int(self.manifest["from_step"])

    @property
    def to_step(self):
        return int(self.manifest["to_step"])


def load_export(path):
    """Read a delta or full export, checking the manifest's checksum (and signature) and every
    file's size and sha256.

    Returns:
        LoadedExport.
    Raises:
        CheckpointError: a missing, truncated or damaged file, or not an export.
    """
    manifest_path = os.path.join(path, MANIFEST)
    try:
        manifest = load_manifest_json(manifest_path, DELTA_FORMAT)
    except CheckpointError:
        if not os.path.basename(os.path.normpath(path)).startswith(FULL_PREFIX):
            raise
        manifest = load_manifest_json(manifest_path, FULL_FORMAT)
    for name, entry in manifest["files"].items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path}: missing (the export's manifest lists it)")
        if os.path.getsize(file_path) != entry["bytes"]:
            raise CheckpointError(f"{file_path}: {os.path.getsize(file_path)} bytes, the manifest "
                                  f"says {entry['bytes']} (truncated?)")
        if sha256_file(file_path) != entry["sha256"]:
            raise CheckpointError(f"{file_path}: checksum mismatch: the file is damaged")
    rows, tombstones = [], []
    try:
        for t, info in enumerate(manifest["tables"]):
            keys, values, dropped = [], [], []
            for rank in range(manifest["world_size"]):
                base = f"table-{t:03d}.rank-{rank:05d}"
                keys.append(np.load(os.path.join(path, base + ".keys.npy")))
                values.append(np.load(os.path.join(path, base + ".values.npy")))
                if base + ".tombstones.npy" in manifest["files"]:
                    dropped.append(np.load(os.path.join(path, base + ".tombstones.npy")))
            rows.append((np.concatenate(keys).astype(np.int64, copy=False),
                         np.concatenate(values).reshape(-1, info["dim"]).astype(np.float32, copy=False)))
            tombstones.append(np.concatenate(dropped).astype(np.int64, copy=False) if dropped
                              else np.empty(0, np.int64))
        dense = None
        if manifest.get("dense"):
            with np.load(os.path.join(path, DENSE_FILE)) as z:
                dense = [z[f"model_{i:04d}"] for i in range(len(manifest["dense"]))]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the export ({type(exc).__name__}: {exc})") from None
    return LoadedExport(path, manifest, rows, tombstones, dense)


def load_delta(delta_dir):
    """(manifest, per table (keys, values) over all ranks, dense values or None), sha256-checked
    (the tombstones: :func:`load_export`)."""
    loaded = load_export(delta_dir)
    return loaded.manifest, loaded.rows, loaded.dense


def check_applicable(module, loaded, *, check_step=True):
    """Raise CheckpointError if ``loaded`` does not apply to ``module``: another model (hash,
    tables, dims), or a delta whose ``from`` is not the module's step (with ``check_step``)."""
    held_hash = module.model_hash.numpy().decode()
    manifest = loaded.manifest
    if manifest.get("model_hash") and held_hash and manifest["model_hash"] != held_hash:
        raise CheckpointError(f"{loaded.path} belongs to another model (model hash "
                              f"{manifest['model_hash'][:12]}, the exported model has {held_hash[:12]})")
    if len(loaded.rows) != len(module.tables):
        raise CheckpointError(f"{loaded.path} has {len(loaded.rows)} tables, the model {len(module.tables)}")
    held_step = int(module.step.numpy())
    if check_step and loaded.kind == "delta" and loaded.from_step != held_step:
        raise CheckpointError(f"{loaded.path} covers steps {loaded.from_step}..{loaded.to_step} "
                              f"but the model holds step {held_step}: apply the deltas in order, "
                              f"starting at the one from step {held_step}")


def apply_export(module, loaded, *, check_step=True, pause_seconds=0.0):
    """Apply a loaded export to a serving module in place: a delta's tombstones, then its rows;
    a full export's rows replace every row. Then the dense variables and the step.

    Args:
        module: a ServingModule or a loaded SavedModel of one.
        loaded: :func:`load_export`'s result.
        check_step: refuse a delta whose ``from`` is not the module's ``step``.
        pause_seconds: sleep between tombstones and rows (a testing aid: a process killed in
            the middle of an apply).
    Returns:
        the module.
    Raises:
        CheckpointError: another model, or a delta out of order (nothing is changed then).
    """
    tf = _tf()
    check_applicable(module, loaded, check_step=check_step)
    for t, dropped in enumerate(loaded.tombstones):
        if loaded.kind == "full":
            dropped = module.tables[t].export()[0]
        if len(dropped):
            getattr(module, f"remove_rows_{t}")(tf.constant(dropped, tf.int64))
    if pause_seconds:
        time.sleep(pause_seconds)
    for t, (keys, values) in enumerate(loaded.rows):
        if len(keys):
            getattr(module, f"apply_rows_{t}")(tf.constant(keys, tf.int64),
                                              tf.constant(values.astype(np.float32)))
    if loaded.dense is not None:
        module.assign_dense([tf.constant(v) for v in loaded.dense])
    module.step.assign(loaded.to_step)
    return module


def apply_delta(target, delta_dir, out_dir=None, *, check_step=True, overwrite=False):
    """Apply one delta (or full export) to an exported model: in place, and optionally save a
    new SavedModel.

    Args:
        target: a SavedModel directory, a module loaded with tf.saved_model.load, or a
            :class:`ServingModule`.
        delta_dir: a ``delta-*`` (or ``full-*``) directory.
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
    apply_export(module, load_export(delta_dir), check_step=check_step)
    if out_dir is not None:
        save_atomically(tf, module, out_dir, overwrite)
    return module
