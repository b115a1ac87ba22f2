"""``hybridps join``: the window and watermark against hand-computed outputs, the process loop
with a controlled clock (idle sources, back pressure, bad events), the config and its flags.

The expected rows are written out by hand from the semantics in docs/join.md (window 10 s of
event time unless a test says otherwise); nothing here asserts on a measured time.
"""
import math
import os

import pytest

from hybridps.errors import ConfigError, DataError
from hybridps.join.window import JoinWindow, Watermark


def row(f, label, correction=0):
    return {"f": f, "label": label, "correction": correction}


# ---------------------------------------------------------------------- the window
def test_on_close_joins_in_window_buffers_early_actions_and_counts_late_ones():
    w = JoinWindow(["click"], 10)
    assert w.add_impression("A", 0, {"f": "a"}) == []
    assert w.add_impression("B", 2, {"f": "b"}) == []
    assert w.add_action("A", 5, "click") == []            # on_close: nothing leaves yet
    assert w.add_action("D", 6, "click") == []            # before its impression: buffered
    assert w.add_impression("D", 7, {"f": "d"}) == []
    assert w.close(10) == []                              # A's window is [0, 10]: still open
    assert w.close(11) == [row("a", 1)]
    assert w.add_action("B", 13, "click") == []           # 13 > 2 + 10: late, B still pending
    assert w.close(12.5) == [row("b", 0)]                 # leaves without the late click
    assert w.close(math.inf) == [row("d", 1)]
    assert (w.counts["emitted"], w.counts["positives"], w.counts["late_actions"]) == (3, 2, 1)
    assert not w.pending and not w.early


def test_first_positive_leaves_at_the_first_positive_and_negatives_at_close():
    w = JoinWindow(["click"], 10, emit="first_positive")
    w.add_impression("A", 0, {"f": "a"})
    w.add_impression("B", 1, {"f": "b"})
    assert w.add_action("A", 3, "click") == [row("a", 1)]
    assert w.add_action("A", 4, "click") == []            # its label is 1 already: a repeat
    assert w.add_action("C", 5, "click") == []            # early
    assert w.add_impression("C", 4, {"f": "c"}) == [row("c", 1)]
    assert w.close(11.5) == [row("b", 0)]
    assert (w.counts["repeat_actions"], w.counts["emitted"]) == (1, 3)


def test_late_emit_sends_one_correction_row_while_the_impression_is_kept():
    w = JoinWindow(["click"], 10, late="emit")             # kept 10 s after its window (horizon)
    w.add_impression("A", 0, {"f": "a"})
    assert w.close(10.5) == [row("a", 0)]
    assert w.add_action("A", 15, "click") == [row("a", 1, correction=1)]
    assert w.add_action("A", 16, "click") == []            # corrected already: a repeat
    w.close(20.5)                                          # 0 + 10 + 10 passed: A forgotten
    assert w.add_action("A", 19, "click") == []            # no impression to join: buffered
    w.close(30)
    assert (w.counts["late_actions"], w.counts["corrections"], w.counts["repeat_actions"],
            w.counts["unmatched_actions"]) == (1, 1, 1, 1)
    assert not w.closed and not w.early


def test_several_action_types_give_one_label_column_each_and_duplicates_by_event_id_are_dropped():
    w = JoinWindow(["click", "conversion"], 10)
    w.add_impression("A", 0, {"f": "a"})
    w.add_impression("A", 0, {"f": "a"})                   # a producer's retry
    w.add_action("A", 8, "conversion", event_id="e1")
    w.add_action("A", 8, "conversion", event_id="e1")
    assert w.close(11) == [{"f": "a", "click": 0, "conversion": 1, "correction": 0}]
    assert w.counts["duplicates"] == 2 and w.counts["actions"] == 1


def test_an_impression_after_its_window_closed_leaves_at_once_with_its_buffered_actions():
    w = JoinWindow(["click"], 10)
    w.add_action("A", 1, "click")
    w.add_impression("Z", 20, {"f": "z"})
    w.close(10.5)
    assert w.add_impression("A", 0, {"f": "a"}) == [row("a", 1)]
    assert w.counts["late_impressions"] == 1


def test_max_pending_bounds_the_state_and_forced_closes_take_the_oldest_first():
    w = JoinWindow(["click"], 10, max_pending=2)
    w.add_impression("B", 3, {"f": "b"})
    w.add_impression("A", 1, {"f": "a"})
    assert w.room_for_impressions() == 0
    assert w.force_close_oldest() == [row("a", 0)]
    assert w.room_for_impressions() == 1 and w.counts["forced_closes"] == 1


def test_the_window_state_survives_json_and_goes_on_the_same():
    import json
    events = [("i", "A", 0), ("a", "B", 1), ("i", "C", 2), ("a", "A", 4), ("i", "B", 3)]
    whole, first = JoinWindow(["click"], 10, late="emit"), JoinWindow(["click"], 10, late="emit")
    for kind, rid, t in events:
        for w in (whole, first):
            w.add_impression(rid, t, {"f": rid}) if kind == "i" else w.add_action(rid, t, "click")
    second = JoinWindow(["click"], 10, late="emit")
    second.restore(json.loads(json.dumps(first.state())))
    assert second.close(12.5) == whole.close(12.5) == [{"f": "A", "label": 1, "correction": 0},
                                                       {"f": "C", "label": 0, "correction": 0}]
    assert second.add_action("C", 20, "click") == whole.add_action("C", 20, "click")
    assert second.state() == whole.state()


# ---------------------------------------------------------------------- the watermark
def test_the_watermark_holds_for_a_silent_source_follows_the_slowest_then_the_clock():
    m = Watermark(("impressions", "actions"), allowed_lateness=2, idle_timeout=5, now=100)
    assert m.advance(100) == -math.inf
    m.observe("impressions", 50, 101)
    assert m.advance(101) == -math.inf                     # actions: nothing yet, not idle
    m.observe("actions", 40, 102)
    assert m.advance(102) == 38                            # min(50, 40) - 2
    m.observe("impressions", 60, 103)
    assert m.advance(103) == 38
    assert m.advance(107.5) == 58                          # actions idle: 60 - 2
    assert m.advance(110) == 65                            # both idle: 60 + (110 - 103) - 2
    m.observe("actions", 45, 111)
    assert m.advance(111) == 65                            # never backwards
    assert m.lag(111) == 0.0


def test_wrong_window_settings_are_config_errors():
    with pytest.raises(ConfigError, match="emit must be one of"):
        JoinWindow(["click"], 10, emit="sometimes")
    with pytest.raises(ConfigError, match="action_types"):
        JoinWindow(["click", "click"], 10)
    with pytest.raises(ConfigError, match="window_s"):
        JoinWindow(["click"], 0)
