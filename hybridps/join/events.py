"""What an input event is: the fields the joiner needs from an impression or an action, checked.

What lives here: :class:`EventFields` (the names of ``request_id``, ``event_time``, the action
type and the optional event id in the input events) and its parsers, which turn one raw event
(a dict read by hybridps.join.sources) into what hybridps.join.window takes, or raise
:class:`BadEvent` saying which field is wrong. An event without a ``request_id`` or with an
``event_time`` that is neither a number of seconds nor an ISO 8601 time never joins: the
process loop turns BadEvent into an error naming the source, position and field, or, with
``on_bad_event: skip``, a counted skip.
"""
import datetime
import math


class BadEvent(Exception):
    """An event the joiner cannot use: ``field`` names the field, the message the problem."""

    def __init__(self, field, problem):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field


class EventFields:
    """Field names of the input events (the join config's ``*_field`` settings)."""

    def __init__(self, request_id="request_id", event_time="event_time", action="action",
                 event_id="event_id", action_types=("click",)):
        self.request_id, self.event_time = request_id, event_time
        self.action, self.event_id = action, event_id
        self.action_types = set(action_types)

    def impression(self, raw):
        """(request id, event time, the impression's fields) of one raw impression."""
        return self._request_id(raw), self._time(raw), raw

    def action_of(self, raw):
        """(request id, event time, action type, event id or None) of one raw action."""
        rid, t = self._request_id(raw), self._time(raw)
        kind = raw.get(self.action)
        if kind is None or kind == "":
            raise BadEvent(self.action, "missing (the action type)")
        if type(kind) is not str:
            kind = str(kind)
        if kind not in self.action_types:
            raise BadEvent(self.action, f"{kind!r} is not one of the action types "
                                        f"{sorted(self.action_types)} (action_types)")
        event_id = raw.get(self.event_id)
        return rid, t, kind, None if event_id is None or event_id == "" else str(event_id)

    def _request_id(self, raw):
        rid = raw.get(self.request_id)
        if type(rid) is str and rid:
            return rid
        if rid is None or rid == "":
            raise BadEvent(self.request_id, "missing: an event without a request id cannot join")
        return str(rid)

    def _time(self, raw):
        value = raw.get(self.event_time)
        if type(value) is float and value - value == 0:     # finite seconds: the common case
            return value
        if value is None or value == "":
            raise BadEvent(self.event_time, "missing")
        return parse_event_time(value, self.event_time)


def parse_event_time(value, field="event_time"):
    """Seconds since the epoch of a number, a numeric text or an ISO 8601 time (naive: UTC)."""
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise BadEvent(field, f"{value!r} is not a finite time")
        return seconds
    else:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise BadEvent(field, f"{text!r} is neither seconds since the epoch nor an "
                                      f"ISO 8601 time") from None
        else:
            if not math.isfinite(seconds):
                raise BadEvent(field, f"{text!r} is not a finite time")
            return seconds
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()
