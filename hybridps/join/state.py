"""The joiner's checkpoint: a snapshot and the append-only log of what happened since it.

What lives here: :class:`JoinerCheckpoint` of a state directory. The snapshot
(``STATE_DIR/joiner.json``, replaced atomically, its first line a header with the format, the
sha256 and size of the rest and the generation of its log) holds, taken at one moment, the
window (pending impressions, buffered actions, closed impressions kept for late actions,
counters), the watermark, both input positions, the next output sequence and the batches being
written. The log (``STATE_DIR/joiner-log-<generation>.jsonl``) holds one record per line, each
line a CRC-32 checksum of the record and the record as compact JSON: the window operations
since the record before it (impressions and actions added, windows closed, forced closes), then
the watermark, both input positions, the output sequence and the batches of this record
(sequence, Redis entry time, row count). Saving costs what changed, not the whole pending
state; once the log has grown past the snapshot (and ``COMPACT_MIN_BYTES``) the process writes
a new snapshot with the next generation and the old log is removed.

A restart restores the snapshot and replays the log's operations into the window (a pure
function of its operations: hybridps.join.window): the rows the last record's operations
produce are that record's batches, written again (a no-op for a batch already there:
hybridps.join.outputs). A record is appended and fsynced *before* its batches are written, so
whatever moment a SIGKILL hits, every row is written exactly once. A last line cut short by the
kill (no newline, or a checksum that does not match) was never followed by its batches: it is
dropped, and the file cut back to the records before it. A damaged line elsewhere, or a
damaged snapshot, is a CheckpointError. What does not: the lock of the state directory
(hybridps.checkpoint.lock, taken by hybridps.join.process).
"""
import hashlib
import json
import os
import zlib

from hybridps.checkpoint.files import fsync_dir, write_atomic_small
from hybridps.errors import CheckpointError, ConfigError

STATE_FILE = "joiner.json"
LOG_PREFIX = "joiner-log-"
STATE_FORMAT = "hybridps-join-state"
STATE_VERSION = 2
READS_VERSIONS = (1, 2)            # version 1: a snapshot with no log
COMPACT_MIN_BYTES = 32 << 20       # a log smaller than this is never compacted
_SNAPSHOT_KEYS = ("seq", "window", "watermark", "positions", "outbox", "next_entry_ms")


def state_path(state_dir):
    return os.path.join(state_dir, STATE_FILE)


def log_path(state_dir, generation):
    return os.path.join(state_dir, f"{LOG_PREFIX}{generation:08d}.jsonl")


class JoinerCheckpoint:
    """The snapshot and log of one state directory (module docstring)."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.generation = 0
        self.snapshot_bytes = 0
        self.log_bytes = 0
        self._log = None

    # ------------------------------------------------------------------ reading
    def load(self, settings):
        """(snapshot, records) saved in the directory, (None, []) when it holds none;
        ``settings`` (what a state depends on: window, action types, ...) must equal those it
        was saved with. A record cut short at the end of the log is dropped from the file.

        Raises:
            CheckpointError: the snapshot or a record before the last is damaged, or the
                files are no joiner state.
            ConfigError: it was saved with other settings.
        """
        path = state_path(self.state_dir)
        if not os.path.exists(path):
            return None, []
        with open(path, "rb") as fh:
            header, _, body = fh.read().partition(b"\n")
        header = _json_or_none(header)
        if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not a joiner state (its first line is no {STATE_FORMAT} header)")
        if header.get("format_version") not in READS_VERSIONS:
            raise CheckpointError(f"{path} has format version {header.get('format_version')}; this "
                                  f"hybridps reads versions {', '.join(map(str, READS_VERSIONS))}")
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
        for key in _SNAPSHOT_KEYS:
            if key not in state:
                raise CheckpointError(f"{path} has no {key!r}: not a joiner checkpoint")
        self.generation = int(header.get("log_generation", 0))
        self.snapshot_bytes = len(body)
        return state, self._read_log()

    def _read_log(self):
        path = log_path(self.state_dir, self.generation)
        self._remove_other_logs()
        if not os.path.exists(path):
            self.log_bytes = 0
            return []
        with open(path, "rb") as fh:
            data = fh.read()
        records, good = [], 0
        complete = data.split(b"\n")[:-1]          # after the last newline: a record cut short
        for index, line in enumerate(complete):
            record = _record_of(line)
            if record is None:
                if index == len(complete) - 1:
                    break                           # the record being appended when it ended
                raise CheckpointError(f"{path}: record {index + 1} has a checksum mismatch and "
                                      f"records follow it: the file was damaged or edited; "
                                      f"start with an empty state_dir and a new output")
            records.append(record)
            good += len(line) + 1
        if good != len(data):
            with open(path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        self.log_bytes = good
        return records

    def _remove_other_logs(self):
        keep = os.path.basename(log_path(self.state_dir, self.generation))
        for name in os.listdir(self.state_dir):
            if name.startswith(LOG_PREFIX) and name != keep:
                os.remove(os.path.join(self.state_dir, name))

    # ------------------------------------------------------------------ writing
    def append(self, record):
        """Append ``record`` (a JSON-ready dict) to the log and fsync it."""
        body = json.dumps(record, separators=(",", ":")).encode()
        line = b"%08x " % zlib.crc32(body) + body + b"\n"
        if self._log is None:
            self._log = open(log_path(self.state_dir, self.generation), "ab")
        self._log.write(line)
        self._log.flush()
        os.fsync(self._log.fileno())
        self.log_bytes += len(line)

    def compaction_due(self):
        """Whether the log has grown past the snapshot (and ``COMPACT_MIN_BYTES``)."""
        return self.log_bytes > max(COMPACT_MIN_BYTES, self.snapshot_bytes)

    def snapshot(self, state):
        """Replace the snapshot with ``state`` (the whole of it, a JSON-ready dict) and start
        an empty log: the records before it are in it."""
        body = json.dumps(state, separators=(",", ":")).encode()
        generation = self.generation + 1
        header = json.dumps({"format": STATE_FORMAT, "format_version": STATE_VERSION,
                             "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body),
                             "log_generation": generation}).encode()
        write_atomic_small(state_path(self.state_dir), header + b"\n" + body)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.generation, self.snapshot_bytes, self.log_bytes = generation, len(body), 0
        self._remove_other_logs()
        fsync_dir(self.state_dir)

    def close(self):
        if self._log is not None:
            self._log.close()
            self._log = None


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _record_of(line):
    """The record of one log line, None if its checksum does not match."""
    checksum, _, body = line.partition(b" ")
    if len(checksum) != 8 or b"%08x" % zlib.crc32(body) != checksum:
        return None
    return _json_or_none(body)
