"""The joiner's checkpoint: one file, replaced atomically, with its own checksum.

What lives here: :func:`save_state` and :func:`load_state` of ``STATE_DIR/joiner.json``. It
holds, taken at one moment, the window (pending impressions, buffered actions, closed
impressions kept for late actions, counters), the watermark, both input positions, the next
output sequence and the outbox: the batches being written (their sequences, rows and Redis
entry times). The process loop saves it *before* writing the outbox, and a restart writes the
outbox again first (a no-op for a batch already there: hybridps.join.outputs), so whatever
moment a SIGKILL hits, every row is written exactly once. The file is replaced through the
checkpoint helpers (a temporary file, fsync, rename, fsync of the directory). Its first line is
a header (format, version, the sha256 and size of the rest), the rest the state as compact
JSON: the whole state is written for every batch, so it is encoded once, by the C encoder.
What does not: the lock of the state directory (hybridps.checkpoint.lock, taken by
hybridps.join.process).
"""
import hashlib
import json
import os

from hybridps.checkpoint.files import write_atomic_small
from hybridps.errors import CheckpointError, ConfigError

STATE_FILE = "joiner.json"
STATE_FORMAT = "hybridps-join-state"
STATE_VERSION = 1


def state_path(state_dir):
    return os.path.join(state_dir, STATE_FILE)


def save_state(state_dir, state):
    """Replace the checkpoint with ``state`` (a JSON-ready dict) atomically."""
    body = json.dumps(state, separators=(",", ":")).encode()
    header = json.dumps({"format": STATE_FORMAT, "format_version": STATE_VERSION,
                         "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}).encode()
    write_atomic_small(state_path(state_dir), header + b"\n" + body)


def load_state(state_dir, settings):
    """The saved state, or None when the directory holds none; ``settings`` (what a state
    depends on: window, action types, ...) must equal those it was saved with.

    Raises:
        CheckpointError: the file is damaged (its checksum, size or JSON) or not a joiner state.
        ConfigError: it was saved with other settings.
    """
    path = state_path(state_dir)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fh:
        header, _, body = fh.read().partition(b"\n")
    try:
        header = json.loads(header)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a joiner state (its first line is no {STATE_FORMAT} header)")
    if header.get("format_version") != STATE_VERSION:
        raise CheckpointError(f"{path} has format version {header.get('format_version')}; this "
                              f"hybridps reads version {STATE_VERSION}")
    if header.get("bytes") != len(body) or header.get("sha256") != hashlib.sha256(body).hexdigest():
        raise CheckpointError(f"{path}: checksum mismatch ({len(body):,} bytes, the header says "
                              f"{header.get('bytes')}): the file was damaged or edited; restore it "
                              f"or start with an empty state_dir and a new output")
    state = json.loads(body)
    saved = state.get("settings") or {}
    if saved != settings:
        changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
        raise ConfigError(f"{path} was saved with other join settings ({', '.join(changed)}: "
                          f"{[saved.get(k) for k in changed]} then, {[settings.get(k) for k in changed]} "
                          f"now): keep them, or start with an empty state_dir and a new output")
    for key in ("seq", "window", "watermark", "positions", "outbox", "next_entry_ms"):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r}: not a joiner checkpoint")
    return state
