"""The joiner's loop: read both sources, join, write batches, checkpoint, report progress.

What lives here: :class:`Joiner` (one look at the sources: ``poll``; the whole run: ``run``)
and :func:`main` (``hybridps join``). Each look reads up to ``read_batch`` events from each
source that has room (back pressure: a source whose side of the window is full at
``max_pending`` is not read; with the impressions full and no action read, the impressions
closing first leave early, counted in ``forced_closes``), feeds them to the window, moves the
watermark and collects the rows that leave. Rows are written in batches (``output_rows`` rows,
or after ``flush_s``): the checkpoint's log record of the window operations that led to them
and of the input positions is appended first, then the batch is written, so a restart after a
SIGKILL at any point writes each row exactly once (hybridps.join.state); a snapshot of the
whole state is written at start, when the log has grown past it, and at exit. SIGTERM or
SIGINT: the rows ready are written, the state saved, exit 0. When both sources have ended,
every window closes, the last batch and the output's end marker are written, and
(``exit_when_done``) the process exits. A progress line every ``progress_every_s``: pending,
emitted, late, dropped, the watermark's lag.

Testing aid: ``HYBRIDPS_JOIN_KILL_AT=POINT:N`` makes the process SIGKILL itself the N-th time it
passes POINT (``before_checkpoint``, ``after_checkpoint``: recorded, batch not written yet,
``after_output``, ``after_snapshot``).
"""
import gc
import json
import math
import os
import signal
import sys
import time
import zlib

from hybridps.errors import CheckpointError, ConfigError, DataError
from hybridps.join.events import BadEvent, EventFields
from hybridps.join.outputs import open_output
from hybridps.join.sources import open_event_source
from hybridps.join.state import JoinerCheckpoint
from hybridps.join.window import OP_ACTION, OP_CLOSE, OP_FORCE_CLOSE, OP_IMPRESSION, JoinWindow, Watermark

KILL_ENV = "HYBRIDPS_JOIN_KILL_AT"
_SOURCES = ("impressions", "actions")
_MAX_EXAMPLES = 10
_OPS_PER_RECORD = 50_000        # window operations held at most before a log record
_SAMPLE_EVERY = 64              # one impression in so many is measured (max_pending_bytes)
_ENTRY_BYTES = 300              # the window's entry of a pending impression beyond its fields, about
_ACTION_BYTES = 250             # a buffered early action, about
_GC_THRESHOLDS = (200_000, 50, 1000)    # allocations before a young collection; older ones rarer


class Joiner:
    """One joiner process over ``config`` (hybridps.join.config.JoinConfig); ``clock`` gives
    processing time (seconds)."""

    def __init__(self, config, clock=time.time):
        from hybridps.join.config import partition_of
        self.config, self.clock = config, clock
        self.partition = partition_of(config.partition)
        self.fields = EventFields(config.request_id_field, config.event_time_field,
                                  config.action_field, config.event_id_field, config.action_types)
        self.sources = {name: open_event_source(getattr(config, name), name) for name in _SOURCES}
        self.output = open_output(config.output, config.list_separator)
        self.window = JoinWindow(config.action_types, config.window_s, config.emit, config.late,
                                 config.late_horizon_s, config.max_pending, config.correction_column)
        now = clock()
        self.watermark = Watermark(_SOURCES, config.allowed_lateness_s, config.idle_timeout_s, now)
        self.seq, self.next_entry_ms = 0, 0
        self.ready, self.ready_since = [], None
        self.ops = []               # the window operations since the last checkpoint record
        self.bad_events, self.other_partition = 0, 0
        self.bad_examples = []
        self.read_since_save = False
        self.impressions_seen, self.samples, self.bytes_per_impression = 0, 0, 0.0
        self.paused = False         # the last look read no impression: the state was full
        self.done = False
        self.started, self.last_progress = now, now
        self.cpu_started = time.process_time()
        self._kill_at = _kill_point()
        self._passed = {}
        self._keep = self._in_partition if self.partition[1] > 1 else None
        os.makedirs(config.state_dir, exist_ok=True)
        self.checkpoint = JoinerCheckpoint(config.state_dir)
        self._resume()

    # ------------------------------------------------------------------ checkpoint
    def settings(self):
        c = self.config
        return {"action_types": list(c.action_types), "window_s": c.window_s, "emit": c.emit,
                "late": c.late, "late_horizon_s": c.late_horizon_s, "partition": c.partition,
                "output": c.output, "correction_column": c.correction_column}

    def _resume(self):
        state, records = self.checkpoint.load(self.settings())
        if state is None:
            held = self.output.written()
            if held:    # a batch written again is skipped: these would hide this run's rows
                raise ConfigError(
                    f"join output {self.config.output} already holds {held} parts or entries, and "
                    f"state_dir {self.config.state_dir} has no joiner state: give the state_dir of "
                    f"the joiner that wrote them (to go on), or an empty output")
            self.snapshot()             # from now on the log has a snapshot to follow
            return
        self.window.restore(state["window"])
        for batch in state["outbox"]:   # saved, maybe not written before the process ended
            self.output.write(batch["seq"], batch["rows"], batch["entry_ms"])
        rows = []
        for record in records:          # hybridps.join.state: replayed, the last one's rows written
            rows = [row for op in record["ops"] for row in self.window.apply(op)]
            state = record
        self.watermark.restore(state["watermark"], self.clock())
        for name in _SOURCES:
            self.sources[name].restore(state["positions"][name])
        self.seq, self.next_entry_ms = int(state["seq"]), int(state["next_entry_ms"])
        self.bad_events = int(state.get("bad_events", 0))
        self.other_partition = int(state.get("other_partition", 0))
        if records:
            self._write(self._batches_of(records[-1]["outbox"], rows))
        self.window.max_pending = self.config.max_pending
        self.snapshot()                 # the log holds this run's records only (its settings)

    def _batches_of(self, outbox, rows):
        """The batches of a log record: its outbox (sequence, entry time, row count) and the
        rows its operations sent again."""
        if sum(b["rows"] for b in outbox) != len(rows):
            raise CheckpointError(
                f"{self.config.state_dir}: the last log record lists {sum(b['rows'] for b in outbox)} "
                f"rows, its operations sent {len(rows)}: not the log of this joiner")
        batches, start = [], 0
        for batch in outbox:
            batches.append({**batch, "rows": rows[start:start + batch["rows"]]})
            start += batch["rows"]
        return batches

    def _position(self):
        return {"seq": self.seq, "next_entry_ms": self.next_entry_ms,
                "watermark": self.watermark.state(),
                "positions": {name: self.sources[name].position() for name in _SOURCES},
                "bad_events": self.bad_events, "other_partition": self.other_partition}

    def snapshot(self):
        """Save the whole state (the log starts again empty)."""
        self.checkpoint.snapshot({"settings": self.settings(), "window": self.window.state(),
                                  "outbox": [], **self._position()})
        self._hook("after_snapshot")

    def _append(self, outbox):
        self._hook("before_checkpoint")
        self.checkpoint.append({"ops": self.ops, "outbox": outbox, **self._position()})
        self.ops = []
        self.read_since_save = False
        self._hook("after_checkpoint")

    def _write(self, batches):
        for batch in batches:
            self.output.write(batch["seq"], batch["rows"], batch["entry_ms"])
            self._hook("after_output")

    def flush(self):
        """Write the rows ready as the next batches of at most ``output_rows`` (the log record
        of what led to them first); with none, record the input positions if they moved."""
        if not self.ready:
            if self.read_since_save or self.ops:
                self._append([])
            return
        size, batches = self.config.output_rows, []
        entry_ms = max(int(self.clock() * 1000), self.next_entry_ms)
        for start in range(0, len(self.ready), size):
            batches.append({"seq": self.seq, "entry_ms": entry_ms, "rows": self.ready[start:start + size]})
            self.seq, self.next_entry_ms, entry_ms = self.seq + 1, entry_ms + 1, entry_ms + 1
        self.ready, self.ready_since = [], None
        self._append([{**b, "rows": len(b["rows"])} for b in batches])
        self._write(batches)
        if self.checkpoint.compaction_due():
            self.snapshot()

    # ------------------------------------------------------------------ one look
    def poll(self):
        """Read, join, close windows, write what is due; the number of events read."""
        now = self.clock()
        window, ops, rows = self.window, self.ops, []
        room_i, room_a = self._room_for_impressions(), window.room_for_actions()
        self.paused = not room_i
        batch = self.config.read_batch
        impressions = self._read("impressions", min(batch, room_i), now)
        actions = self._read("actions", min(batch, room_a), now)
        if not room_i and not actions:          # full, and no action can make room: force it
            ops.append([OP_FORCE_CLOSE, batch])
            rows += window.force_close_oldest(batch)
        newest = None
        parse, keep = self.fields.impression, self._keep
        for index, raw in enumerate(impressions):
            try:
                rid, t, fields = parse(raw)
            except BadEvent as exc:
                self._bad("impressions", index, exc)
                continue
            if keep is not None and not keep(rid):
                continue
            if newest is None or t > newest:
                newest = t
            self.impressions_seen += 1
            if self.impressions_seen % _SAMPLE_EVERY == 1:
                self._sample(fields)
            ops.append([OP_IMPRESSION, rid, t, fields])
            rows += window.add_impression(rid, t, fields)
        if newest is not None:
            self.watermark.observe("impressions", newest, now)
        newest, parse = None, self.fields.action_of
        for index, raw in enumerate(actions):
            try:
                rid, t, kind, event_id = parse(raw)
            except BadEvent as exc:
                self._bad("actions", index, exc)
                continue
            if keep is not None and not keep(rid):
                continue
            if newest is None or t > newest:
                newest = t
            ops.append([OP_ACTION, rid, t, kind, event_id])
            rows += window.add_action(rid, t, kind, event_id)
        if newest is not None:
            self.watermark.observe("actions", newest, now)
        read = len(impressions) + len(actions)
        ended = all(self.sources[name].ended for name in _SOURCES)
        moved_to = math.inf if ended else self.watermark.advance(now)
        if moved_to > window.watermark:
            ops.append([OP_CLOSE, moved_to])
            rows += window.close(moved_to)
        self.read_since_save = self.read_since_save or read > 0
        if rows:
            self.ready += rows
            if self.ready_since is None:
                self.ready_since = now
        if ended:
            self.flush()
            self.output.end()
            self.done = True
        elif len(self.ready) >= self.config.output_rows or len(self.ops) >= _OPS_PER_RECORD or (
                self.ready and now - self.ready_since >= self.config.flush_s):
            self.flush()
        self._progress(now)
        return read

    def _room_for_impressions(self):
        """Impressions that may be read now: ``max_pending`` rows, and ``max_pending_bytes``
        of pending impressions (estimated) when set."""
        room = self.window.room_for_impressions()
        limit = self.config.max_pending_bytes
        if limit:
            room = min(room, max(0, int((limit - self.pending_bytes()) // self._impression_bytes())))
        return room

    def _impression_bytes(self):
        return self.bytes_per_impression + _ENTRY_BYTES

    def pending_bytes(self):
        """The memory of the pending impressions and buffered actions, estimated: a sample of
        the impressions measured (sys.getsizeof of their fields and values) plus what the window
        keeps for each."""
        return len(self.window.pending) * self._impression_bytes() + len(self.window.early) * _ACTION_BYTES

    def _sample(self, fields):
        size = sys.getsizeof(fields) + sum(map(sys.getsizeof, fields.values()))
        self.samples = min(self.samples + 1, 1000)
        self.bytes_per_impression += (size - self.bytes_per_impression) / self.samples

    def _read(self, source, limit, now):
        """Up to ``limit`` events of ``source``; a look with room counts for its quietness."""
        if limit <= 0:
            return []
        events = self.sources[source].read(limit)
        self.watermark.read(source, len(events), now)
        return events

    def _in_partition(self, rid):
        """Whether request id ``rid`` is in this joiner's partition (counted if not)."""
        index, count = self.partition
        if zlib.crc32(rid.encode()) % count == index:
            return True
        self.other_partition += 1
        return False

    def _bad(self, source, index, exc):
        """An event that cannot join: an error naming it, or with skip counted."""
        self.bad_events += 1
        text = f"{self.sources[source].where}, {self.sources[source].describe(index)}: {exc}"
        if self.config.on_bad_event == "raise":
            raise DataError(f"{text} (or set on_bad_event: skip to skip and count such events)") from None
        if len(self.bad_examples) < _MAX_EXAMPLES:
            self.bad_examples.append(text)

    # ------------------------------------------------------------------ the run
    def run(self, stop=lambda: False):
        """Look until both sources end (``exit_when_done``) or ``stop()``; then write what is
        ready and save. Returns the summary."""
        while not self.done or not self.config.exit_when_done:
            if stop():
                break
            if self.done:
                time.sleep(self.config.poll_s)
                continue
            if not self.poll():
                time.sleep(self.config.poll_s)
        self.flush()
        self.snapshot()
        self.checkpoint.close()
        return self.summary()

    def summary(self):
        counts = dict(self.window.counts)
        return {**counts, "pending": len(self.window.pending), "early_actions": len(self.window.early),
                "pending_bytes": int(self.pending_bytes()), "run_seconds": self.clock() - self.started,
                "cpu_seconds": time.process_time() - self.cpu_started,
                "bad_events": self.bad_events, "other_partition": self.other_partition,
                "dropped": counts["duplicates"] + self.bad_events, "output_batches": self.seq,
                "watermark_lag_s": self.watermark.lag(self.clock()),
                "bad_event_examples": list(self.bad_examples)}

    def progress_line(self):
        s = self.summary()
        rate = (s["impressions"] + s["actions"]) / max(self.clock() - self.started, 1e-9)
        full = ", full: impressions not read" if self.paused else ""
        return (f"[hybridps join] pending {s['pending']:,} (~{s['pending_bytes'] / 2**20:,.1f} MiB"
                f"{full}), emitted {s['emitted']:,}, late {s['late_actions']:,}, dropped "
                f"{s['dropped']:,}, watermark lag {s['watermark_lag_s']:.1f}s, {rate:,.0f} events/s")

    def _progress(self, now):
        every = self.config.progress_every_s
        if every and now - self.last_progress >= every:
            self.last_progress = now
            sys.stderr.write(self.progress_line() + "\n")
            sys.stderr.flush()

    def _hook(self, point):
        if self._kill_at is None or self._kill_at[0] != point:
            return
        self._passed[point] = self._passed.get(point, 0) + 1
        if self._passed[point] >= self._kill_at[1]:
            os.kill(os.getpid(), signal.SIGKILL)


def _kill_point():
    text = os.environ.get(KILL_ENV)
    if not text:
        return None
    point, _, count = text.partition(":")
    return point, int(count or 1)


def main(args):
    """``hybridps join``: run a joiner until its sources end or SIGTERM; print its summary."""
    from hybridps.checkpoint.lock import lock_checkpoint_dir
    from hybridps.join.config import JoinConfig, make_join_config
    from hybridps.settings import given_values
    config = make_join_config(args.config, given_values(args, JoinConfig))
    os.makedirs(config.state_dir, exist_ok=True)
    try:
        lock_checkpoint_dir(config.state_dir)
    except ConfigError as exc:
        raise ConfigError(f"join state_dir {config.state_dir}: one joiner per state directory; "
                          f"{exc}") from None
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    joiner = Joiner(config)
    # the window holds no reference cycles: the collector's full passes over every pending
    # impression would cost more than the joining (a third of it at 50,000 pending)
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    summary = joiner.run(stop=lambda: bool(stopping))
    print(json.dumps({k: v for k, v in summary.items() if k != "bad_event_examples"}, indent=2))
    for example in summary["bad_event_examples"]:
        sys.stderr.write(f"[hybridps join] skipped: {example}\n")
    return 0
