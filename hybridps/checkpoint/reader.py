"""Reading a checkpoint: verify, read only the buckets a rank owns, restore collectively.

What lives here: :func:`resolve_checkpoint`, :func:`load_manifest`, :func:`verify_checkpoint`,
the bucket reads with their CRC32 checks, :func:`read_table_rows`, :func:`read_dense`, the
compatibility check against this run's model, and :func:`restore_checkpoint` (collective:
every rank reads its buckets, all agree before any table is touched). What does not: choosing
which checkpoint to resume from (hybridps.checkpoint.manager).
"""
import json
import os
import time
import zlib

import numpy as np

from hybridps.checkpoint.files import (CheckpointMismatchError, agree, error_of, load_manifest_json,
                                       sha256_file)
from hybridps.checkpoint.format import (CANDIDATE_DTYPE, CKPT_NAME, DENSE_FILE, FORMAT, LATEST, MANIFEST,
                                        META_FIELDS, RestoreReport, full_config_hash, list_checkpoints,
                                        model_signature, row_record_dtype, set_numpy_rng_state,
                                        shard_names, signature_hash)
from hybridps.comm import SingleProcessComm
from hybridps.dense.optimizer_state import assign_optimizer_state
from hybridps.errors import CheckpointError
from hybridps.tf_compat import model_weights
from hybridps.sparse.routing import bucket_ids, buckets_of_rank
from hybridps.sparse.shard import TABLE_COUNTERS

# ``shard`` argument of restore_checkpoint for a rank that holds no keys (a PS worker): it
# reads no table buckets.
NO_SHARD = "none"


# what to pass for a signature key whose default changed (a checkpoint written under the old one)
_SETTING_HINTS = {"dense_optimizer": " (the dense optimizer's default is adam, it was the sparse "
                                     "optimizer before: resume with --dense-optimizer {saved} and "
                                     "the run's --dense-learning-rate)"}


def shard_of(shard, comm):
    """(index, count) of a rank among the key owners; (None, count) for NO_SHARD."""
    if shard is None:
        return comm.rank, comm.size
    if shard == NO_SHARD:
        return None, 0
    index, count = shard
    return int(index), int(count)


def resolve_checkpoint(path):
    """A checkpoint directory from either itself or a root holding a ``latest`` pointer."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if CKPT_NAME.match(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is missing: {path} is not a complete "
                              f"checkpoint (damaged, or a copy that did not finish)")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, errors="replace") as fh:
            name = fh.read(200).strip()
        if not CKPT_NAME.match(name):
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
    manifest = load_manifest_json(os.path.join(ckpt_dir, MANIFEST), FORMAT)
    if signature_hash(manifest["model_signature"]) != manifest["model_hash"]:
        raise CheckpointError(f"{os.path.join(ckpt_dir, MANIFEST)}: model_hash does not match the "
                              f"recorded model signature")
    return manifest


def check_file(ckpt_dir, manifest, name, hash_it):
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
        actual = sha256_file(path)
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
        problem = check_file(ckpt_dir, manifest, name, hash_it)
        if problem:
            problems.append(problem)
    return problems


def _read_index(ckpt_dir, manifest, name, bytes_read):
    problem = check_file(ckpt_dir, manifest, name, hash_it=True)
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
        rows_name, cands_name, index_name = shard_names(table_index, rank)
        index = _read_index(ckpt_dir, manifest, index_name, bytes_read)
        if int(index["num_buckets"]) != num_buckets:
            raise CheckpointError(f"{os.path.join(ckpt_dir, index_name)}: {int(index['num_buckets'])} "
                                  f"buckets, the manifest says {num_buckets}")
        for name, offsets, crc, dtype, parts in (
                (rows_name, index["row_offsets"], index["row_crc"], rec_dtype, row_parts),
                (cands_name, index["cand_offsets"], index["cand_crc"], CANDIDATE_DTYPE, cand_parts)):
            problem = check_file(ckpt_dir, manifest, name, hash_it=False)
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
    for name in META_FIELDS:
        out[name] = np.ascontiguousarray(rows[name])
    return out


def read_dense(ckpt_dir, manifest, bytes_read=None):
    """(model variable arrays, optimizer variable arrays) of dense.npz, sha256-checked."""
    if not manifest.get("dense"):
        raise CheckpointError(f"{ckpt_dir} holds no dense state (saved without a model)")
    problem = check_file(ckpt_dir, manifest, DENSE_FILE, hash_it=True)
    if problem:
        raise CheckpointError(problem)
    if bytes_read is not None:
        bytes_read["dense"] = bytes_read.get("dense", 0) + manifest["files"][DENSE_FILE]["bytes"]
    with np.load(os.path.join(ckpt_dir, DENSE_FILE)) as z:
        model_values = [z[f"model_{i:04d}"] for i in range(len(manifest["dense"]["model_variables"]))]
        opt = manifest["dense"].get("optimizer")
        opt_values = [z[f"optimizer_{i:04d}"] for i in range(len(opt["variables"]))] if opt else None
    return model_values, opt_values


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
                                    f"{signature.get(key)!r} here" + _SETTING_HINTS.get(key, "").format(
                                        saved=saved_signature.get(key)))
            if not problems:
                problems.append(f"model hash {manifest['model_hash'][:12]} in the checkpoint, "
                                f"{signature_hash(signature)[:12]} here")
    if problems:
        raise CheckpointMismatchError(f"{os.path.join(ckpt_dir, MANIFEST)} was written by another model: "
                              + "; ".join(problems) + ". Give these settings as the checkpoint has "
                              "them to resume it, or train into a new checkpoint directory")


def _config_differences(manifest, config):
    if config is None or manifest.get("config") is None:
        return []
    if full_config_hash(config) == manifest.get("config_hash"):
        return []
    from hybridps.config import training_differences
    changed = training_differences(config, manifest["config"])
    return [f"config differs from the checkpoint's in {', '.join(changed)} "
            f"(allowed: these do not change the model's shape)"] if changed else []


def restore_checkpoint(path, *, tables, comm=None, config=None, schema=None, model=None, optimizer=None,
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
        config, schema: this run's model and features (checked against the
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
            if schema is None and config is not None:
                from hybridps.schema import build_schema
                schema = build_schema(config)
            signature = (model_signature(config, schema, tables)
                         if config is not None else None)
            check_compatible(manifest, ckpt_dir, tables, signature)
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            error = error_of(exc)
    ckpt_dir, manifest, error = comm.bcast_object((ckpt_dir, manifest, error))
    if error:
        raise (CheckpointMismatchError if error[0] == "mismatch" else CheckpointError)(error[1])
    bytes_read["manifest"] = manifest["_bytes"] if comm.rank == 0 else 0
    num_buckets = int(manifest["num_buckets"])
    saved_world = int(manifest["world_size"])
    shard_index, num_shards = shard_of(shard, comm)
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
        problem = check_file(ckpt_dir, manifest, state_name, hash_it=True)
        if problem:
            raise CheckpointError(problem)
        with open(os.path.join(ckpt_dir, state_name), "rb") as fh:
            state = json.loads(fh.read())
        bytes_read["state"] += manifest["files"][state_name]["bytes"]
        if dense is not None:
            _check_dense_shapes(ckpt_dir, manifest, model, dense)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:   # never leave a rank waiting
        error = error_of(exc)
    agree(comm, error, f"restoring {ckpt_dir}")

    counters = (_counters_for_rank(manifest, shard_index, num_shards) if shard_index is not None
                else [{n: 0 for n in TABLE_COUNTERS} for _ in manifest["tables"]])
    for table, rows, table_counters in zip(tables, loaded, counters):
        table.import_rows(rows["keys"], rows["values"], rows["slots"], rows["hits"],
                          rows["last_update_step"], rows["update_count"])
        table.import_candidates(rows["candidate_keys"], rows["candidate_hits"])
        if hasattr(table, "restore_counters"):
            table.restore_counters(table_counters)
    if dense is not None:
        _assign_dense(model, optimizer, *dense)
    if restore_rng and state.get("rng_state"):
        set_numpy_rng_state(state["rng_state"])
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


def _counters_for_rank(manifest, rank, world_size):
    """Per table: the saved counters of this rank (same world size) or the totals on rank 0."""
    out = []
    for info in manifest["tables"]:
        per_rank = info["counters_per_rank"]
        if world_size == len(per_rank):
            mine = per_rank[rank]
            out.append({n: int(mine.get(n, 0)) for n in TABLE_COUNTERS})
        elif rank == 0:
            out.append({n: int(sum(c.get(n, 0) for c in per_rank)) for n in TABLE_COUNTERS})
        else:
            out.append({n: 0 for n in TABLE_COUNTERS})
    return out


def _check_dense_shapes(ckpt_dir, manifest, model, dense):
    model_values, _ = dense
    variables = model_weights(model)
    if len(variables) != len(model_values):
        raise CheckpointMismatchError(
            f"{os.path.join(ckpt_dir, DENSE_FILE)} holds {len(model_values)} model variables, this "
            f"model has {len(variables)}: another model")
    for variable, value, saved in zip(variables, model_values, manifest["dense"]["model_variables"]):
        if tuple(variable.shape) != value.shape:
            raise CheckpointMismatchError(
                f"{os.path.join(ckpt_dir, DENSE_FILE)}: variable {saved['name']} has shape "
                f"{value.shape}, this model's has {tuple(variable.shape)}: another model")


def _assign_dense(model, optimizer, model_values, opt_values):
    """Assign model variables, then build the optimizer and assign its state (checkpoint layout)."""
    for variable, value in zip(model_weights(model), model_values):
        variable.assign(value)
    if optimizer is None or opt_values is None:
        return
    try:
        assign_optimizer_state(optimizer, model.trainable_variables, opt_values)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None