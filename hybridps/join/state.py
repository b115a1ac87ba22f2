"""The joiner's checkpoint: one JSON file, replaced atomically, with its own checksum.

What lives here: :func:`save_state` and :func:`load_state` of ``STATE_DIR/joiner.json``. It
holds, taken at one moment, the window (pending impressions, buffered actions, closed
impressions kept for late actions, counters), the watermark, both input positions, the next
output sequence and the outbox: the batch being written (its sequence, rows and Redis entry
time). The process loop saves it *before* writing the outbox's batch, and a restart writes
the outbox again first (a no-op if it is there: hybridps.join.outputs), so whatever moment a
SIGKILL hits, every row is written exactly once. The file is written through the checkpoint
helpers (a temporary file, fsync, rename, fsync of the directory; ``manifest_sha256``, and the
HMAC signature when ``HYBRIDPS_SIGNING_KEY_FILE`` is set). What does not: the lock of the
state directory (hybridps.checkpoint.lock, taken by the process loop).
"""
import os

from hybridps.checkpoint.files import load_manifest_json, manifest_json_bytes, write_atomic_small
from hybridps.errors import CheckpointError, ConfigError

STATE_FILE = "joiner.json"
STATE_FORMAT = "hybridps-join-state"


def state_path(state_dir):
    return os.path.join(state_dir, STATE_FILE)


def save_state(state_dir, state):
    """Replace the checkpoint with ``state`` (a JSON-ready dict) atomically."""
    from hybridps.checkpoint.files import FORMAT_VERSION
    body = dict(state, format=STATE_FORMAT, format_version=FORMAT_VERSION)
    write_atomic_small(state_path(state_dir), manifest_json_bytes(body))


def load_state(state_dir, settings):
    """The saved state, or None when the directory holds none; ``settings`` (what a state
    depends on: window, action types, ...) must equal those it was saved with."""
    path = state_path(state_dir)
    if not os.path.exists(path):
        return None
    state = load_manifest_json(path, STATE_FORMAT)
    if state.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(state.get("settings") or {})
                         if settings.get(k) != (state.get("settings") or {}).get(k))
        raise ConfigError(f"{path} was saved with other join settings ({', '.join(changed)}: "
                          f"{[(state.get('settings') or {}).get(k) for k in changed]} then, "
                          f"{[settings.get(k) for k in changed]} now): keep them, or start with "
                          f"an empty state_dir and a new output")
    for key in ("seq", "window", "watermark", "positions", "outbox", "next_entry_ms"):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r}: not a joiner checkpoint")
    return state
