"""Sharded, atomic, checksummed checkpoints; restore onto any world size; inspection.

What lives here: the on-disk format, :func:`save_checkpoint` (collective: every rank writes
its own shards), :func:`restore_checkpoint` (collective: every rank reads only the buckets it
owns under the new world size), :func:`find_resume_point` / :func:`verify_checkpoint`
(damage detection, fall back to the newest intact checkpoint), :func:`inspect_checkpoint`,
and the Trainer glue (:func:`save_trainer`, :func:`resume_trainer`). What does not: the
SavedModel / delta export (hybridps.export), MPI itself (a ``comm`` object is passed in:
hybridps.comm.Comm, or :class:`SingleProcessComm`), the step loop (hybridps.trainer).

Directory layout (DESIGN.md section 6)::

    ROOT/latest                         "ckpt-0000000100\\n" (replaced atomically, last)
    ROOT/ckpt-0000000100/manifest.json  written by rank 0 after every rank's files are on disk
        table-000.rank-00001.rows       rank 1's rows of table 0, sorted by (bucket, key)
        table-000.rank-00001.cands      rank 1's not-yet-admitted keys (min_count), same order
        table-000.rank-00001.index.npz  per bucket: row/candidate offsets and CRC32
        rank-00001.state.json           rank 1's data position, numpy RNG state, table counters
        dense.npz                       rank 0: model variables and dense optimizer variables

Ownership and buckets. Every key has a virtual bucket ``bucket(key) = mix64(key) %
num_buckets``; ``num_buckets`` is fixed when the tables are created (config.num_buckets) and
recorded in the manifest. The owner rank of a key is a function of its bucket::

    owner(key) = (mix64(key) % num_buckets) % world_size

so that a whole bucket always belongs to one rank, for every world size. A restoring rank
``r`` of ``W'`` reads exactly the buckets ``b`` with ``b % W' == r`` from every saved shard
(about 1/W' of the bytes) and needs no filtering. The alternative, keeping ``mix64(key) %
world_size`` and filtering rows by owner, only reads 1/W' when ``W'`` divides
``num_buckets``; for ``W' = 3`` and 4096 buckets every rank would read everything. When
``world_size`` divides ``num_buckets`` (powers of two with the default 4096) both functions
give the same owner, so the change is visible only for other world sizes.
:func:`owner_ranks` is the reference implementation the exchange routing must match;
:func:`resume_trainer` refuses to continue if the routing in use disagrees. Balance: a rank
owns floor or ceil of num_buckets / world_size buckets, so with 4096 buckets the largest share
is within 1.6% of the mean up to 64 ranks; larger jobs should use num_buckets >= 64 x ranks
(fixed for the life of the model, so choose it for the largest job it will ever run on).

Row records. A shard's ``.rows`` file is a packed array of records ``{key int64, hits int64,
last_update_step int64, update_count int64, row float32[row_width]}`` where ``row`` is the
table's own row ``[value | optimizer slot 0 | slot 1]``: a value is never paired with slots
from another moment. Records are sorted by (bucket, key), so a bucket is one contiguous byte
range and the same table state always gives the same bytes. ``.cands`` holds ``{key, hits}``
of candidates. The index holds, per bucket, the record offset (``num_buckets + 1`` cumulative
counts) and the CRC32 of the bucket's bytes, for rows and candidates.

Atomicity. Every rank writes into ``ROOT/.tmp-ckpt-<step>`` and fsyncs each file; the ranks
gather their file lists (name, sha256, bytes); rank 0 writes ``manifest.json`` (with a sha256
of its own canonical JSON), fsyncs it and the directory, renames the directory to
``ckpt-<step>``, fsyncs ROOT, then replaces ``latest`` (``latest.tmp`` + fsync + os.replace)
and only then deletes checkpoints beyond the newest ``keep``. A crash at any point leaves
either no ``ckpt-<step>`` (a ``.tmp-`` directory that the next save deletes) or a complete
one; ``latest`` always names a complete checkpoint.

Verification. The manifest holds a sha256 and size per file. A restore checks the manifest's
own sha256, the model signature (model kind and shapes, field groups, optimizers,
num_buckets), each file's presence and size, the sha256 of every small file it reads whole
(index, dense, state) and the CRC32 of every bucket it reads; a restoring rank reads 1/W' of
the data, so hashing whole data files would defeat the point, but the ranks together read
every bucket, so together they check every byte. :func:`verify_checkpoint` with
``level="full"`` (used by ``hybridps inspect``) re-hashes every file with sha256. Verification
of every rank is agreed collectively before any table is touched, so a damaged checkpoint
leaves the tables empty and :func:`resume_trainer` can try the next older one.

Per-rank state on another world size. Rank ``r`` of ``W'`` gets the data position of saved
rank ``r % W`` (the datasets' ``restore`` handles a changed world size: the synthetic
generator's position is the same on every rank, the Criteo reader uses its global offset) and
the RNG state of saved rank ``r`` (rank 0's for new ranks). Table counters (evictions,
admissions, ...) cannot be set through the table API; they come back in the report: per rank
with the saved world size, as totals on rank 0 otherwise, so sums over ranks are unchanged.

Memory: a save holds one table export plus one 16 MiB chunk of records at a time; a restore
holds this rank's records and their column copies (about 3x its share) until they are imported.
"""
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
import zlib

import numpy as np

from hybridps._hashtable import mix64
from hybridps.errors import CheckpointError

FORMAT = "hybridps-checkpoint"
FORMAT_VERSION = 1
CKPT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-ckpt-"
DAMAGED_PREFIX = "damaged-"              # a refused checkpoint set aside by a resume (never pruned)
LATEST = "latest"
MANIFEST = "manifest.json"
DENSE_FILE = "dense.npz"
OWNER_FUNCTION = "(mix64(key) % num_buckets) % world_size"
DEFAULT_NUM_BUCKETS = 4096
CANDIDATE_DTYPE = np.dtype([("key", "<i8"), ("hits", "<i8")])
_CHUNK_BYTES = 16 << 20                  # records are built and written this much at a time
_CKPT_NAME = re.compile(r"^ckpt-(\d{10})$")
_CHECKPOINT_DIR_NAME = re.compile(r"^(damaged-)?ckpt-\d{10}(\.\d+)?$")   # one checkpoint, for inspect
_META_FIELDS = ("hits", "last_update_step", "update_count")


# ---------------------------------------------------------------------------- ownership
def bucket_ids(keys, num_buckets):
    """Virtual bucket of each key: ``mix64(key) % num_buckets`` (int64)."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return (mix64(keys) % np.uint64(num_buckets)).astype(np.int64)


def owner_ranks(keys, num_buckets, world_size):
    """Owner rank of each key: ``(mix64(key) % num_buckets) % world_size`` (int32).

    The reference for hybridps.embedding.routing: the exchange must route keys with this
    function so that restored rows sit on the rank that will serve them.
    """
    return (bucket_ids(keys, num_buckets) % world_size).astype(np.int32)


def buckets_of_rank(rank, world_size, num_buckets):
    """The buckets rank ``rank`` of ``world_size`` owns (and reads on restore)."""
    return np.arange(rank, num_buckets, world_size, dtype=np.int64)


# ``shard`` argument of restore_checkpoint / check_routing for a rank that holds no keys
# (a PS worker): it reads no table buckets.
NO_SHARD = "none"


def _shard_of(shard, comm):
    """(index, count) of a rank among the key owners; (None, count) for NO_SHARD."""
    if shard is None:
        return comm.rank, comm.size
    if shard == NO_SHARD:
        return None, 0
    index, count = shard
    return int(index), int(count)


def row_record_dtype(row_width):
    """The packed record of one row in a ``.rows`` file."""
    return np.dtype([("key", "<i8"), ("hits", "<i8"), ("last_update_step", "<i8"),
                     ("update_count", "<i8"), ("row", "<f4", (row_width,))])


# ---------------------------------------------------------------------------- small pieces
class SingleProcessComm:
    """The comm of a job of one process (tests, export, inspect): rank 0 of 1, no MPI."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def barrier(self):
        pass

    def allgather_object(self, obj):
        return [obj]

    def bcast_object(self, obj, root=0):
        return obj

    def allreduce_sum(self, array):
        return np.array(array, copy=True)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but belongs to another model or table layout."""


@dataclasses.dataclass
class CheckpointInfo:
    """What :func:`save_checkpoint` wrote. ``total_bytes`` covers every rank's files."""
    path: str
    step: int
    bytes_written: int
    total_bytes: int
    seconds: float
    files: list


@dataclasses.dataclass
class RestoreReport:
    """What :func:`restore_checkpoint` read and restored on this rank.

    Attributes:
        bytes_read: bytes read per kind (``data`` = row and candidate records, ``index``,
            ``dense``, ``state``, ``manifest``) and ``total``.
        rows / candidates: rows and candidates restored into each table on this rank.
        data_state: this rank's dataset position (pass to ``dataset.restore``).
        counters: per table, the counters this rank restores (see :func:`restore_checkpoint`).
        warnings: config differences that do not prevent the restore.
    """
    path: str
    step: int
    saved_world_size: int
    num_buckets: int
    bytes_read: dict
    rows: list
    candidates: list
    data_state: object
    rng_state: object = dataclasses.field(repr=False)
    counters: list = None
    warnings: list = None
    seconds: float = 0.0


@dataclasses.dataclass
class ResumePoint:
    """The newest intact checkpoint under a root (``path`` None if there is none).

    ``damaged``: (path, problems) of every newer checkpoint that verification refused.
    """
    path: object
    step: int
    warnings: list
    damaged: list = dataclasses.field(default_factory=list)


def _test_pause_seconds():
    # Testing aid for crash tests: sleep this long after each file a save writes. Read here
    # (not in hybridps.config) because it is not a training setting.
    value = os.environ.get("HYBRIDPS_CKPT_TEST_PAUSE", "")
    return float(value) if value else 0.0


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path, chunks):
    """Write byte chunks to a new file, fsync it; returns (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as fh:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            digest.update(view)
            fh.write(view)
            size += view.nbytes
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest(), size


def _write_atomic_small(path, data):
    """Replace a small file atomically: PATH.tmp + fsync + os.replace + fsync of the directory."""
    tmp = path + ".tmp"
    _write_file(tmp, [data])
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _numpy_rng_state():
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state):
    np.random.set_state((state["kind"], np.asarray(state["key"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def _error_of(exc):
    """(kind, message) of an exception met while reading a checkpoint, to send between ranks."""
    kind = "mismatch" if isinstance(exc, CheckpointMismatchError) else "damaged"
    return kind, str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


def _agree(comm, local_error, what):
    """Gather every rank's error (None, a message or (kind, message)); raise the same
    CheckpointError (CheckpointMismatchError if any rank saw a mismatch) on every rank."""
    errors = comm.allgather_object(local_error)
    failed = [(r, (e if isinstance(e, tuple) else ("damaged", e))) for r, e in enumerate(errors) if e]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, (_, m) in failed[:4])
        more = f" (and {len(failed) - 4} more ranks)" if len(failed) > 4 else ""
        cls = CheckpointMismatchError if any(k == "mismatch" for _, (k, _) in failed) else CheckpointError
        raise cls(f"{what} failed: {detail}{more}")


# ---------------------------------------------------------------------------- signatures
def model_signature(config=None, field_groups=None, num_fields=None, num_dense=None,
                    tables=None, num_buckets=None):
    """What a checkpoint must share with the run that restores it (JSON-able dict).

    The model kind and shapes, the field -> table grouping, the sparse and dense optimizers
    (their slots are in the checkpoint) and num_buckets. Learning rates, step counts, paths
    and the like may change between a save and a resume, so they are not part of it.
    """
    signature = {"num_buckets": int(num_buckets or getattr(config, "num_buckets", None)
                                    or DEFAULT_NUM_BUCKETS)}
    if field_groups is not None:
        signature["field_groups"] = [[int(f) for f in g] for g in field_groups]
    if tables is not None:
        signature["tables"] = [{"dim": int(t.dim), "optimizer": t.optimizer} for t in tables]
    if config is not None:
        signature.update(model=config.model, dim=config.dim, hidden=[int(h) for h in config.hidden],
                         cross_layers=config.cross_layers if config.model == "dcn" else None,
                         optimizer=config.optimizer,
                         dense_optimizer=config.effective_dense_optimizer,
                         num_fields=int(num_fields if num_fields is not None else config.num_fields),
                         num_dense=int(num_dense if num_dense is not None else config.num_dense))
    return signature


def signature_hash(signature):
    return hashlib.sha256(_canonical(signature)).hexdigest()


def _full_config_hash(config):
    if config is None:
        return None
    from hybridps.config import config_hash
    return config_hash(config)


# ---------------------------------------------------------------------------- writing shards
def _shard_names(table_index, rank):
    base = f"table-{table_index:03d}.rank-{rank:05d}"
    return base + ".rows", base + ".cands", base + ".index.npz"


def _bucket_chunks(offsets, record_bytes):
    """Ranges [b0, b1) of buckets holding about _CHUNK_BYTES of records each (at least one)."""
    num_buckets = len(offsets) - 1
    per_chunk = max(1, _CHUNK_BYTES // max(record_bytes, 1))
    b0 = 0
    while b0 < num_buckets:
        b1 = int(np.searchsorted(offsets, offsets[b0] + per_chunk, side="right")) - 1
        b1 = min(max(b1, b0 + 1), num_buckets)
        yield b0, b1
        b0 = b1


def _sorted_records(keys, num_buckets, record_dtype, fill):
    """Generator of record chunks sorted by (bucket, key), plus offsets and per-bucket CRC32.

    ``fill(records, positions)`` writes the records of the rows at ``positions``. Returns
    (chunk generator, offsets (B+1,), crc (B,) uint32 filled while the generator runs).
    """
    buckets = bucket_ids(keys, num_buckets)
    order = np.lexsort((keys, buckets))
    counts = np.bincount(buckets, minlength=num_buckets)
    offsets = np.zeros(num_buckets + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    crc = np.zeros(num_buckets, dtype=np.uint32)

    def chunks():
        if len(keys) == 0:
            return
        for b0, b1 in _bucket_chunks(offsets, record_dtype.itemsize):
            start, stop = offsets[b0], offsets[b1]
            if stop == start:
                continue
            records = np.zeros(stop - start, dtype=record_dtype)
            fill(records, order[start:stop])
            raw = memoryview(records).cast("B")
            size = record_dtype.itemsize
            for b in range(b0, b1):
                lo, hi = (offsets[b] - start) * size, (offsets[b + 1] - start) * size
                if hi > lo:
                    crc[b] = zlib.crc32(raw[lo:hi])
            yield records

    return chunks(), offsets, crc


def _write_table_shard(directory, table_index, rank, table, num_buckets, pause):
    """Write one rank's shard of one table; returns (file entries, summary)."""
    exported = table.export()
    dim, ns = table.dim, table.n_optimizer_slots
    row_width = dim * (1 + ns)
    rows_name, cands_name, index_name = _shard_names(table_index, rank)
    rec_dtype = row_record_dtype(row_width)

    def fill_rows(records, positions):
        records["key"] = exported["keys"][positions]
        for name in _META_FIELDS:
            records[name] = exported[name][positions]
        records["row"][:, :dim] = exported["values"][positions]
        if ns:
            records["row"][:, dim:] = exported["slots"][positions].reshape(len(positions), ns * dim)

    def fill_cands(records, positions):
        records["key"] = exported["candidate_keys"][positions]
        records["hits"] = exported["candidate_hits"][positions]

    entries = []
    chunks, row_offsets, row_crc = _sorted_records(exported["keys"], num_buckets, rec_dtype, fill_rows)
    sha, size = _write_file(os.path.join(directory, rows_name), chunks)
    entries.append({"name": rows_name, "sha256": sha, "bytes": size, "kind": "rows",
                    "table": table_index, "rank": rank})
    _pause(pause)
    chunks, cand_offsets, cand_crc = _sorted_records(exported["candidate_keys"], num_buckets,
                                                     CANDIDATE_DTYPE, fill_cands)
    sha, size = _write_file(os.path.join(directory, cands_name), chunks)
    entries.append({"name": cands_name, "sha256": sha, "bytes": size, "kind": "candidates",
                    "table": table_index, "rank": rank})
    _pause(pause)
    buffer = io.BytesIO()   # compressed: every restoring rank reads every index file whole
    np.savez_compressed(buffer, row_offsets=row_offsets, row_crc=row_crc,
                        cand_offsets=cand_offsets, cand_crc=cand_crc,
                        num_buckets=np.int64(num_buckets), record_bytes=np.int64(rec_dtype.itemsize))
    sha, size = _write_file(os.path.join(directory, index_name), [buffer.getbuffer()])
    entries.append({"name": index_name, "sha256": sha, "bytes": size, "kind": "index",
                    "table": table_index, "rank": rank})
    _pause(pause)
    summary = {"rows": int(len(exported["keys"])), "candidates": int(len(exported["candidate_keys"])),
               "counters": {k: int(v) for k, v in table.counters().items()}}
    return entries, summary


def _pause(seconds):
    if seconds:
        time.sleep(seconds)


def _optimizer_variables(optimizer):
    """A Keras optimizer's variables: a property (Keras 2.11+ / 3) or a method (legacy)."""
    variables = optimizer.variables
    return list(variables() if callable(variables) and not isinstance(variables, list) else variables)


def _write_dense(directory, model, optimizer):
    """rank 0: model variables and optimizer variables in dense.npz; returns (entry, description)."""
    arrays, description = {}, {"file": DENSE_FILE, "model_variables": [], "optimizer": None}
    for i, variable in enumerate(model.variables):
        value = variable.numpy()
        arrays[f"model_{i:04d}"] = value
        description["model_variables"].append(
            {"name": variable.name, "shape": list(value.shape), "dtype": str(value.dtype)})
    if optimizer is not None:
        opt_vars = _optimizer_variables(optimizer)
        description["optimizer"] = {"class": type(optimizer).__name__, "variables": []}
        for i, variable in enumerate(opt_vars):
            value = variable.numpy()
            arrays[f"optimizer_{i:04d}"] = value
            description["optimizer"]["variables"].append(
                {"name": variable.name, "shape": list(value.shape), "dtype": str(value.dtype)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    sha, size = _write_file(os.path.join(directory, DENSE_FILE), [buffer.getbuffer()])
    return {"name": DENSE_FILE, "sha256": sha, "bytes": size, "kind": "dense", "rank": 0}, description


# ---------------------------------------------------------------------------- save
def checkpoint_name(step):
    return f"{CKPT_PREFIX}{int(step):010d}"


def save_checkpoint(root, step, *, tables, comm=None, config=None, field_groups=None,
                    num_buckets=None, model=None, optimizer=None, data_state=None,
                    rng_state=None, num_fields=None, num_dense=None, keep=None, extra=None):
    """Write a checkpoint of every rank's tables (and rank 0's dense state) atomically.

    Collective: every rank of ``comm`` calls it with the same ``root`` and ``step``.

    Args:
        root: checkpoint root directory (created if missing).
        step: the number of completed training steps (the step a resume starts at).
        tables: this rank's EmbeddingHashTable shards, in table order.
        comm: hybridps.comm.Comm, or None for one process.
        config: the TrainConfig (recorded in the manifest; gives num_buckets and keep).
        field_groups: field indices of each table (recorded; export needs them).
        num_buckets: virtual buckets (default config.num_buckets, else 4096). Must not change
            over the life of a model.
        model, optimizer: Keras model and dense optimizer, saved by rank 0 (optional).
        data_state: this rank's ``dataset.state()``.
        rng_state: this rank's RNG state (JSON-able); default the numpy global RNG state.
        num_fields, num_dense: the model's input sizes if they differ from the config's.
        keep: checkpoints to keep (default config.keep_checkpoints, else 3).
        extra: JSON-able dict stored in the manifest under "extra".
    Returns:
        CheckpointInfo (the same path and total on every rank).
    Raises:
        CheckpointError: a rank could not write its files (disk full, permissions); the
            temporary directory is left for the next save to delete, ``latest`` is unchanged.
    """
    started = time.perf_counter()
    comm = comm or SingleProcessComm()
    num_buckets = int(num_buckets or getattr(config, "num_buckets", 0) or DEFAULT_NUM_BUCKETS)
    keep = int(keep or getattr(config, "keep_checkpoints", 0) or 3)
    step = int(step)
    root = os.path.abspath(root)
    final_dir = os.path.join(root, checkpoint_name(step))
    tmp_dir = os.path.join(root, f"{TMP_PREFIX}{step:010d}")
    pause = _test_pause_seconds()

    begin_atomic_dir(comm, root, tmp_dir, TMP_PREFIX, f"saving checkpoint step {step} under {root}")

    entries, table_summaries, dense_description, error = [], [], None, None
    try:
        for t, table in enumerate(tables):
            table_entries, summary = _write_table_shard(tmp_dir, t, comm.rank, table, num_buckets, pause)
            entries += table_entries
            table_summaries.append(summary)
        if comm.rank == 0 and model is not None:
            entry, dense_description = _write_dense(tmp_dir, model, optimizer)
            entries.append(entry)
            _pause(pause)
        state = {"rank": comm.rank, "data_state": data_state,
                 "rng_state": rng_state if rng_state is not None else _numpy_rng_state(),
                 "counters": [s["counters"] for s in table_summaries]}
        state_name = f"rank-{comm.rank:05d}.state.json"
        sha, size = _write_file(os.path.join(tmp_dir, state_name), [_canonical(state)])
        entries.append({"name": state_name, "sha256": sha, "bytes": size, "kind": "state",
                        "rank": comm.rank})
    except OSError as exc:
        error = f"writing its files into {tmp_dir} failed: {exc}"
    gathered = comm.allgather_object(
        None if error else {"entries": entries, "tables": table_summaries, "data_state": data_state,
                            "dense": dense_description})
    _agree(comm, error, f"saving checkpoint step {step} under {root}")

    total = sum(e["bytes"] for g in gathered for e in g["entries"])

    def manifest_bytes():
        return signed_json_bytes(_build_manifest(step, comm.size, config, tables, field_groups,
                                                 num_buckets, num_fields, num_dense, gathered, extra))

    def publish():
        _write_atomic_small(os.path.join(root, LATEST), (checkpoint_name(step) + "\n").encode())
        _prune(root, keep, step)

    commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, publish,
                      f"saving checkpoint step {step} under {root}")
    return CheckpointInfo(path=final_dir, step=step, bytes_written=sum(e["bytes"] for e in entries),
                          total_bytes=total, seconds=time.perf_counter() - started,
                          files=[e["name"] for e in entries])


def begin_atomic_dir(comm, root, tmp_dir, stale_prefix, what):
    """Collective: rank 0 deletes leftovers (names starting with ``stale_prefix``) of writes
    that crashed and creates ``tmp_dir``; every rank learns whether that worked."""
    error = None
    if comm.rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):
                if name.startswith(stale_prefix):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.makedirs(tmp_dir)
            _fsync_dir(root)
        except OSError as exc:
            error = f"cannot create {tmp_dir}: {exc}"
    error = comm.bcast_object(error)
    if error:
        raise CheckpointError(f"{what} failed: {error}")


def commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, publish, what):
    """Collective, after every rank's files are in ``tmp_dir``: rank 0 writes the manifest
    (``manifest_bytes()``), fsyncs, renames ``tmp_dir`` to ``final_dir``, fsyncs ``root``, then
    calls ``publish()`` (pointer update, pruning). Every rank learns whether that worked."""
    error = None
    if comm.rank == 0:
        try:
            _write_file(os.path.join(tmp_dir, MANIFEST), [manifest_bytes()])
            _fsync_dir(tmp_dir)
            _replace_dir(tmp_dir, final_dir, root)
            publish()
        except OSError as exc:
            error = f"committing {final_dir} failed: {exc}"
    _agree(comm, error, what)


def _replace_dir(tmp_dir, final_dir, root):
    """Rename tmp_dir to final_dir (moving an existing final_dir aside first), fsync root."""
    if os.path.exists(final_dir):
        # A checkpoint of the same step (a re-run after resume): move it aside, then delete it.
        # Until the new one is renamed into place, find_resume_point falls back to older ones.
        trash = os.path.join(root, f"{TMP_PREFIX}old-{os.path.basename(final_dir)}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final_dir, trash)
        os.rename(tmp_dir, final_dir)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
        _fsync_dir(root)


def _prune(root, keep, step):
    """Delete all but the newest ``keep`` checkpoints up to ``step`` (``latest`` names ``step``).

    Checkpoints newer than ``step`` (left by a run that was resumed from an older step) are
    not counted and not deleted; find_resume_point ignores them.
    """
    for _, path in [c for c in list_checkpoints(root) if c[0] <= step][:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _build_manifest(step, world_size, config, tables, field_groups, num_buckets, num_fields,
                    num_dense, gathered, extra):
    signature = model_signature(config, field_groups, num_fields, num_dense, tables, num_buckets)
    files = {}
    for rank_info in gathered:
        for entry in rank_info["entries"]:
            files[entry["name"]] = {k: v for k, v in entry.items() if k != "name"}
    table_list = []
    for t, table in enumerate(tables):
        per_rank = [g["tables"][t] for g in gathered]
        table_list.append({
            "table_id": int(table.table_id), "dim": int(table.dim), "optimizer": table.optimizer,
            "optimizer_slots": list(table.optimizer_slot_names),
            "row_width": int(table.row_width), "num_buckets": num_buckets,
            "initializer": table.initializer, "seed": int(table.seed),
            "min_count": int(table.min_count),
            "admission_eviction": _table_policy(config, t),
            "fields": ([int(f) for f in field_groups[t]] if field_groups is not None else None),
            "record_bytes": row_record_dtype(table.row_width).itemsize,
            "rows": sum(p["rows"] for p in per_rank),
            "candidates": sum(p["candidates"] for p in per_rank),
            "rows_per_rank": [p["rows"] for p in per_rank],
            "candidates_per_rank": [p["candidates"] for p in per_rank],
            "counters_per_rank": [p["counters"] for p in per_rank],
        })
    from hybridps import __version__
    model_info = None
    if config is not None:
        model_info = {"name": config.model, "num_fields": signature["num_fields"],
                      "num_dense": signature["num_dense"], "dim": config.dim,
                      "hidden": [int(h) for h in config.hidden], "cross_layers": config.cross_layers,
                      "seed": config.seed}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hybridps_version": __version__,
        "step": step, "world_size": world_size,
        "mode": getattr(getattr(config, "mode", None), "value", "collective"),
        "sync": getattr(getattr(config, "sync", None), "value", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_buckets": num_buckets, "owner_function": OWNER_FUNCTION,
        "model_signature": signature, "model_hash": signature_hash(signature),
        "config_hash": _full_config_hash(config),
        "config": config.to_dict() if config is not None else None,
        "model": model_info,
        "tables": table_list,
        "dense": gathered[0]["dense"],
        "data_state": [g["data_state"] for g in gathered],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "extra": extra,
    }


def _table_policy(config, table_id):
    """The table's min_count, ttl_steps, max_rows and eviction (None without a config)."""
    if config is None:
        return None
    from hybridps.config import table_policy
    return table_policy(config, table_id)


def signed_json_bytes(manifest):
    """Manifest JSON with ``manifest_sha256``: the sha256 of its canonical form without it."""
    body = dict(manifest)
    body.pop("manifest_sha256", None)
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, sort_keys=True, indent=1, default=_json_default).encode() + b"\n"


# ---------------------------------------------------------------------------- reading
def list_checkpoints(root):
    """Complete checkpoint directories under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CKPT_NAME.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_checkpoint(path):
    """A checkpoint directory from either itself or a root holding a ``latest`` pointer."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if _CKPT_NAME.match(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is missing: {path} is not a complete "
                              f"checkpoint (damaged, or a copy that did not finish)")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, errors="replace") as fh:
            name = fh.read(200).strip()
        if not _CKPT_NAME.match(name):
            raise CheckpointError(f"{latest} does not name a checkpoint (holds {name[:60]!r})")
        return os.path.join(path, name)
    if os.path.isdir(path) and list_checkpoints(path):
        return list_checkpoints(path)[-1][1]
    raise CheckpointError(f"{path} is neither a checkpoint directory (no {MANIFEST}) nor a "
                          f"checkpoint root (no {LATEST} pointer, no ckpt-* directories)")


def load_manifest(ckpt_dir):
    """The parsed manifest of a checkpoint directory, after checking its own sha256.

    Raises:
        CheckpointError: missing, not JSON (truncated?), not a hybridps checkpoint, a format
            version this hybridps does not read, or its content does not match its sha256.
    """
    manifest = load_signed_json(os.path.join(ckpt_dir, MANIFEST), FORMAT)
    if signature_hash(manifest["model_signature"]) != manifest["model_hash"]:
        raise CheckpointError(f"{os.path.join(ckpt_dir, MANIFEST)}: model_hash does not match the "
                              f"recorded model signature")
    return manifest


def load_signed_json(path, expected_format):
    """A manifest written by :func:`signed_json_bytes`, checked against its own sha256."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file (a directory?): {os.path.dirname(path)} is damaged")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {os.path.dirname(path)} is not complete")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); truncated or overwritten") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise CheckpointError(f"{path} is not a {expected_format} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('format_version')}; this "
                              f"hybridps reads version {FORMAT_VERSION}")
    recorded = manifest.pop("manifest_sha256", None)
    actual = hashlib.sha256(_canonical(manifest)).hexdigest()
    if recorded != actual:
        raise CheckpointError(f"{path}: checksum mismatch (manifest_sha256 {str(recorded)[:12]}..., "
                              f"content hashes to {actual[:12]}...): the manifest was edited or damaged")
    manifest["manifest_sha256"] = recorded
    manifest["_bytes"] = len(raw)
    return manifest


def _check_file(ckpt_dir, manifest, name, hash_it):
    """Problem with one file (missing, wrong size, wrong sha256) or None."""
    entry = manifest["files"].get(name)
    path = os.path.join(ckpt_dir, name)
    if entry is None:
        return f"{path}: not listed in the manifest"
    if not os.path.isfile(path):
        return f"{path}: missing (the manifest lists it with {entry['bytes']} bytes)"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "longer than written"
        return f"{path}: {kind}: {size} bytes, the manifest says {entry['bytes']}"
    if hash_it:
        actual = _sha256_file(path)
        if actual != entry["sha256"]:
            return (f"{path}: checksum mismatch (sha256 {actual[:12]}..., the manifest says "
                    f"{entry['sha256'][:12]}...): the file is damaged")
    return None


def verify_checkpoint(ckpt_dir, level="full"):
    """Problems found in a checkpoint directory (an empty list: intact).

    Args:
        level: ``"quick"`` checks the manifest, every file's presence and size and the sha256
            of the small files (index, dense, state); ``"full"`` also re-hashes the data files.
    """
    try:
        manifest = load_manifest(ckpt_dir)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        hash_it = level == "full" or entry.get("kind") not in ("rows", "candidates")
        problem = _check_file(ckpt_dir, manifest, name, hash_it)
        if problem:
            problems.append(problem)
    return problems


def find_resume_point(root, verify="quick"):
    """The checkpoint to resume from: the one ``latest`` names, or the newest older intact one.

    ``latest`` is the authority: it is replaced only after a checkpoint is complete. Older
    checkpoints are tried newest first when it is damaged; checkpoints newer than it (an
    abandoned run resumed from an older step, or a crash between a rename and the pointer
    update) are ignored with a warning. Without a readable ``latest`` every checkpoint is a
    candidate, newest first.

    Args:
        verify: "quick" or "full" (see :func:`verify_checkpoint`).
    Returns:
        ResumePoint(path or None, step (0 without a checkpoint), warnings list of str).
    """
    warnings = []
    candidates = list_checkpoints(root)
    latest_path = os.path.join(root, LATEST)
    latest_step = None
    if os.path.isfile(latest_path):
        with open(latest_path, errors="replace") as fh:
            match = _CKPT_NAME.match(fh.read(200).strip())
        if match is None:
            warnings.append(f"{latest_path} does not name a checkpoint; trying every checkpoint")
        elif not os.path.isdir(os.path.join(root, match.group(0))):
            warnings.append(f"{latest_path} names {match.group(0)}, which does not exist")
            latest_step = int(match.group(1))
        else:
            latest_step = int(match.group(1))
    elif candidates:
        warnings.append(f"{latest_path} is missing; trying every checkpoint")
    if latest_step is not None:
        newer = [p for s, p in candidates if s > latest_step]
        if newer:
            warnings.append(f"ignoring {', '.join(os.path.basename(p) for p in newer)}: newer than "
                            f"{LATEST} (an abandoned run or a save that did not finish)")
        candidates = [(s, p) for s, p in candidates if s <= latest_step]
    damaged = []
    for step, path in reversed(candidates):
        problems = verify_checkpoint(path, level=verify)
        if not problems:
            if warnings and step != latest_step:
                warnings.append(f"falling back to {path} (step {step})")
            return ResumePoint(path, step, warnings, damaged)
        damaged.append((path, problems))
        warnings.append(f"checkpoint {path} is damaged, skipping it: {_shown(problems)}")
    if candidates:
        warnings.append(f"no intact checkpoint under {root}")
    return ResumePoint(None, 0, warnings, damaged)


def _shown(problems, limit=3):
    return "; ".join(problems[:limit]) + (f" (+{len(problems) - limit} more)" if len(problems) > limit else "")


def resume_candidates(root, verify="quick"):
    """(paths to try in order, warnings): the resume point, then every older checkpoint."""
    paths, warnings, _ = _resume_plan(root, verify)
    return paths, warnings


def _resume_plan(root, verify="quick"):
    """(paths to try in order, warnings, [(path, problems)] of the checkpoints refused)."""
    point = find_resume_point(root, verify)
    if point.path is None:
        return [], point.warnings, point.damaged
    older = [p for s, p in reversed(list_checkpoints(root)) if s < point.step]
    return [point.path] + older, point.warnings, point.damaged


def set_aside_damaged(root, paths):
    """Rename each refused checkpoint ``ckpt-<step>`` to ``damaged-ckpt-<step>`` (``.2``,
    ``.3``, ... when taken), so that no later save prunes or replaces it; remove ``latest`` if
    it names one of them. Returns the new paths.

    Raises:
        CheckpointError: a rename failed (nothing else is tried after it).
    """
    moved = []
    latest_path = os.path.join(root, LATEST)
    latest = None
    if os.path.isfile(latest_path):
        with open(latest_path, errors="replace") as fh:
            latest = fh.read(200).strip()
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        target = os.path.join(root, DAMAGED_PREFIX + name)
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(root, f"{DAMAGED_PREFIX}{name}.{n}")
        try:
            os.rename(path, target)
        except OSError as exc:
            raise CheckpointError(f"cannot set the damaged checkpoint {path} aside as {target}: {exc}") from None
        moved.append(target)
        if latest == name:
            try:
                os.unlink(latest_path)
            except OSError as exc:
                raise CheckpointError(f"cannot remove {latest_path} (it names the damaged {path}): {exc}") from None
    if moved:
        _fsync_dir(root)
    return moved


def _set_aside_collectively(comm, root, refused, log):
    """rank 0 sets the refused checkpoints aside; every rank learns whether that worked."""
    result = None
    if comm.rank == 0:
        try:
            result = set_aside_damaged(root, [path for path, _ in refused])
        except CheckpointError as exc:
            result = exc
    result = comm.bcast_object(result if not isinstance(result, CheckpointError) else str(result))
    if isinstance(result, str):
        raise CheckpointError(result)
    if comm.rank == 0:
        for (path, _), target in zip(refused, result):
            log(f"kept the damaged {path} as {target} (no save prunes or replaces it; inspect it "
                f"with `hybridps inspect {target}`, delete it when done)")


def _read_index(ckpt_dir, manifest, name, bytes_read):
    problem = _check_file(ckpt_dir, manifest, name, hash_it=True)
    if problem:
        raise CheckpointError(problem)
    path = os.path.join(ckpt_dir, name)
    bytes_read["index"] += manifest["files"][name]["bytes"]
    try:
        with np.load(path) as z:
            index = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable index ({exc})") from None
    return index


def _read_buckets(path, expected_bytes, offsets, crc, buckets, dtype, bytes_read):
    """Records of ``buckets`` from one bucket-sorted file, CRC-checked per bucket."""
    size = dtype.itemsize
    num_buckets = len(offsets) - 1
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] * size != expected_bytes:
        raise CheckpointError(f"{path}: the index does not describe this file "
                              f"({offsets[-1]} records of {size} bytes vs {expected_bytes} bytes)")
    starts, stops = offsets[buckets], offsets[buckets + 1]
    total = int((stops - starts).sum())
    records = np.empty(total, dtype=dtype)
    if total == 0:
        return records
    raw = memoryview(records).cast("B")
    ranges = []                                   # coalesced (file start, length) in records
    for start, stop in zip(starts, stops):
        if stop == start:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += stop - start
        else:
            ranges.append([int(start), int(stop - start)])
    position = 0
    with open(path, "rb", buffering=0) as fh:
        for start, count in ranges:
            fh.seek(start * size)
            wanted = count * size
            got = 0
            while got < wanted:
                n = fh.readinto(raw[position + got:position + wanted])
                if not n:
                    raise CheckpointError(f"{path}: truncated: ends at byte {start * size + got}, "
                                          f"the index needs {(start + count) * size}")
                got += n
            position += wanted
    bytes_read["data"] += total * size
    position = 0
    for b, start, stop in zip(buckets, starts, stops):
        length = int(stop - start) * size
        if length and zlib.crc32(raw[position:position + length]) != crc[b]:
            raise CheckpointError(f"{path}: checksum mismatch in bucket {b} of {num_buckets} "
                                  f"(bytes {start * size}..{stop * size}): the file is damaged")
        position += length
    expected = np.repeat(buckets, (stops - starts))
    actual = bucket_ids(records["key"], num_buckets)
    if not np.array_equal(expected, actual):
        bad = int(np.flatnonzero(expected != actual)[0])
        raise CheckpointError(f"{path}: key {records['key'][bad]} is stored in bucket "
                              f"{expected[bad]} but belongs to bucket {actual[bad]}: damaged file")
    return records


def read_table_rows(ckpt_dir, manifest, table_index, buckets=None, bytes_read=None):
    """Rows and candidates of one table from every saved shard, for the given buckets.

    Args:
        buckets: bucket ids to read (default all).
        bytes_read: dict to add byte counts to (keys ``data`` and ``index``).
    Returns:
        dict with keys, values (n, dim), slots (n, n_slots, dim), hits, last_update_step,
        update_count, candidate_keys, candidate_hits.
    Raises:
        CheckpointError: a missing, truncated or damaged file, naming it.
    """
    bytes_read = bytes_read if bytes_read is not None else {"data": 0, "index": 0}
    bytes_read.setdefault("data", 0)
    bytes_read.setdefault("index", 0)
    info = manifest["tables"][table_index]
    num_buckets = int(info["num_buckets"])
    buckets = (np.arange(num_buckets, dtype=np.int64) if buckets is None
               else np.asarray(buckets, dtype=np.int64))
    dim, width = int(info["dim"]), int(info["row_width"])
    ns = width // dim - 1
    rec_dtype = row_record_dtype(width)
    row_parts, cand_parts = [], []
    for rank in range(int(manifest["world_size"])):
        rows_name, cands_name, index_name = _shard_names(table_index, rank)
        index = _read_index(ckpt_dir, manifest, index_name, bytes_read)
        if int(index["num_buckets"]) != num_buckets:
            raise CheckpointError(f"{os.path.join(ckpt_dir, index_name)}: {int(index['num_buckets'])} "
                                  f"buckets, the manifest says {num_buckets}")
        for name, offsets, crc, dtype, parts in (
                (rows_name, index["row_offsets"], index["row_crc"], rec_dtype, row_parts),
                (cands_name, index["cand_offsets"], index["cand_crc"], CANDIDATE_DTYPE, cand_parts)):
            problem = _check_file(ckpt_dir, manifest, name, hash_it=False)
            if problem:
                raise CheckpointError(problem)
            parts.append(_read_buckets(os.path.join(ckpt_dir, name), manifest["files"][name]["bytes"],
                                       offsets, crc, buckets, dtype, bytes_read))
    rows = np.concatenate(row_parts) if row_parts else np.empty(0, dtype=rec_dtype)
    cands = np.concatenate(cand_parts) if cand_parts else np.empty(0, dtype=CANDIDATE_DTYPE)
    block = rows["row"]
    out = {"keys": np.ascontiguousarray(rows["key"]),
           "values": np.ascontiguousarray(block[:, :dim]),
           "slots": np.ascontiguousarray(block[:, dim:]).reshape(len(rows), ns, dim),
           "candidate_keys": np.ascontiguousarray(cands["key"]),
           "candidate_hits": np.ascontiguousarray(cands["hits"])}
    for name in _META_FIELDS:
        out[name] = np.ascontiguousarray(rows[name])
    return out


def read_dense(ckpt_dir, manifest, bytes_read=None):
    """(model variable arrays, optimizer variable arrays) of dense.npz, sha256-checked."""
    if not manifest.get("dense"):
        raise CheckpointError(f"{ckpt_dir} holds no dense state (saved without a model)")
    problem = _check_file(ckpt_dir, manifest, DENSE_FILE, hash_it=True)
    if problem:
        raise CheckpointError(problem)
    if bytes_read is not None:
        bytes_read["dense"] = bytes_read.get("dense", 0) + manifest["files"][DENSE_FILE]["bytes"]
    with np.load(os.path.join(ckpt_dir, DENSE_FILE)) as z:
        model_values = [z[f"model_{i:04d}"] for i in range(len(manifest["dense"]["model_variables"]))]
        opt = manifest["dense"].get("optimizer")
        opt_values = [z[f"optimizer_{i:04d}"] for i in range(len(opt["variables"]))] if opt else None
    return model_values, opt_values


# ---------------------------------------------------------------------------- restore
def check_compatible(manifest, ckpt_dir, tables, signature=None):
    """Raise CheckpointError if the checkpoint was written by another model or table layout."""
    problems = []
    saved_tables = manifest["tables"]
    if len(saved_tables) != len(tables):
        problems.append(f"{len(saved_tables)} tables in the checkpoint, {len(tables)} in this run")
    for t, (saved, table) in enumerate(zip(saved_tables, tables)):
        for name, mine in (("dim", table.dim), ("optimizer", table.optimizer),
                           ("row_width", table.row_width)):
            if saved[name] != mine:
                problems.append(f"table {t}: {name} {saved[name]!r} in the checkpoint, {mine!r} here")
    if signature is not None:
        saved_signature = manifest["model_signature"]
        if signature_hash(signature) != manifest["model_hash"]:
            for key in sorted(set(signature) | set(saved_signature)):
                if key == "tables":
                    continue
                if signature.get(key) != saved_signature.get(key):
                    problems.append(f"{key} {saved_signature.get(key)!r} in the checkpoint, "
                                    f"{signature.get(key)!r} here")
            if not problems:
                problems.append(f"model hash {manifest['model_hash'][:12]} in the checkpoint, "
                                f"{signature_hash(signature)[:12]} here")
    if problems:
        raise CheckpointMismatchError(f"{os.path.join(ckpt_dir, MANIFEST)} was written by another model: "
                              + "; ".join(problems))


def _config_differences(manifest, config):
    if config is None or manifest.get("config") is None:
        return []
    if _full_config_hash(config) == manifest.get("config_hash"):
        return []
    mine, saved = config.to_dict(), manifest["config"]
    changed = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
    return [f"config differs from the checkpoint's in {', '.join(changed)} "
            f"(allowed: these do not change the model's shape)"] if changed else []


def restore_checkpoint(path, *, tables, comm=None, config=None, field_groups=None,
                       num_fields=None, num_dense=None, model=None, optimizer=None,
                       restore_rng=False, shard=None):
    """Restore a checkpoint onto this job's world size (collective).

    Every rank reads the buckets it owns (``b % world_size == rank``; with ``shard=(index,
    count)``, ``b % count == index``, as PS servers own them) from every saved shard,
    checks them, and only when all ranks verified their part are the rows imported into
    ``tables`` (which must be empty), so a damaged checkpoint never leaves half-restored
    tables. Table counters cannot be set through the table API: with the saved world size each
    rank gets its own counters back in ``report.counters``; with another, rank 0 gets the
    totals and the others zeros, so sums over ranks stay right. If a table offers
    ``restore_counters(dict)`` it is called with them.

    Args:
        path: a checkpoint directory, or a root (its ``latest`` is used).
        tables: this rank's fresh tables, in table order.
        comm: hybridps.comm.Comm, or None for one process.
        config, field_groups, num_fields, num_dense: this run's model (checked against the
            checkpoint's model signature when given).
        model, optimizer: Keras model and dense optimizer to load (built if needed).
        restore_rng: also set numpy's global RNG state to the saved one.
        shard: (index, count) among the key owners, default (rank, size); NO_SHARD for a rank
            that holds no keys (a PS worker: it reads no table buckets, its tables stay empty).
    Returns:
        RestoreReport (``data_state`` comes from the saved ranks that recorded one, the same
        rank's when the number of data readers is unchanged).
    Raises:
        CheckpointError: damaged or partial checkpoint, on every rank alike (the message names
            the file and the problem). CheckpointMismatchError (a subclass): intact, but from
            another model (model signature, table dims or optimizers, dense shapes differ).
    """
    started = time.perf_counter()
    comm = comm or SingleProcessComm()
    bytes_read = {"manifest": 0, "index": 0, "data": 0, "dense": 0, "state": 0}
    manifest, error, ckpt_dir = None, None, None
    if comm.rank == 0:
        try:
            ckpt_dir = resolve_checkpoint(path)
            manifest = load_manifest(ckpt_dir)
            signature = (model_signature(config, field_groups, num_fields, num_dense, tables)
                         if config is not None else None)
            check_compatible(manifest, ckpt_dir, tables, signature)
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            error = _error_of(exc)
    ckpt_dir, manifest, error = comm.bcast_object((ckpt_dir, manifest, error))
    if error:
        raise (CheckpointMismatchError if error[0] == "mismatch" else CheckpointError)(error[1])
    bytes_read["manifest"] = manifest["_bytes"] if comm.rank == 0 else 0
    num_buckets = int(manifest["num_buckets"])
    saved_world = int(manifest["world_size"])
    shard_index, num_shards = _shard_of(shard, comm)
    mine = (buckets_of_rank(shard_index, num_shards, num_buckets) if shard_index is not None
            else np.empty(0, dtype=np.int64))

    loaded, dense, state, error = [], None, None, None
    try:
        if any(t.size or t.num_candidates for t in tables):
            raise CheckpointError("restore needs empty tables; this rank's tables already hold "
                                  f"{[t.size for t in tables]} rows")
        for t in range(len(tables)):
            loaded.append(read_table_rows(ckpt_dir, manifest, t, mine, bytes_read))
        if model is not None:
            dense = read_dense(ckpt_dir, manifest, bytes_read)
        source_rank = comm.rank if comm.rank < saved_world else 0
        state_name = f"rank-{source_rank:05d}.state.json"
        problem = _check_file(ckpt_dir, manifest, state_name, hash_it=True)
        if problem:
            raise CheckpointError(problem)
        with open(os.path.join(ckpt_dir, state_name), "rb") as fh:
            state = json.loads(fh.read())
        bytes_read["state"] += manifest["files"][state_name]["bytes"]
        if dense is not None:
            _check_dense_shapes(ckpt_dir, manifest, model, dense)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:   # never leave a rank waiting
        error = _error_of(exc)
    _agree(comm, error, f"restoring {ckpt_dir}")

    counters = (_counters_for_rank(manifest, shard_index, num_shards) if shard_index is not None
                else [{n: 0 for n in _COUNTER_NAMES} for _ in manifest["tables"]])
    for table, rows, table_counters in zip(tables, loaded, counters):
        table.import_rows(rows["keys"], rows["values"], rows["slots"], rows["hits"],
                          rows["last_update_step"], rows["update_count"])
        table.import_candidates(rows["candidate_keys"], rows["candidate_hits"])
        if hasattr(table, "restore_counters"):
            table.restore_counters(table_counters)
    if dense is not None:
        _assign_dense(model, optimizer, *dense)
    if restore_rng and state.get("rng_state"):
        _set_numpy_rng_state(state["rng_state"])
    # PS checkpoints record no data position for servers; ranks 0..W-1 read the data in both modes
    data_states = [d for d in manifest["data_state"] if d is not None]
    data_state = data_states[comm.rank % len(data_states)] if data_states else None
    bytes_read["total"] = sum(bytes_read.values())
    return RestoreReport(path=ckpt_dir, step=int(manifest["step"]), saved_world_size=saved_world,
                         num_buckets=num_buckets,
                         bytes_read=bytes_read, rows=[len(r["keys"]) for r in loaded],
                         candidates=[len(r["candidate_keys"]) for r in loaded],
                         data_state=data_state, rng_state=state.get("rng_state"), counters=counters,
                         warnings=_config_differences(manifest, config),
                         seconds=time.perf_counter() - started)


_COUNTER_NAMES = ("admitted_keys", "refused_inserts", "evicted_rows", "dropped_unadmitted_grads",
                  "dropped_missing_grads", "skipped_nonfinite_grads", "applied_row_updates")


def _counters_for_rank(manifest, rank, world_size):
    """Per table: the saved counters of this rank (same world size) or the totals on rank 0."""
    out = []
    for info in manifest["tables"]:
        per_rank = info["counters_per_rank"]
        if world_size == len(per_rank):
            mine = per_rank[rank]
            out.append({n: int(mine.get(n, 0)) for n in _COUNTER_NAMES})
        elif rank == 0:
            out.append({n: int(sum(c.get(n, 0) for c in per_rank)) for n in _COUNTER_NAMES})
        else:
            out.append({n: 0 for n in _COUNTER_NAMES})
    return out


def _check_dense_shapes(ckpt_dir, manifest, model, dense):
    model_values, _ = dense
    variables = model.variables
    if len(variables) != len(model_values):
        raise CheckpointMismatchError(
            f"{os.path.join(ckpt_dir, DENSE_FILE)} holds {len(model_values)} model variables, this "
            f"model has {len(variables)}: another model")
    for variable, value, saved in zip(variables, model_values, manifest["dense"]["model_variables"]):
        if tuple(variable.shape) != value.shape:
            raise CheckpointMismatchError(
                f"{os.path.join(ckpt_dir, DENSE_FILE)}: variable {saved['name']} has shape "
                f"{value.shape}, this model's {variable.name} has {tuple(variable.shape)}: another model")


def _assign_dense(model, optimizer, model_values, opt_values):
    """Assign model variables, then build the optimizer and assign its variables (by order)."""
    for variable, value in zip(model.variables, model_values):
        variable.assign(value)
    if optimizer is None or opt_values is None:
        return
    if hasattr(optimizer, "build"):                     # Keras >= 2.11 and Keras 3
        optimizer.build(model.trainable_variables)
    elif hasattr(optimizer, "_create_all_weights"):     # tf.keras.optimizers.legacy
        optimizer._create_all_weights(model.trainable_variables)
    opt_vars = _optimizer_variables(optimizer)
    if len(opt_vars) != len(opt_values):
        raise CheckpointError(f"the dense optimizer has {len(opt_vars)} variables after build, the "
                              f"checkpoint {len(opt_values)}: another optimizer")
    for variable, value in zip(opt_vars, opt_values):
        if tuple(variable.shape) != value.shape:
            raise CheckpointError(f"dense optimizer variable {variable.name}: shape "
                                  f"{tuple(variable.shape)}, checkpoint {value.shape}")
        variable.assign(value)


# ---------------------------------------------------------------------------- trainer glue
def save_trainer(trainer, step, data_state=None, dense_optimizer=None):
    """Checkpoint a Trainer after ``step`` completed steps into config.checkpoint_dir.

    Collective over every rank (PS servers included). Call after the step's push has been
    applied (SSP/ASP: after draining the pipeline; PS: when every worker is at the consistent
    point). ``data_state`` defaults to ``trainer.dataset.state()``, which is right when the
    loader has handed out exactly ``step`` batches; a loader that prefetches must pass the
    position of batch ``step`` instead. ``dense_optimizer`` (rank 0) defaults to the collective
    path's Keras optimizer; PS mode passes the one hybridps.ps.dense_state gathered from the
    servers. In PS mode the servers write the table shards (workers' shards are empty) and only
    workers record a data position.

    Raises:
        CheckpointError: a failed write.
    """
    c = trainer.config
    if dense_optimizer is None and getattr(trainer, "roles", None) is None:
        dense_optimizer = trainer.dense.optimizer
    if getattr(trainer, "is_server", False):
        data_state = None
    elif data_state is None:
        data_state = trainer.dataset.state()
    return save_checkpoint(
        c.checkpoint_dir, step, tables=trainer.sharded.tables, comm=trainer.comm, config=c,
        field_groups=trainer.sharded.field_groups, model=trainer.model,
        optimizer=dense_optimizer, data_state=data_state,
        num_fields=trainer.num_fields, num_dense=trainer.num_dense, keep=c.keep_checkpoints)


def resume_trainer(trainer, log=None):
    """Restore a Trainer from the newest intact checkpoint under config.checkpoint_dir.

    Damaged checkpoints are skipped (newest first) with a warning, and once an older one is
    restored they are set aside as ``damaged-ckpt-<step>`` (:func:`set_aside_damaged`), so
    the resumed run never prunes or replaces them. With no checkpoint at all under the root
    (a first run: no ``ckpt-*`` directory, no ``latest``) training starts at step 0 with a
    message. With checkpoints but none intact the resume is refused (CheckpointError naming
    every damaged file; nothing is changed on disk) unless ``config.resume_fresh``: then the
    damaged ones are set aside and training starts at step 0. Messages go to ``log``
    (default: stderr on rank 0).

    Returns:
        the step to start at (the checkpoint's completed steps, or 0).
    Raises:
        CheckpointError: no intact checkpoint among existing ones (without resume_fresh), a
            damaged checkpoint could not be set aside, the routing of keys to ranks disagrees
            with the checkpoint's owner function (see the module docstring), or a checkpoint
            of another model.
    """
    comm = trainer.comm
    log = log or (lambda message: sys.stderr.write(f"[hybridps] checkpoint: {message}\n"))
    root = trainer.config.checkpoint_dir
    roles = getattr(trainer, "roles", None)
    if roles is None:                     # collective: every rank owns buckets and the dense state
        shard, model, optimizer = None, trainer.model, trainer.dense.optimizer
    else:                                 # PS: servers own the buckets, worker 0 the dense state
        from hybridps.dense import make_dense_optimizer
        c = trainer.config
        shard = ((roles.server_index(comm.rank), roles.num_servers) if trainer.is_server
                 else NO_SHARD)
        model = trainer.model if comm.rank == 0 else None
        optimizer = (make_dense_optimizer(c.effective_dense_optimizer, c.effective_dense_learning_rate)
                     if comm.rank == 0 else None)
    plan = None
    if comm.rank == 0:
        candidates, warnings, refused = _resume_plan(root)
        plan = (candidates, warnings, refused, _latest_problem(root, candidates, refused))
    candidates, warnings, refused, latest_problem = comm.bcast_object(plan)
    report = None
    for path in candidates:
        try:
            report = restore_checkpoint(
                path, tables=trainer.sharded.tables, comm=comm, config=trainer.config,
                field_groups=trainer.sharded.field_groups, num_fields=trainer.num_fields,
                num_dense=trainer.num_dense, model=model, optimizer=optimizer,
                restore_rng=True, shard=shard)
            break
        except CheckpointMismatchError:
            raise
        except CheckpointError as exc:
            warnings.append(f"cannot restore {path}, trying an older one: {exc}")
            refused.append((path, [str(exc)]))
    if report is None:
        if not refused and latest_problem is None:   # nothing was ever checkpointed here
            set_aside = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                               if n.startswith(DAMAGED_PREFIX))
            warnings.append(f"no checkpoint to resume from under {root}; starting from step 0"
                            + (f" (set aside earlier: {', '.join(set_aside)})" if set_aside else ""))
            if comm.rank == 0:
                for message in warnings:
                    log(message)
            return 0
        damage = "; ".join([f"{os.path.basename(p)}: {_shown(problems)}" for p, problems in refused]
                           + ([latest_problem] if latest_problem else []))
        if not getattr(trainer.config, "resume_fresh", False):
            raise CheckpointError(
                f"cannot resume: no intact checkpoint under {root} ({damage}). Nothing there was "
                f"changed. Repair or move the damaged checkpoints away, or add --resume-fresh "
                f"(config resume_fresh: true) to start from step 0 with them kept aside as "
                f"{DAMAGED_PREFIX}ckpt-<step>")
        if comm.rank == 0:
            for message in warnings:
                log(message)
            log(f"resume_fresh: starting from step 0 (no intact checkpoint under {root})")
        _set_aside_collectively(comm, root, refused, log)
        return 0
    check_routing(trainer.sharded.tables, report, comm, shard=shard)
    if report.data_state is not None and not getattr(trainer, "is_server", False):
        trainer.dataset.restore(report.data_state)
    if roles is not None and comm.rank == 0:     # worker 0 hands this state to the servers
        from hybridps.ps.dense_state import worker_optimizer_from_keras
        trainer.backend.initial_optimizer = worker_optimizer_from_keras(trainer.config, model, optimizer)
    if comm.rank == 0:
        for message in warnings + report.warnings:
            log(message)
    if refused:   # newer than the one restored: the resumed run would prune or replace them
        _set_aside_collectively(comm, root, refused, log)
    if comm.rank == 0:
        where = (f"{comm.size} ranks" if roles is None else
                 f"{comm.size} ranks in PS mode, {roles.num_servers} of them servers")
        log(f"resumed from {report.path} (step {report.step}, saved on {report.saved_world_size} "
            f"ranks, restored on {where})")
    return report.step


def _latest_problem(root, candidates, refused):
    """What is wrong with ``latest`` when no checkpoint it could name exists (None: nothing,
    or there are checkpoints to try or refuse)."""
    path = os.path.join(root, LATEST)
    if candidates or refused or not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        return f"{path} is not a file"
    with open(path, errors="replace") as fh:
        name = fh.read(200).strip()
    return f"{path} names {name[:60]!r}, which is not a checkpoint there"


def check_routing(tables, report, comm, owner_fn=None, shard=None):
    """Raise CheckpointError if the exchange routes restored keys to another rank.

    ``shard``: (index, count) this rank's place among the key owners (default (rank, size);
    PS servers: (server index, number of servers)), or NO_SHARD for a rank that holds no keys.

    ``owner_fn(keys, world_size, num_buckets)``; default hybridps.embedding.routing.owner_ranks
    as ``owner_ranks(keys, world_size, num_buckets=...)``, or ``owner_ranks(keys, world_size)``
    while the routing does not take buckets (then only world sizes dividing num_buckets pass).
    """
    if owner_fn is None:
        from hybridps.embedding import routing

        def owner_fn(keys, world_size, num_buckets):
            try:
                return routing.owner_ranks(keys, world_size, num_buckets=num_buckets)
            except TypeError:       # routing without buckets: mix64(key) % world_size
                return routing.owner_ranks(keys, world_size)
    num_buckets = report.num_buckets
    index, count = _shard_of(shard, comm)
    wrong = 0
    for table in tables:
        keys = table.export(values=False)["keys"]
        if len(keys):
            wrong += (len(keys) if index is None
                      else int((np.asarray(owner_fn(keys, count, num_buckets)) != index).sum()))
    total_wrong = comm.allgather_object(wrong)
    if sum(total_wrong):
        raise CheckpointError(
            f"{sum(total_wrong)} restored rows sit on a rank that the key routing does not send "
            f"them to: the routing must use owner(key) = {OWNER_FUNCTION} (num_buckets="
            f"{num_buckets}), which equals mix64(key) % world_size only when world_size divides "
            f"num_buckets; restore on {count} key owners needs the bucket-based routing")


# ---------------------------------------------------------------------------- inspect
def inspect_checkpoint(path, level="full"):
    """Summary and verification of one checkpoint directory (or a root's checkpoints).

    A directory is one checkpoint if it holds a ``manifest.json`` entry (file or not) or is
    named ``ckpt-<step>`` / ``damaged-ckpt-<step>``; otherwise it is a root.

    Returns:
        dict: for a checkpoint, ``path, ok, problems, step, world_size, mode, created,
        config_hash, model_hash, num_buckets, tables [{dim, optimizer, rows, candidates,
        bytes}], dense_variables, total_bytes, files``; for a root, ``root, latest,
        checkpoints [...], set_aside`` (damaged checkpoints a resume renamed), ``problems``
        (what is wrong with ``latest``, or no checkpoint at all) and ``ok`` (no problems: the
        checkpoint ``latest`` names is intact).
    """
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path) and not (os.path.lexists(os.path.join(path, MANIFEST))
                                    or _CHECKPOINT_DIR_NAME.match(name)):
        found = [inspect_checkpoint(p, level) for _, p in list_checkpoints(path)]
        latest, problems = _inspect_latest(path, found)
        if not found:
            problems.append(f"no checkpoint (ckpt-<step> directory) under {path}")
        set_aside = sorted(n for n in os.listdir(path) if n.startswith(DAMAGED_PREFIX))
        return {"root": path, "latest": latest, "checkpoints": found, "set_aside": set_aside,
                "problems": problems, "ok": not problems}
    summary = {"path": path, "problems": verify_checkpoint(path, level)}
    try:
        manifest = load_manifest(path)
    except CheckpointError:
        summary["ok"] = False
        return summary
    table_bytes = {}
    for name, entry in manifest["files"].items():
        if "table" in entry:
            table_bytes[entry["table"]] = table_bytes.get(entry["table"], 0) + entry["bytes"]
    summary.update(
        ok=not summary["problems"], step=manifest["step"], world_size=manifest["world_size"],
        mode=manifest["mode"], created=manifest["created"], config_hash=manifest["config_hash"],
        model_hash=manifest["model_hash"], num_buckets=manifest["num_buckets"],
        model=manifest.get("model"),
        tables=[{"table": t, "dim": info["dim"], "optimizer": info["optimizer"], "rows": info["rows"],
                 "candidates": info["candidates"], "bytes": table_bytes.get(t, 0),
                 "admission_eviction": info.get("admission_eviction")}
                for t, info in enumerate(manifest["tables"])],
        dense_variables=len(manifest["dense"]["model_variables"]) if manifest.get("dense") else 0,
        total_bytes=manifest["total_bytes"], files=len(manifest["files"]), level=level)
    return summary


def _inspect_latest(root, found):
    """(the name ``latest`` holds or None, problems with it) for a root's checkpoints."""
    path = os.path.join(root, LATEST)
    if not os.path.lexists(path):
        return None, ([f"{path} is missing (resume tries every checkpoint, newest first)"]
                      if found else [])
    if not os.path.isfile(path):
        return None, [f"{path} is not a file (it must be the pointer to the newest checkpoint)"]
    with open(path, errors="replace") as fh:
        latest = fh.read(200).strip()
    if not _CKPT_NAME.match(latest):
        return latest, [f"{path} does not name a checkpoint (holds {latest[:60]!r})"]
    named = [c for c in found if os.path.basename(c["path"]) == latest]
    if not named:
        return latest, [f"{path} names {latest}, which does not exist"]
    if not named[0]["ok"]:
        return latest, [f"{path} names {latest}, which is damaged (see its problems above)"]
    return latest, []


def _format_summary(summary):
    if "root" in summary:
        lines = [f"{summary['root']}: latest -> {summary['latest']}"]
        lines += [_format_summary(c) for c in summary["checkpoints"]] or ["  no checkpoints"]
        if summary.get("set_aside"):
            lines.append(f"  set aside by a resume (damaged, never pruned): {', '.join(summary['set_aside'])}")
        if summary["problems"]:
            lines.append(f"{summary['root']}: NOT OK")
            lines += [f"  - {p}" for p in summary["problems"]]
        return "\n".join(lines)
    if "step" not in summary:
        return f"{summary['path']}: DAMAGED\n" + "\n".join(f"  - {p}" for p in summary["problems"])
    lines = [f"{summary['path']}: step {summary['step']}, {summary['world_size']} ranks, mode "
             f"{summary['mode']}, {summary['num_buckets']} buckets, {summary['total_bytes']} bytes in "
             f"{summary['files']} files, {summary['dense_variables']} dense variables, created "
             f"{summary['created']}"]
    for t in summary["tables"]:
        policy = t.get("admission_eviction")
        policy_text = (f", min_count {policy['min_count']}, ttl_steps {policy['ttl_steps']}, "
                       f"max_rows {policy['max_rows']} ({policy['eviction']})") if policy else ""
        lines.append(f"  table {t['table']}: dim {t['dim']}, {t['optimizer']}, {t['rows']} rows, "
                     f"{t['candidates']} candidates, {t['bytes']} bytes{policy_text}")
    checked = "every sha256" if summary.get("level") == "full" else "sizes and small files"
    lines.append(f"  verification ({checked}): " + ("OK" if summary["ok"] else "DAMAGED"))
    lines += [f"  - {p}" for p in summary["problems"]]
    return "\n".join(lines)


def add_inspect_arguments(parser):
    """Arguments of ``hybridps inspect DIR``; sets ``func`` to :func:`inspect_main`."""
    parser.add_argument("dir", help="a checkpoint directory or a checkpoint root")
    parser.add_argument("--quick", action="store_true",
                        help="check sizes and small files only (skip the sha256 of row data)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=inspect_main)


def inspect_main(args):
    """``hybridps inspect DIR``: print the summary; exit code 1 if anything is damaged."""
    if not os.path.isdir(args.dir):
        raise CheckpointError(f"{args.dir} is not a directory")
    summary = inspect_checkpoint(args.dir, level="quick" if args.quick else "full")
    print(json.dumps(summary, indent=2, default=_json_default) if args.json else _format_summary(summary))
    return 0 if summary["ok"] else 1
