"""The join window: pending impressions, early actions, the watermark, and what leaves when.

What lives here: :class:`Watermark` (event time minus ``allowed_lateness`` over the sources
still delivering; the clock once every source is quiet) and :class:`JoinWindow` (impressions
waiting for their actions, actions waiting for their impression, closed impressions kept for
late actions, the counters). Both are pure: time comes in as arguments, nothing is read or
written here; :meth:`JoinWindow.state` / :meth:`JoinWindow.restore` turn the whole of it into
JSON and back, and :meth:`JoinWindow.apply` replays one operation as the log of the checkpoint
keeps it (``OP_*``: the same operations from the same state give the same rows; hybridps.join.state). What does not: reading events (hybridps.join.sources),
writing rows (hybridps.join.outputs), the loop (hybridps.join.process).

Semantics (docs/join.md). An impression with event time ``t`` waits while the watermark is at
or below ``t + window``; an action of the same ``request_id`` with event time at most
``t + window`` sets its label. ``emit: on_close`` sends the row when the window closes;
``first_positive`` sends it at its first positive action (later actions of it are late) and
negatives at close. An action whose impression has not arrived is buffered until the watermark
passes its own time plus ``window``. An action after its impression's window is late: counted,
and with ``late: emit`` (while the closed impression is kept, ``late_horizon`` of event time)
sent again as a correction row (``correction`` column 1) with that label set. Rows leave in a
deterministic order: by the time their window closes, then request id.
"""
import heapq
import math

from hybridps.errors import ConfigError

EMIT_MODES = ("on_close", "first_positive")
LATE_MODES = ("count", "emit")
OP_IMPRESSION, OP_ACTION, OP_CLOSE, OP_FORCE_CLOSE = "i", "a", "c", "f"   # as logged: [op, args...]
COUNTERS = ("impressions", "actions", "emitted", "positives", "corrections", "late_actions",
            "late_impressions", "repeat_actions", "unmatched_actions", "duplicates",
            "forced_closes")


class Due:
    """Keys due at times, the earliest first and, at one time, in key order: a heap of the
    distinct times, each with its keys (impressions of one second share a time, so the heap
    stays small and compares numbers only)."""

    def __init__(self):
        self.times, self.keys = [], {}

    def __bool__(self):
        return bool(self.times)

    def push(self, time, key):
        keys = self.keys.get(time)
        if keys is None:
            self.keys[time] = [key]
            heapq.heappush(self.times, time)
        else:
            keys.append(key)

    def pop(self, before=math.inf, count=None):
        """[(time, key)] of the keys due before ``before``, at most ``count`` of them, in
        (time, key) order; removed."""
        out = []
        while self.times and self.times[0] < before and (count is None or len(out) < count):
            time = heapq.heappop(self.times)
            keys = sorted(self.keys.pop(time))
            if count is not None and len(out) + len(keys) > count:
                keys, rest = keys[:count - len(out)], keys[count - len(out):]
                self.keys[time] = rest
                heapq.heappush(self.times, time)
            out += [(time, key) for key in keys]
        return out


def label_columns(action_types):
    """The output's label column of each action type: ``label`` for one type, else its name."""
    return ["label"] if len(action_types) == 1 else list(action_types)


class Watermark:
    """Event time as far as it is known to be complete (module docstring of hybridps.join).

    ``observe(source, event_time, now)`` records an event read at processing time ``now``;
    ``read(source, delivered, now)`` records each look at a source (a source is quiet once its
    looks have come back empty for ``idle_timeout`` seconds: a joiner that looks late because it
    was busy does not make a source quiet); ``advance(now)`` moves the watermark (never
    backwards): the lowest newest event time over the sources not quiet, minus
    ``allowed_lateness``; when every source is quiet, the newest event time plus the seconds
    since it was read, minus ``allowed_lateness`` (so a quiet stream still closes its windows).
    A source that has delivered nothing yet holds the watermark until it is quiet.
    """

    def __init__(self, sources, allowed_lateness, idle_timeout, now):
        self.sources = tuple(sources)
        self.allowed_lateness, self.idle_timeout = float(allowed_lateness), float(idle_timeout)
        self.newest = {s: None for s in self.sources}     # event time
        self.read_at = {s: now for s in self.sources}     # processing time of the last event read
        self.empty_since = {s: None for s in self.sources}  # first of the empty looks in a row
        self.value = -math.inf

    def observe(self, source, event_time, now):
        newest = self.newest[source]
        self.newest[source] = event_time if newest is None else max(newest, event_time)
        self.read_at[source] = now

    def read(self, source, delivered, now):
        if delivered:
            self.empty_since[source] = None
        elif self.empty_since[source] is None:
            self.empty_since[source] = now

    def idle(self, source, now):
        since = self.empty_since[source]
        return since is not None and now - since >= self.idle_timeout

    def advance(self, now):
        active = [s for s in self.sources if not self.idle(s, now)]
        if active:
            times = [self.newest[s] for s in active]
            if any(t is None for t in times):
                return self.value
            candidate = min(times) - self.allowed_lateness
        else:
            known = [t for t in self.newest.values() if t is not None]
            if not known:
                return self.value
            quiet_for = now - max(self.read_at.values())
            candidate = max(known) + quiet_for - self.allowed_lateness
        self.value = max(self.value, candidate)
        return self.value

    def lag(self, now):
        """Seconds of event time between the newest event and the watermark (0 before any)."""
        known = [t for t in self.newest.values() if t is not None]
        if not known or self.value == -math.inf:
            return 0.0
        return max(0.0, max(known) - self.value)

    def state(self):
        return {"value": None if self.value == -math.inf else self.value, "newest": dict(self.newest)}

    def restore(self, state, now):
        self.value = -math.inf if state["value"] is None else float(state["value"])
        for source in self.sources:
            self.newest[source] = state["newest"].get(source)
            self.read_at[source], self.empty_since[source] = now, None


class JoinWindow:
    """Impressions and actions joined by request id within ``window`` seconds of event time
    (module docstring). Each call returns the rows that leave because of it: dicts of the
    impression's fields, one label column per action type (:func:`label_columns`) and the
    ``correction_column`` (0, or 1 for a late correction)."""

    def __init__(self, action_types, window, emit="on_close", late="count", late_horizon=None,
                 max_pending=100_000, correction_column="correction"):
        if emit not in EMIT_MODES:
            raise ConfigError(f"emit must be one of {', '.join(EMIT_MODES)}, got {emit!r}")
        if late not in LATE_MODES:
            raise ConfigError(f"late must be one of {', '.join(LATE_MODES)}, got {late!r}")
        if not action_types or len(set(action_types)) != len(action_types):
            raise ConfigError(f"action_types must name each action type once, got {action_types!r}")
        if not window > 0:
            raise ConfigError(f"window_s must be > 0 seconds, got {window!r}")
        self.action_types = list(action_types)
        self.type_index = {t: i for i, t in enumerate(self.action_types)}
        self.labels = label_columns(self.action_types)
        self.window, self.emit, self.late = float(window), emit, late
        self.late_horizon = self.window if late_horizon is None else float(late_horizon)
        self.max_pending = int(max_pending)
        if self.max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending!r}")
        self.correction_column = correction_column
        self.pending = {}       # request id: [event time, fields, labels, labels corrected late]
        self.early = {}         # request id: [[event time, action type], ...]
        self.closed = {}        # request id: [event time, fields or None, labels, forget at]
        self.action_ids = {}    # action event id: forget at (duplicates)
        self._closing, self._early_due, self._forget_closed, self._forget_ids = Due(), Due(), Due(), Due()
        self.watermark = -math.inf
        self.counts = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ bounds
    def room_for_impressions(self):
        return max(0, self.max_pending - len(self.pending))

    def room_for_actions(self):
        return max(0, self.max_pending - len(self.early))

    def force_close_oldest(self, count=1):
        """Back pressure that reading cannot relieve: the ``count`` impressions whose windows
        close first leave now with the labels seen (counted in ``forced_closes``)."""
        rows = []
        while self._closing and len(rows) < count:
            for closes, rid in self._closing.pop(count=count - len(rows)):
                if self._closes_at(rid, closes):
                    self.counts["forced_closes"] += 1
                    rows.append(self._leave(rid))
        return rows

    def _closes_at(self, rid, closes):
        """Whether ``rid`` is pending with its window closing at ``closes`` (a heap entry of
        an impression that left, or of an earlier one of the same id, is stale)."""
        entry = self.pending.get(rid)
        return entry is not None and entry[0] + self.window == closes

    def apply(self, op):
        """Replay one logged operation (``[OP_*, args...]``); the rows it sends."""
        kind = op[0]
        if kind == OP_IMPRESSION:
            return self.add_impression(op[1], op[2], op[3])
        if kind == OP_ACTION:
            return self.add_action(op[1], op[2], op[3], op[4])
        if kind == OP_CLOSE:
            return self.close(op[1])
        if kind == OP_FORCE_CLOSE:
            return self.force_close_oldest(op[1])
        raise ValueError(f"not a join window operation: {op!r}")

    # ------------------------------------------------------------------ events
    def add_impression(self, rid, t, fields):
        if rid in self.pending or rid in self.closed:
            self.counts["duplicates"] += 1
            return []
        self.counts["impressions"] += 1
        rows = []
        self.pending[rid] = [t, fields, [0] * len(self.action_types), [0] * len(self.action_types)]
        for t_action, kind in self.early.pop(rid, ()):
            rows += self._match(rid, t_action, kind)
        if rid in self.pending:
            if self.watermark > t + self.window:            # its window closed before it came
                self.counts["late_impressions"] += 1
                rows.append(self._leave(rid))
            else:
                self._closing.push(t + self.window, rid)
        return rows

    def add_action(self, rid, t, kind, event_id=None):
        if kind not in self.type_index:
            raise ValueError(kind)
        if event_id is not None:
            if event_id in self.action_ids:
                self.counts["duplicates"] += 1
                return []
            forget = t + self.window + self.late_horizon
            self.action_ids[event_id] = forget
            self._forget_ids.push(forget, event_id)
        self.counts["actions"] += 1
        if rid in self.pending or rid in self.closed:
            return self._match(rid, t, kind)
        if self.watermark > t + self.window:               # no impression can still take it
            self.counts["unmatched_actions"] += 1
            return []
        self.early.setdefault(rid, []).append([t, kind])
        self._early_due.push(t + self.window, rid)
        return []

    def _match(self, rid, t_action, kind):
        index = self.type_index[kind]
        entry = self.pending.get(rid)
        if entry is not None and t_action <= entry[0] + self.window:
            if entry[2][index]:
                self.counts["repeat_actions"] += 1
                return []
            entry[2][index] = 1
            if self.emit == "first_positive":
                return [self._leave(rid)]
            return []
        # after its window: the impression left, or will leave without this label
        if entry is not None:
            _, fields, labels, sent = entry                # sent: labels corrected already
        else:
            _, fields, labels = self.closed[rid][:3]
            sent = labels
        if labels[index] or sent[index]:
            self.counts["repeat_actions"] += 1
            return []
        self.counts["late_actions"] += 1
        if self.late != "emit" or fields is None:
            return []
        corrected = [max(a, b) for a, b in zip(labels, sent)]
        corrected[index] = 1
        sent[index] = 1                                    # a second late one is a repeat
        self.counts["corrections"] += 1
        return [self._row(fields, corrected, 1)]

    # ------------------------------------------------------------------ time
    def close(self, watermark):
        """Move to ``watermark`` (math.inf: the inputs ended): the rows whose windows closed,
        in closing order; buffered actions and kept impressions past their time are dropped."""
        self.watermark = max(self.watermark, watermark)
        rows = []
        for closes, rid in self._closing.pop(self.watermark):
            if self._closes_at(rid, closes):
                rows.append(self._leave(rid))
        for _, rid in self._early_due.pop(self.watermark):
            buffered = self.early.get(rid)
            if buffered is None:
                continue
            keep = [a for a in buffered if a[0] + self.window >= self.watermark]
            self.counts["unmatched_actions"] += len(buffered) - len(keep)
            if keep:
                self.early[rid] = keep
            else:
                del self.early[rid]
        for forget, rid in self._forget_closed.pop(self.watermark):
            if rid in self.closed and self.closed[rid][3] == forget:
                del self.closed[rid]
        for forget, event_id in self._forget_ids.pop(self.watermark):
            if self.action_ids.get(event_id) == forget:
                del self.action_ids[event_id]
        return rows

    def _leave(self, rid):
        t, fields, labels, sent = self.pending.pop(rid)
        counts = self.counts
        counts["emitted"] += 1
        if 1 in labels:
            counts["positives"] += 1
        forget = t + self.window + self.late_horizon
        if len(self.closed) >= self.max_pending:          # bounded: the oldest kept goes first
            self._forget_oldest_closed()
        # what later actions repeat: the labels seen and those corrected late already
        seen = [max(a, b) for a, b in zip(labels, sent)] if 1 in sent else list(labels)
        self.closed[rid] = [t, fields if self.late == "emit" else None, seen, forget]
        self._forget_closed.push(forget, rid)
        return self._row(fields, labels, 0)

    def _forget_oldest_closed(self):
        while self._forget_closed:
            for forget, rid in self._forget_closed.pop(count=1):
                if rid in self.closed and self.closed[rid][3] == forget:
                    del self.closed[rid]
                    return

    def _row(self, fields, labels, correction):
        row = dict(fields)
        row.update(zip(self.labels, labels))
        row[self.correction_column] = correction
        return row

    # ------------------------------------------------------------------ state
    def state(self):
        """All of it as JSON-ready lists (hybridps.join.state)."""
        return {"watermark": None if self.watermark == -math.inf else self.watermark,
                "pending": [[rid, *entry] for rid, entry in self.pending.items()],
                "early": [[rid, actions] for rid, actions in self.early.items()],
                "closed": [[rid, *entry] for rid, entry in self.closed.items()],
                "action_ids": [[eid, forget] for eid, forget in self.action_ids.items()],
                "counts": dict(self.counts), "max_pending": self.max_pending}

    def restore(self, state):
        self.watermark = -math.inf if state["watermark"] is None else float(state["watermark"])
        self.pending = {rid: [t, fields, list(labels), list(sent)]
                        for rid, t, fields, labels, sent in state["pending"]}
        self.early = {rid: [list(a) for a in actions] for rid, actions in state["early"]}
        self.closed = {rid: [t, fields, list(labels), forget]
                       for rid, t, fields, labels, forget in state["closed"]}
        self.action_ids = {eid: forget for eid, forget in state["action_ids"]}
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.counts.update(state["counts"])
        self.max_pending = int(state.get("max_pending", self.max_pending))
        self._closing, self._early_due, self._forget_closed, self._forget_ids = Due(), Due(), Due(), Due()
        for rid, entry in self.pending.items():
            self._closing.push(entry[0] + self.window, rid)
        for rid, actions in self.early.items():
            for action in actions:
                self._early_due.push(action[0] + self.window, rid)
        for rid, entry in self.closed.items():
            self._forget_closed.push(entry[3], rid)
        for event_id, forget in self.action_ids.items():
            self._forget_ids.push(forget, event_id)
