"""Atomic files and signed JSON: the I/O every checkpoint, delta and export write relies on.

What lives here: writing a file and fsyncing it (with its sha256), replacing a small file
atomically, hashing a file, canonical JSON with its own sha256 (``signed_json_bytes`` /
``load_signed_json``), the collective begin/commit of an atomically renamed directory, and the
agreement of every rank on an error. What does not: what goes into a checkpoint
(hybridps.checkpoint.format / writer / reader).
"""
import hashlib
import json
import os
import shutil

import numpy as np

from hybridps.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-ckpt-"


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but belongs to another model or table layout."""


def json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default).encode()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, chunks):
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


def write_atomic_small(path, data):
    """Replace a small file atomically: PATH.tmp + fsync + os.replace + fsync of the directory."""
    tmp = path + ".tmp"
    write_file(tmp, [data])
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def signed_json_bytes(manifest):
    """Manifest JSON with ``manifest_sha256``: the sha256 of its canonical form without it."""
    body = dict(manifest)
    body.pop("manifest_sha256", None)
    body["manifest_sha256"] = hashlib.sha256(canonical_json(body)).hexdigest()
    return json.dumps(body, sort_keys=True, indent=1, default=json_default).encode() + b"\n"


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
    actual = hashlib.sha256(canonical_json(manifest)).hexdigest()
    if recorded != actual:
        raise CheckpointError(f"{path}: checksum mismatch (manifest_sha256 {str(recorded)[:12]}..., "
                              f"content hashes to {actual[:12]}...): the manifest was edited or damaged")
    manifest["manifest_sha256"] = recorded
    manifest["_bytes"] = len(raw)
    return manifest


def error_of(exc):
    """(kind, message) of an exception met while reading a checkpoint, to send between ranks."""
    kind = "mismatch" if isinstance(exc, CheckpointMismatchError) else "damaged"
    return kind, str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


def agree(comm, local_error, what):
    """Gather every rank's error (None, a message or (kind, message)); raise the same
    CheckpointError (CheckpointMismatchError if any rank saw a mismatch) on every rank."""
    errors = comm.allgather_object(local_error)
    failed = [(r, (e if isinstance(e, tuple) else ("damaged", e))) for r, e in enumerate(errors) if e]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, (_, m) in failed[:4])
        more = f" (and {len(failed) - 4} more ranks)" if len(failed) > 4 else ""
        cls = CheckpointMismatchError if any(k == "mismatch" for _, (k, _) in failed) else CheckpointError
        raise cls(f"{what} failed: {detail}{more}")


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
            fsync_dir(root)
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
            write_file(os.path.join(tmp_dir, MANIFEST), [manifest_bytes()])
            fsync_dir(tmp_dir)
            replace_dir(tmp_dir, final_dir, root)
            publish()
        except OSError as exc:
            error = f"committing {final_dir} failed: {exc}"
    agree(comm, error, what)


def replace_dir(tmp_dir, final_dir, root):
    """Rename tmp_dir to final_dir (moving an existing final_dir aside first), fsync root."""
    if os.path.exists(final_dir):
        # A checkpoint of the same step (a re-run after resume): move it aside, then delete it.
        # Until the new one is renamed into place, find_resume_point falls back to older ones.
        trash = os.path.join(root, f"{TMP_PREFIX}old-{os.path.basename(final_dir)}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final_dir, trash)
        os.rename(tmp_dir, final_dir)
        fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
        fsync_dir(root)
