"""Atomic files and checksummed manifests: the I/O every checkpoint, delta and export relies on.

What lives here: writing a file and fsyncing it (with its sha256), replacing a small file
atomically, hashing a file, manifest JSON with its own checksum and, when the operator gives a
key, its HMAC signature (``manifest_json_bytes`` / ``load_manifest_json``), the collective
begin/commit of an atomically renamed directory, and the agreement of every rank on an error.
What does not: what goes into a checkpoint (hybridps.checkpoint.format / writer / reader).

Checksum and signature. ``manifest_sha256`` is the sha256 of the manifest's canonical JSON,
which lists every file's sha256 and size: it catches accidental damage (a truncated copy, a
flipped bit, a file overwritten by mistake). It has no key, so it does not prove where the
files came from: whoever edits a manifest can recompute it. With a key file named by
``HYBRIDPS_SIGNING_KEY_FILE`` (the same key where the files are written and read), each
manifest also carries ``manifest_hmac_sha256``, an HMAC-SHA256 of its content with that key,
and reading refuses a manifest whose HMAC does not verify or that has none. Either way a
manifest is data: it never chooses code to run (hybridps.models.registry.model_to_build).
"""
import hashlib
import hmac
import json
import os
import shutil

import numpy as np

from hybridps.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-ckpt-"
CHECKSUM_FIELD = "manifest_sha256"
SIGNATURE_FIELD = "manifest_hmac_sha256"
SIGNING_KEY_ENV = "HYBRIDPS_SIGNING_KEY_FILE"


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


def signing_key():
    """The operator's manifest signing key (bytes of the file ``HYBRIDPS_SIGNING_KEY_FILE``
    names), or None when it is not set.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    path = os.environ.get(SIGNING_KEY_ENV)
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            key = fh.read()
    except OSError as exc:
        raise ConfigError(f"{SIGNING_KEY_ENV}={path}: cannot read the signing key "
                          f"({exc.strerror or exc})") from None
    if not key.strip():
        raise ConfigError(f"{SIGNING_KEY_ENV}={path}: the signing key file is empty")
    return key


def _hmac_of(key, body):
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def manifest_json_bytes(manifest):
    """Manifest JSON with ``manifest_sha256`` (the sha256 of its canonical form without it) and,
    when a signing key is set, ``manifest_hmac_sha256`` (module doc)."""
    body = {k: v for k, v in manifest.items()     # ``_bytes``, ``_signature``: added when read
            if k not in (CHECKSUM_FIELD, SIGNATURE_FIELD) and not k.startswith("_")}
    key = signing_key()
    if key is not None:
        body[SIGNATURE_FIELD] = _hmac_of(key, body)
    body[CHECKSUM_FIELD] = hashlib.sha256(canonical_json(body)).hexdigest()
    return json.dumps(body, sort_keys=True, indent=1, default=json_default).encode() + b"\n"


def load_manifest_json(path, expected_format):
    """A manifest written by :func:`manifest_json_bytes`, checked against its own checksum and,
    when a signing key is set, its HMAC signature (module doc). ``_signature`` of the result
    says what was found: ``"verified"``, ``"unchecked"`` (signed, no key here) or
    ``"unsigned"``.

    Raises:
        CheckpointError: missing, not JSON, another format or version, a checksum mismatch, or
            (with a signing key) no signature or one that does not verify.
    """
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
    recorded = manifest.pop(CHECKSUM_FIELD, None)
    actual = hashlib.sha256(canonical_json(manifest)).hexdigest()
    if recorded != actual:
        raise CheckpointError(f"{path}: checksum mismatch ({CHECKSUM_FIELD} {str(recorded)[:12]}..., "
                              f"content hashes to {actual[:12]}...): the manifest was edited or damaged")
    manifest["_signature"] = _check_signature(path, manifest)
    manifest[CHECKSUM_FIELD] = recorded
    manifest["_bytes"] = len(raw)
    return manifest


def _check_signature(path, manifest):
    """``"verified"``, ``"unchecked"`` or ``"unsigned"`` (see :func:`load_manifest_json`)."""
    key = signing_key()
    signature = manifest.get(SIGNATURE_FIELD)
    if key is None:
        return "unchecked" if signature is not None else "unsigned"
    if signature is None:
        raise CheckpointError(f"{path}: not signed, and {SIGNING_KEY_ENV} is set: only manifests "
                              f"signed with that key are accepted (written without a key, or the "
                              f"signature was removed)")
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    expected = _hmac_of(key, body).encode()
    if not isinstance(signature, str) or not hmac.compare_digest(signature.encode(), expected):
        raise CheckpointError(f"{path}: bad signature: {SIGNATURE_FIELD} does not verify with the key "
                              f"{SIGNING_KEY_ENV} names (the manifest was edited, or signed with "
                              f"another key)")
    return "verified"


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
