"""Writing a checkpoint: every rank its shards, rank 0 the dense state and the manifest.

What lives here: :func:`save_checkpoint` (collective, atomic: see hybridps.checkpoint for the
format and the protocol), the bucket-sorted record chunks of a table shard with their per-bucket
CRC32, the dense file, pruning to the newest ``keep``, and removing what failed or killed saves
left behind. What does not: reading
(hybridps.checkpoint.reader), deciding when to save (hybridps.checkpoint.manager).
"""
import io
import os
import shutil
import time
import zlib

import numpy as np

from hybridps.checkpoint.files import (agree, begin_atomic_dir, canonical_json, commit_atomic_dir,
                                       manifest_json_bytes, write_atomic_small, write_file)
from hybridps.checkpoint.format import (CANDIDATE_DTYPE, DENSE_FILE, LATEST, META_FIELDS, TMP_PREFIX,
                                        CheckpointInfo, build_manifest, checkpoint_name,
                                        list_checkpoints, numpy_rng_state, row_record_dtype,
                                        shard_names)
from hybridps.comm import SingleProcessComm
from hybridps.dense.optimizer_state import optimizer_kind, optimizer_state, state_names
from hybridps.errors import CheckpointError
from hybridps.sparse.routing import DEFAULT_NUM_BUCKETS, bucket_ids
from hybridps.tf_compat import model_weights

_CHUNK_BYTES = 16 << 20                  # records are built and written this much at a time


def _test_pause_seconds():
    # Testing aid for crash tests: sleep this long after each file a save writes. Read here
    # (not in hybridps.config) because it is not a training setting.
    value = os.environ.get("HYBRIDPS_CKPT_TEST_PAUSE", "")
    return float(value) if value else 0.0


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
    rows_name, cands_name, index_name = shard_names(table_index, rank)
    rec_dtype = row_record_dtype(row_width)

    def fill_rows(records, positions):
        records["key"] = exported["keys"][positions]
        for name in META_FIELDS:
            records[name] = exported[name][positions]
        records["row"][:, :dim] = exported["values"][positions]
        if ns:
            records["row"][:, dim:] = exported["slots"][positions].reshape(len(positions), ns * dim)

    def fill_cands(records, positions):
        records["key"] = exported["candidate_keys"][positions]
        records["hits"] = exported["candidate_hits"][positions]

    entries = []
    chunks, row_offsets, row_crc = _sorted_records(exported["keys"], num_buckets, rec_dtype, fill_rows)
    sha, size = write_file(os.path.join(directory, rows_name), chunks)
    entries.append({"name": rows_name, "sha256": sha, "bytes": size, "kind": "rows",
                    "table": table_index, "rank": rank})
    _pause(pause)
    chunks, cand_offsets, cand_crc = _sorted_records(exported["candidate_keys"], num_buckets,
                                                     CANDIDATE_DTYPE, fill_cands)
    sha, size = write_file(os.path.join(directory, cands_name), chunks)
    entries.append({"name": cands_name, "sha256": sha, "bytes": size, "kind": "candidates",
                    "table": table_index, "rank": rank})
    _pause(pause)
    buffer = io.BytesIO()   # compressed: every restoring rank reads every index file whole
    np.savez_compressed(buffer, row_offsets=row_offsets, row_crc=row_crc,
                        cand_offsets=cand_offsets, cand_crc=cand_crc,
                        num_buckets=np.int64(num_buckets), record_bytes=np.int64(rec_dtype.itemsize))
    sha, size = write_file(os.path.join(directory, index_name), [buffer.getbuffer()])
    entries.append({"name": index_name, "sha256": sha, "bytes": size, "kind": "index",
                    "table": table_index, "rank": rank})
    _pause(pause)
    summary = {"rows": int(len(exported["keys"])), "candidates": int(len(exported["candidate_keys"])),
               "counters": {k: int(v) for k, v in table.counters().items()}}
    return entries, summary


def _pause(seconds):
    if seconds:
        time.sleep(seconds)


def _write_dense(directory, model, optimizer):
    """rank 0: model variables and optimizer state in dense.npz; returns (entry, description).

    Variables are named by position, the same on every Keras version (hybridps.tf_compat): model
    variable i is "model_{i:04d}" (its key in dense.npz), in tf_compat.model_weights order; the
    optimizer's entries are named by hybridps.dense.optimizer_state.state_names.
    """
    arrays, description = {}, {"file": DENSE_FILE, "model_variables": [], "optimizer": None}
    for i, variable in enumerate(model_weights(model)):
        value = variable.numpy()
        arrays[f"model_{i:04d}"] = value
        description["model_variables"].append(
            {"name": f"model_{i:04d}", "shape": list(value.shape), "dtype": str(value.dtype)})
    if optimizer is not None:
        trainable = model.trainable_variables
        values = optimizer_state(optimizer, trainable)
        names = state_names(optimizer_kind(optimizer), len(trainable))
        description["optimizer"] = {"class": type(optimizer).__name__, "variables": []}
        for i, (name, value) in enumerate(zip(names, values)):
            arrays[f"optimizer_{i:04d}"] = value
            description["optimizer"]["variables"].append(
                {"name": name, "shape": list(value.shape), "dtype": str(value.dtype)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    sha, size = write_file(os.path.join(directory, DENSE_FILE), [buffer.getbuffer()])
    return {"name": DENSE_FILE, "sha256": sha, "bytes": size, "kind": "dense", "rank": 0}, description


def save_checkpoint(root, step, *, tables, comm=None, config=None, schema=None,
                    num_buckets=None, model=None, optimizer=None, data_state=None,
                    rng_state=None, keep=None, extra=None):
    """Write a checkpoint of every rank's tables (and rank 0's dense state) atomically.

    Collective: every rank of ``comm`` calls it with the same ``root`` and ``step``.

    Args:
        root: checkpoint root directory (created if missing).
        step: the number of completed training steps (the step a resume starts at).
        tables: this rank's EmbeddingHashTable shards, in table order.
        comm: hybridps.comm.Comm, or None for one process.
        config: the TrainConfig (recorded in the manifest; gives num_buckets and keep).
        schema: the run's FeatureSchema (recorded; export needs it); default the config's.
        num_buckets: virtual buckets (default config.num_buckets, else 4096). Must not change
            over the life of a model.
        model, optimizer: Keras model and dense optimizer, saved by rank 0 (optional).
        data_state: this rank's ``dataset.state()``.
        rng_state: this rank's RNG state (JSON-able); default the numpy global RNG state.
        keep: checkpoints to keep (default config.keep_checkpoints, else 3).
        extra: JSON-able dict stored in the manifest under "extra".
    Returns:
        CheckpointInfo (the same path and total on every rank).
    Raises:
        CheckpointError: a rank could not write its files, or rank 0 its manifest (disk full,
            permissions); the temporary directory is removed and ``latest`` and the earlier
            checkpoints are unchanged.

    Leftovers: a save removes only a temporary directory of its own step (a save of that step
    that was killed). Others are removed by :func:`remove_stale_temporaries`, which the
    CheckpointManager runs once it holds the directory's lock: without the lock, a temporary
    directory may be a save of another job under way.
    """
    started = time.perf_counter()
    comm = comm or SingleProcessComm()
    if schema is None and config is not None:
        from hybridps.schema import build_schema
        schema = build_schema(config)
    num_buckets = int(num_buckets or getattr(config, "num_buckets", 0) or DEFAULT_NUM_BUCKETS)
    keep = int(keep or getattr(config, "keep_checkpoints", 0) or 3)
    step = int(step)
    root = os.path.abspath(root)
    final_dir = os.path.join(root, checkpoint_name(step))
    tmp_dir = os.path.join(root, f"{TMP_PREFIX}{step:010d}")
    pause = _test_pause_seconds()

    what = f"saving checkpoint step {step} under {root}"
    begin_atomic_dir(comm, root, tmp_dir, os.path.basename(tmp_dir), what)
    try:
        entries, gathered = _write_files(comm, tmp_dir, tables, num_buckets, model, optimizer,
                                         data_state, rng_state, pause, what)

        def manifest_bytes():
            return manifest_json_bytes(build_manifest(step, comm.size, config, schema, tables,
                                                     num_buckets, gathered, extra))

        def publish():
            write_atomic_small(os.path.join(root, LATEST), (checkpoint_name(step) + "\n").encode())
            _prune(root, keep, step)

        commit_atomic_dir(comm, root, tmp_dir, final_dir, manifest_bytes, publish, what)
    except CheckpointError:
        if comm.rank == 0:       # the failure was agreed: no rank writes into tmp_dir any more
            shutil.rmtree(tmp_dir, ignore_errors=True)
            _remove_if_present(os.path.join(root, LATEST + ".tmp"))
        raise
    return CheckpointInfo(path=final_dir, step=step, bytes_written=sum(e["bytes"] for e in entries),
                          total_bytes=sum(e["bytes"] for g in gathered for e in g["entries"]),
                          seconds=time.perf_counter() - started, files=[e["name"] for e in entries])


def _write_files(comm, tmp_dir, tables, num_buckets, model, optimizer, data_state, rng_state,
                 pause, what):
    """Collective: every rank writes its files into ``tmp_dir``; returns (this rank's file
    entries, every rank's entries and summaries). Raises CheckpointError on every rank if any
    rank failed."""
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
                 "rng_state": rng_state if rng_state is not None else numpy_rng_state(),
                 "counters": [s["counters"] for s in table_summaries]}
        state_name = f"rank-{comm.rank:05d}.state.json"
        sha, size = write_file(os.path.join(tmp_dir, state_name), [canonical_json(state)])
        entries.append({"name": state_name, "sha256": sha, "bytes": size, "kind": "state",
                        "rank": comm.rank})
    except OSError as exc:
        error = f"writing its files into {tmp_dir} failed: {exc}"
    gathered = comm.allgather_object(
        None if error else {"entries": entries, "tables": table_summaries, "data_state": data_state,
                            "dense": dense_description})
    agree(comm, error, what)
    return entries, gathered


def _remove_if_present(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_temporaries(root):
    """Delete the temporary directories (``.tmp-ckpt-*``) and ``latest.tmp`` that saves which
    did not finish left under ``root``. Call it only while holding the directory's lock
    (hybridps.checkpoint.lock): then no save is under way there."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name == LATEST + ".tmp":
            _remove_if_present(path)


def _prune(root, keep, step):
    """Delete all but the newest ``keep`` checkpoints up to ``step`` (``latest`` names ``step``).

    Checkpoints newer than ``step`` (left by a run that was resumed from an older step) are
    not counted and not deleted; find_resume_point ignores them.
    """
    for _, path in [c for c in list_checkpoints(root) if c[0] <= step][:-keep]:
        shutil.rmtree(path, ignore_errors=True)
