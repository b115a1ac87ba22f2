"""The joiner's loop: read both sources, join, write batches, checkpoint, report progress.

What lives here: :class:`Joiner` (one look at the sources: ``poll``; the whole run: ``run``)
and :func:`main` (``hybridps join``). Each look reads up to ``read_batch`` events from each
source that has room (back pressure: a source whose side of the window is full at
``max_pending`` is not read; with no room on either side the impression closing first leaves
early, counted in ``forced_closes``), feeds them to the window, moves the watermark and
collects the rows that leave. Rows are written in batches (``output_rows`` rows, or after
``flush_s``): the checkpoint with the batch as its outbox is saved first, then the batch is
written, so a restart after a SIGKILL at any point writes each row exactly once
(hybridps.join.state). SIGTERM or SIGINT: the rows ready are written, the state saved, exit 0.
When both sources have ended, every window closes, the last batch and the output's end marker
are written, and (``exit_when_done``) the process exits. A progress line every
``progress_every_s``: pending, emitted, late, dropped, the watermark's lag.

Testing aid: ``HYBRIDPS_JOIN_KILL_AT=POINT:N`` makes the process SIGKILL itself the N-th time it
passes POINT (``before_checkpoint``, ``after_checkpoint``: saved, batch not written yet,
``after_output``).
"""
import json
import math
import os
import signal
import sys
import time
import zlib

from hybridps.errors import ConfigError, DataError
from hybridps.join.events import BadEvent, EventFields
from hybridps.join.outputs import open_output
from hybridps.join.sources import open_event_source
from hybridps.join.state import load_state, save_state
from hybridps.join.window import JoinWindow, Watermark

KILL_ENV = "HYBRIDPS_JOIN_KILL_AT"
_SOURCES = ("impressions", "actions")
_MAX_EXAMPLES = 10


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
        self.bad_events, self.other_partition = 0, 0
        self.bad_examples = []
        self.read_since_save = False
        self.done = False
        self.started, self.last_progress = now, now
        self._kill_at = _kill_point()
        self._passed = {}
        os.makedirs(config.state_dir, exist_ok=True)
        self._resume()

    # ------------------------------------------------------------------ checkpoint
    def settings(self):
        c = self.config
        return {"action_types": list(c.action_types), "window_s": c.window_s, "emit": c.emit,
                "late": c.late, "late_horizon_s": c.late_horizon_s, "partition": c.partition,
                "output": c.output, "correction_column": c.correction_column}

    def _resume(self):
        state = load_state(self.config.state_dir, self.settings())
        if state is None:
            held = self.output.written()
            if held:    # a batch written again is skipped: these would hide this run's rows
                raise ConfigError(
                    f"join output {self.config.output} already holds {held} parts or entries, and "
                    f"state_dir {self.config.state_dir} has no joiner state: give the state_dir of "
                    f"the joiner that wrote them (to go on), or an empty output")
            return
        now = self.clock()
        self.window.restore(state["window"])
        self.watermark.restore(state["watermark"], now)
        for name in _SOURCES:
            self.sources[name].restore(state["positions"][name])
        self.seq, self.next_entry_ms = int(state["seq"]), int(state["next_entry_ms"])
        self.bad_events = int(state.get("bad_events", 0))
        self.other_partition = int(state.get("other_partition", 0))
        for batch in state["outbox"]:   # saved, maybe not written before the process ended
            self.output.write(batch["seq"], batch["rows"], batch["entry_ms"])

    def _save(self, outbox):
        self._hook("before_checkpoint")
        save_state(self.config.state_dir, {
            "settings": self.settings(), "seq": self.seq, "next_entry_ms": self.next_entry_ms,
            "window": self.window.state(), "watermark": self.watermark.state(),
            "positions": {name: self.sources[name].position() for name in _SOURCES},
            "outbox": outbox, "bad_events": self.bad_events, "other_partition": self.other_partition})
        self._hook("after_checkpoint")

    def flush(self):
        """Write the rows ready as the next batches of at most ``output_rows`` (checkpoint
        first, with them as its outbox); with none, save the input positions if they moved."""
        if not self.ready:
            if self.read_since_save:
                self._save([])
                self.read_since_save = False
            return
        size, outbox = self.config.output_rows, []
        entry_ms = max(int(self.clock() * 1000), self.next_entry_ms)
        for start in range(0, len(self.ready), size):
            outbox.append({"seq": self.seq, "entry_ms": entry_ms, "rows": self.ready[start:start + size]})
            self.seq, self.next_entry_ms, entry_ms = self.seq + 1, entry_ms + 1, entry_ms + 1
        self.ready, self.ready_since = [], None
        self._save(outbox)
        self.read_since_save = False
        for batch in outbox:
            self.output.write(batch["seq"], batch["rows"], batch["entry_ms"])
            self._hook("after_output")

    # ------------------------------------------------------------------ one look
    def poll(self):
        """Read, join, close windows, write what is due; the number of events read."""
        now = self.clock()
        window, rows, read = self.window, [], 0
        room_i, room_a = window.room_for_impressions(), window.room_for_actions()
        if not room_i and not room_a:
            rows += window.force_close_oldest()
            room_i = window.room_for_impressions()
        batch = self.config.read_batch
        for where, raw in self._read("impressions", min(batch, room_i), now):
            read += 1
            event = self._parse("impressions", where, raw, self.fields.impression)
            if event is not None:
                rid, t, fields = event
                self.watermark.observe("impressions", t, now)
                rows += window.add_impression(rid, t, fields)
        for where, raw in self._read("actions", min(batch, room_a), now):
            read += 1
            event = self._parse("actions", where, raw, self.fields.action_of)
            if event is not None:
                rid, t, kind, event_id = event
                self.watermark.observe("actions", t, now)
                rows += window.add_action(rid, t, kind, event_id)
        ended = all(self.sources[name].ended for name in _SOURCES)
        rows += window.close(math.inf if ended else self.watermark.advance(now))
        self.read_since_save = self.read_since_save or read > 0
        if rows:
            self.ready += rows
            if self.ready_since is None:
                self.ready_since = now
        if ended:
            self.flush()
            self.output.end()
            self.done = True
        elif len(self.ready) >= self.config.output_rows or (
                self.ready and now - self.ready_since >= self.config.flush_s):
            self.flush()
        self._progress(now)
        return read

    def _read(self, source, limit, now):
        """Up to ``limit`` events of ``source``; a look with room counts for its quietness."""
        if limit <= 0:
            return []
        events = self.sources[source].read(limit)
        self.watermark.read(source, len(events), now)
        return events

    def _parse(self, source, where, raw, parse):
        try:
            event = parse(raw)
        except BadEvent as exc:
            self.bad_events += 1
            text = f"{self.sources[source].where}, {where}: {exc}"
            if self.config.on_bad_event == "raise":
                raise DataError(f"{text} (or set on_bad_event: skip to skip and count such events)") from None
            if len(self.bad_examples) < _MAX_EXAMPLES:
                self.bad_examples.append(text)
            return None
        index, count = self.partition
        if count > 1 and zlib.crc32(event[0].encode()) % count != index:
            self.other_partition += 1
            return None
        return event

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
        return self.summary()

    def summary(self):
        counts = dict(self.window.counts)
        return {**counts, "pending": len(self.window.pending), "early_actions": len(self.window.early),
                "bad_events": self.bad_events, "other_partition": self.other_partition,
                "dropped": counts["duplicates"] + self.bad_events, "output_batches": self.seq,
                "watermark_lag_s": self.watermark.lag(self.clock()),
                "bad_event_examples": list(self.bad_examples)}

    def progress_line(self):
        s = self.summary()
        rate = (s["impressions"] + s["actions"]) / max(self.clock() - self.started, 1e-9)
        return (f"[hybridps join] pending {s['pending']:,}, emitted {s['emitted']:,}, late "
                f"{s['late_actions']:,}, dropped {s['dropped']:,}, watermark lag "
                f"{s['watermark_lag_s']:.1f}s, {rate:,.0f} events/s")

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
    summary = joiner.run(stop=lambda: bool(stopping))
    print(json.dumps({k: v for k, v in summary.items() if k != "bad_event_examples"}, indent=2))
    for example in summary["bad_event_examples"]:
        sys.stderr.write(f"[hybridps join] skipped: {example}\n")
    return 0
