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


def test_late_actions_of_an_impression_still_pending_send_one_correction():
    w = JoinWindow(["click"], 10, late="emit")
    w.add_impression("A", 0, {"f": "a"})
    w.close(5)                                             # a watermark behind (allowed lateness)
    assert w.add_action("A", 12, "click") == [row("a", 1, correction=1)]
    assert w.add_action("A", 13, "click") == []            # corrected already
    assert w.close(11) == [row("a", 0)]                    # the row itself: its window saw none
    assert w.add_action("A", 14, "click") == []
    assert (w.counts["late_actions"], w.counts["corrections"], w.counts["repeat_actions"]) == (1, 1, 2)


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

    def look(now, impressions=None, actions=None):      # one look at each source
        for source, t in (("impressions", impressions), ("actions", actions)):
            if t is not None:
                m.observe(source, t, now)
            m.read(source, t is not None, now)

    look(100)
    assert m.advance(100) == -math.inf
    look(101, impressions=50)
    assert m.advance(101) == -math.inf                     # actions: nothing yet, empty 1 s
    look(102, impressions=55, actions=40)
    assert m.advance(102) == 38                            # min(55, 40) - 2
    look(103, impressions=60)                              # actions empty from 103 on
    look(107)                                              # impressions empty from 107 on
    assert m.advance(107.5) == 38                          # actions empty 4.5 s: not quiet yet
    assert m.advance(108.5) == 58                          # actions quiet: 60 - 2
    assert m.advance(112.5) == 67.5                        # both quiet: 60 + (112.5 - 103) - 2
    look(113, actions=45)
    assert m.advance(113) == 67.5                          # never backwards
    assert m.lag(113) == 0.0


def test_wrong_window_settings_are_config_errors():
    with pytest.raises(ConfigError, match="emit must be one of"):
        JoinWindow(["click"], 10, emit="sometimes")
    with pytest.raises(ConfigError, match="action_types"):
        JoinWindow(["click", "click"], 10)
    with pytest.raises(ConfigError, match="window_s"):
        JoinWindow(["click"], 0)


# ---------------------------------------------------------------------- the process loop, a fake clock
def put_events(directory, name, events):
    """Rename a Parquet file of ``events`` (dicts) into a stream directory, as a producer does."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "." + name)
    pq.write_table(pa.Table.from_pylist(events), tmp)
    os.rename(tmp, os.path.join(directory, name))


def read_output(directory):
    """Every row of the Parquet parts in an output directory, in part order."""
    import pyarrow.parquet as pq
    rows = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("part-"):
            rows += pq.read_table(os.path.join(directory, name)).to_pylist()
    return rows


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def joiner(tmp_path, clock, **settings):
    from hybridps.join.config import make_join_config
    from hybridps.join.process import Joiner
    for name in ("imp", "act"):
        os.makedirs(tmp_path / name, exist_ok=True)
    values = dict(impressions=f"stream:{tmp_path / 'imp'}", actions=f"stream:{tmp_path / 'act'}",
                  output=f"stream:{tmp_path / 'out'}", state_dir=str(tmp_path / "state"),
                  window_s=10.0, flush_s=0.0, progress_every_s=0.0)
    values.update(settings)
    return Joiner(make_join_config(overrides=values), clock=clock)


def imp(rid, t, **fields):
    return {"request_id": rid, "event_time": t, "item": 7, **fields}


def test_quiet_sources_close_windows_by_processing_time(tmp_path):
    clock = Clock(1000.0)
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0)])
    j = joiner(tmp_path, clock, idle_timeout_s=5.0)
    j.poll()
    assert not read_output(tmp_path / "out")               # actions: nothing yet, not idle
    clock.now = 1006.0
    j.poll()                                               # both quiet: watermark 0 + 6
    assert not read_output(tmp_path / "out")
    clock.now = 1011.0
    j.poll()                                               # 0 + 11 > 0 + 10: A's window closed
    assert read_output(tmp_path / "out") == [
        {"request_id": "A", "event_time": 0.0, "item": 7, "label": 0, "correction": 0}]


def test_a_joiner_that_looks_late_does_not_take_a_source_for_quiet(tmp_path):
    clock = Clock(1000.0)
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0)])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "Z", "event_time": 1.0, "action": "click", "event_id": "z"}])
    j = joiner(tmp_path, clock, idle_timeout_s=5.0)
    j.poll()
    clock.now = 1010.0                                     # busy for 10 s; then A's click is
    put_events(tmp_path / "imp", "0002.parquet", [imp("B", 20.0)])   # not there yet
    j.poll()                                               # actions: one empty look, not quiet
    assert "A" in j.window.pending
    put_events(tmp_path / "act", "0002.parquet",
               [{"request_id": "A", "event_time": 9.0, "action": "click", "event_id": "a"},
                {"request_id": "Y", "event_time": 30.0, "action": "click", "event_id": "y"}])
    clock.now = 1010.5
    j.poll()
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [("A", 1)]


def test_a_full_window_stops_reading_impressions_until_rows_leave(tmp_path):
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp(f"r{i}", float(i)) for i in range(5)])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "r0", "event_time": 1.0, "action": "click", "event_id": "c0"}])
    j = joiner(tmp_path, clock, max_pending=2, read_batch=10, idle_timeout_s=100.0)
    j.poll()
    assert len(j.window.pending) == 2
    assert j.sources["impressions"].position()["row"] == 2  # read only what fits
    assert j.summary()["forced_closes"] == 0


def test_max_pending_bytes_takes_bytes_or_a_size_with_its_unit():
    from hybridps.join.config import byte_size
    assert [byte_size(v) for v in (1024, "500MB", "500 mb", "2GiB", "64k", "1.5KB", None)] == [
        1024, 500 * 10**6, 500 * 10**6, 2 * 2**30, 64 * 2**10, 1500, None]
    for bad in ("12 parsecs", "MB", "0", -5):
        with pytest.raises(ConfigError, match=r"join setting 'max_pending_bytes'"):
            byte_size(bad)


def test_max_pending_bytes_holds_back_impressions_at_the_estimated_memory_then_forces_the_oldest_out(tmp_path):
    import sys
    from hybridps.join.process import _ENTRY_BYTES
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp(f"r{i:02d}", float(i)) for i in range(20)])
    os.makedirs(tmp_path / "act")
    import pyarrow.parquet as pq
    fields = pq.read_table(tmp_path / "imp" / "0001.parquet").to_pylist()[0]    # the one measured
    each = sys.getsizeof(fields) + sum(sys.getsizeof(v) for v in fields.values()) + _ENTRY_BYTES
    j = joiner(tmp_path, clock, max_pending_bytes=10 * each, read_batch=4, window_s=1000.0,
               idle_timeout_s=1000.0)
    for _ in range(3):
        j.poll()                            # 4, 4, then the 2 that fit
    assert len(j.window.pending) == 10 and j.sources["impressions"].position()["row"] == 10
    assert j.summary()["pending_bytes"] == 10 * each and not j.paused
    j.poll()                                # full, no action to wait for: the 4 oldest leave
    assert j.paused and "full: impressions not read" in j.progress_line()
    assert j.summary()["forced_closes"] == 4
    assert [r["request_id"] for r in read_output(tmp_path / "out")] == ["r00", "r01", "r02", "r03"]
    assert sorted(j.window.pending) == [f"r{i:02d}" for i in range(4, 10)]


def test_an_event_without_a_request_id_or_a_time_never_joins(tmp_path):
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet",
               [imp("A", "0"), {"request_id": None, "event_time": "1", "item": 1},
                {"request_id": "C", "event_time": "yesterday", "item": 1}])
    with pytest.raises(DataError, match=r"impressions stream:.*imp, file 0001.parquet, row 2: field "
                                        r"'request_id': missing"):
        joiner(tmp_path, clock).poll()
    j = joiner(tmp_path / "skip", clock, impressions=f"stream:{tmp_path / 'imp'}", on_bad_event="skip")
    j.poll()
    assert j.summary()["bad_events"] == 2
    assert "row 3: field 'event_time': 'yesterday' is neither" in j.summary()["bad_event_examples"][1]
    assert list(j.window.pending) == ["A"]


def test_the_inputs_ending_close_every_window_and_end_the_output(tmp_path):
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0), imp("B", 1.0)])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "B", "event_time": 5.0, "action": "click", "event_id": "x"}])
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    summary = joiner(tmp_path, clock).run()
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [("A", 0), ("B", 1)]
    assert os.path.exists(tmp_path / "out" / "_END")
    assert (summary["emitted"], summary["pending"]) == (2, 0)


def test_an_output_written_by_another_state_is_refused_not_skipped(tmp_path):
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0)])
    os.makedirs(tmp_path / "act")
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    joiner(tmp_path, clock).run()
    with pytest.raises(ConfigError, match=r"out already holds 2 parts or entries, and state_dir .*new-state"):
        joiner(tmp_path, clock, state_dir=str(tmp_path / "new-state"))


def test_partitions_split_the_request_ids_by_crc32(tmp_path):
    import zlib
    clock = Clock()
    rids = [f"r{i}" for i in range(20)]
    put_events(tmp_path / "imp", "0001.parquet", [imp(r, 0.0) for r in rids])
    os.makedirs(tmp_path / "act")
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    kept = []
    for part in range(2):
        base = tmp_path / f"p{part}"
        joiner(base, clock, impressions=f"stream:{tmp_path / 'imp'}", actions=f"stream:{tmp_path / 'act'}",
               partition=f"{part}/2").run()
        kept.append(sorted(r["request_id"] for r in read_output(base / "out")))
    assert kept == [sorted(r for r in rids if zlib.crc32(r.encode()) % 2 == p) for p in range(2)]


# ---------------------------------------------------------------------- config and flags
def test_join_flags_come_from_the_config_dataclass_and_override_the_yaml(tmp_path):
    import dataclasses
    from hybridps.cli import build_parser
    from hybridps.join.config import JoinConfig, make_join_config
    path = tmp_path / "join.yaml"
    path.write_text("impressions: stream:/i\nactions: stream:/a\noutput: stream:/o\n"
                    "state_dir: /s\nwindow_s: 30\naction_types: [click, conversion]\n")
    args = build_parser().parse_args(["join", "--config", str(path), "--window-s", "5",
                                      "--emit", "first_positive", "--exit-when-done", "false"])
    names = {f.name for f in dataclasses.fields(JoinConfig)}
    config = make_join_config(args.config, {k: v for k, v in vars(args).items() if k in names})
    assert (config.window_s, config.emit, config.action_types, config.exit_when_done) == \
        (5.0, "first_positive", ["click", "conversion"], False)
    help_text = build_parser()._subparsers._group_actions[0].choices["join"].format_help()
    assert all("--" + f.name.replace("_", "-") in help_text for f in dataclasses.fields(JoinConfig))
    with pytest.raises(ConfigError, match="unknown join setting.*windw_s"):
        make_join_config(overrides={"windw_s": 3})
    with pytest.raises(ConfigError, match="'partition': '2/2'"):
        make_join_config(str(path), {"partition": "2/2"})
    with pytest.raises(ConfigError, match="output is not set"):
        make_join_config(overrides={"impressions": "stream:/i", "actions": "stream:/a"})


# Every JoinConfig field: its flag as typed on a command line, and the value (and type) it must
# set, written by hand (not the default, so a flag that sets nothing is seen).
JOIN_FLAGS = {
    "impressions": (["--impressions", "stream:/in/imp"], "stream:/in/imp"),
    "actions": (["--actions", "redis://h:1/act"], "redis://h:1/act"),
    "output": (["--output", "stream:/out"], "stream:/out"),
    "state_dir": (["--state-dir", "/state"], "/state"),
    "action_types": (["--action-types", "click, conversion"], ["click", "conversion"]),
    "window_s": (["--window-s", "2.5"], 2.5),
    "emit": (["--emit", "first_positive"], "first_positive"),
    "late": (["--late", "emit"], "emit"),
    "late_horizon_s": (["--late-horizon-s", "30"], 30.0),
    "allowed_lateness_s": (["--allowed-lateness-s", "1.5"], 1.5),
    "idle_timeout_s": (["--idle-timeout-s", "7"], 7.0),
    "max_pending": (["--max-pending", "12"], 12),
    "max_pending_bytes": (["--max-pending-bytes", "1.5GiB"], 3 * 2**29),
    "request_id_field": (["--request-id-field", "rid"], "rid"),
    "event_time_field": (["--event-time-field", "ts"], "ts"),
    "action_field": (["--action-field", "kind"], "kind"),
    "event_id_field": (["--event-id-field", "eid"], "eid"),
    "correction_column": (["--correction-column", "fix"], "fix"),
    "partition": (["--partition", "1/3"], "1/3"),
    "on_bad_event": (["--on-bad-event", "skip"], "skip"),
    "read_batch": (["--read-batch", "9"], 9),
    "output_rows": (["--output-rows", "8"], 8),
    "flush_s": (["--flush-s", "0.25"], 0.25),
    "poll_s": (["--poll-s", "0.5"], 0.5),
    "progress_every_s": (["--progress-every-s", "0"], 0.0),
    "list_separator": (["--list-separator", ";"], ";"),
    "exit_when_done": (["--exit-when-done", "false"], False),
}


def _join_config_of(argv):
    from hybridps.cli import build_parser
    from hybridps.join.config import JoinConfig, make_join_config
    from hybridps.settings import given_values
    args = build_parser().parse_args(["join"] + argv)
    return make_join_config(args.config, given_values(args, JoinConfig))


def test_every_join_field_has_a_flag_that_sets_it_with_its_type():
    import dataclasses
    from hybridps.join.config import JoinConfig
    assert set(JOIN_FLAGS) == {f.name for f in dataclasses.fields(JoinConfig)}
    config = _join_config_of([a for argv, _ in JOIN_FLAGS.values() for a in argv])
    for name, (_, expected) in JOIN_FLAGS.items():
        value = getattr(config, name)
        assert (value, type(value)) == (expected, type(expected)), name
    for spelling, expected in (("true", True), ("no", False), ("1", True)):
        assert _join_config_of(JOIN_FLAGS["impressions"][0] + JOIN_FLAGS["actions"][0] +
                               JOIN_FLAGS["output"][0] + JOIN_FLAGS["state_dir"][0] +
                               ["--exit-when-done", spelling]).exit_when_done is expected
    with pytest.raises(ConfigError, match="'exit_when_done': expected bool, got 'maybe'"):
        _join_config_of(["--exit-when-done", "maybe"])


def test_a_join_yaml_key_is_converted_to_its_type_and_an_unknown_one_named_with_close_fields(tmp_path):
    from hybridps.join.config import make_join_config
    path = tmp_path / "join.yaml"
    path.write_text("impressions: stream:/i\nactions: stream:/a\noutput: stream:/o\nstate_dir: /s\n"
                    "window_s: 3\nmax_pending: 7\naction_types: click,view\nexit_when_done: no\n")
    config = make_join_config(str(path))
    assert (config.window_s, type(config.window_s), config.max_pending, config.action_types,
            config.exit_when_done) == (3.0, float, 7, ["click", "view"], False)
    path.write_text("impressions: stream:/i\nwindw_s: 3\n")
    with pytest.raises(ConfigError, match=r"unknown join setting\(s\) 'windw_s' \(did you mean "
                                          rf"'window_s'\?\) in {path}; known fields: .*state_dir"):
        make_join_config(str(path))
    path.write_text("max_pending: many\n")
    with pytest.raises(ConfigError, match="'max_pending': expected int, got 'many'"):
        make_join_config(str(path))


# ---------------------------------------------------------------------- exactly once across SIGKILL
N_IMPRESSIONS, WINDOW = 240, 10.0


def ground_truth():
    """(impressions, actions sorted by event time, {request id: label}, late clicks, repeats):
    every third impression is clicked after (i % 7) * 2 s, beyond the window when that is 12;
    every fifteenth click is sent twice (a producer's retry, same event id)."""
    impressions = [imp(f"r{i:04d}", i * 0.5, pos=i) for i in range(N_IMPRESSIONS)]
    actions, labels, late, repeats = [], {}, 0, 0
    for i in range(N_IMPRESSIONS):
        rid = f"r{i:04d}"
        labels[rid] = 0
        if i % 3:
            continue
        delay = (i % 7) * 2.0
        click = {"request_id": rid, "event_time": i * 0.5 + delay, "action": "click", "event_id": f"c{i}"}
        actions.append(click)
        if i % 15 == 0:
            actions.append(dict(click))
            repeats += 1
        if delay <= WINDOW:
            labels[rid] = 1
        else:
            late += 1
    actions.sort(key=lambda a: a["event_time"])
    return impressions, actions, labels, late, repeats


def put_all_events(tmp_path, impressions, actions, impressions_per_file, actions_per_file):
    """Both sources as stream directories imp/ and act/ of files of the given sizes, ended."""
    for start in range(0, len(impressions), impressions_per_file):
        put_events(tmp_path / "imp", f"{start:05d}.parquet", impressions[start:start + impressions_per_file])
    for start in range(0, len(actions), actions_per_file):
        put_events(tmp_path / "act", f"{start:05d}.parquet", actions[start:start + actions_per_file])
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()


def write_inputs(tmp_path):
    impressions, actions, labels, late, repeats = ground_truth()
    put_all_events(tmp_path, impressions, actions, 25, 20)
    return labels, late, repeats


def join_command(tmp_path, output, impressions=None):
    import sys
    return [sys.executable, "-m", "hybridps.cli", "join",
            "--impressions", impressions or f"stream:{tmp_path / 'imp'}",
            "--actions", f"stream:{tmp_path / 'act'}", "--output", output,
            "--state-dir", str(tmp_path / "state"), "--window-s", str(WINDOW),
            "--idle-timeout-s", "600", "--read-batch", "13", "--output-rows", "7",
            "--flush-s", "0", "--poll-s", "0.01", "--progress-every-s", "0"]


def start_joiner(command, kill_at=None):
    import subprocess
    from tests.mpi_util import REPO
    env = dict(os.environ)
    env.pop("HYBRIDPS_JOIN_KILL_AT", None)
    if kill_at:
        env["HYBRIDPS_JOIN_KILL_AT"] = kill_at
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_joiner(proc, timeout=180):
    import subprocess
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the joiner hung:\n{err[-3000:]}")
    return proc.returncode, out, err


def kill_and_finish(command, kill_points, random_kills, seed):
    """Run the joiner, killed at each named point (HYBRIDPS_JOIN_KILL_AT), then killed by a real
    SIGKILL at random moments, then to its end; the summary of the last run."""
    import json
    import random
    import signal
    import time
    killed = 0
    for point in kill_points:
        code, _, err = wait_joiner(start_joiner(command, point))
        assert code in (-signal.SIGKILL, 0), err[-3000:]
        killed += code == -signal.SIGKILL
    rng = random.Random(seed)
    for _ in range(random_kills):
        proc = start_joiner(command)
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        code, _, err = wait_joiner(proc)
        assert code in (-signal.SIGKILL, 0), err[-3000:]
    code, out, err = wait_joiner(start_joiner(command))
    assert code == 0, err[-3000:]
    assert killed >= len(kill_points) - 1          # the last point may come after the end
    return json.loads(out)


def check_exactly_once(rows, labels, summary, late, repeats):
    emitted = [r["request_id"] for r in rows if int(r["correction"]) == 0]
    assert len(emitted) == len(set(emitted)) == len(labels)      # none lost, none twice
    assert {r["request_id"]: int(r["label"]) for r in rows} == labels
    assert (summary["late_actions"], summary["duplicates"], summary["emitted"]) == \
        (late, repeats, len(labels))


KILL_POINTS = ["before_checkpoint:3", "after_checkpoint:2", "after_output:4", "after_snapshot:1",
               "after_checkpoint:6", "before_checkpoint:1", "after_output:9"]


@pytest.mark.slow
def test_directory_output_holds_every_impression_once_across_sigkills(tmp_path):
    labels, late, repeats = write_inputs(tmp_path)
    command = join_command(tmp_path, f"stream:{tmp_path / 'out'}")
    summary = kill_and_finish(command, KILL_POINTS, random_kills=4, seed=1)
    check_exactly_once(read_output(tmp_path / "out"), labels, summary, late, repeats)
    assert os.path.exists(tmp_path / "out" / "_END")


@pytest.fixture
def redis_port(tmp_path):
    from tests.test_streaming import RedisServer
    server = RedisServer(tmp_path / "redis")
    yield server.port, server.client
    server.stop()


@pytest.mark.slow
def test_redis_output_holds_every_impression_once_across_sigkills(tmp_path, redis_port):
    port, client = redis_port
    labels, late, repeats = write_inputs(tmp_path)
    impressions, _actions, _labels, _late, _repeats = ground_truth()
    for event in impressions:                      # impressions from a Redis stream this time
        client.xadd("impressions", {k: str(v) for k, v in event.items()})
    client.xadd("impressions", {"_end": "1"})
    command = join_command(tmp_path, f"redis://127.0.0.1:{port}/samples",
                           impressions=f"redis://127.0.0.1:{port}/impressions")
    summary = kill_and_finish(command, KILL_POINTS, random_kills=4, seed=2)
    entries = client.xrange("samples")
    assert b"_end" in entries[-1][1]
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries[:-1]]
    check_exactly_once(rows, labels, summary, late, repeats)
    assert all(int(r["pos"]) == int(r["request_id"][1:]) for r in rows)   # the features came along


@pytest.mark.slow
def test_the_bench_kills_phase_finds_every_row_once_with_its_label_over_5_sigkills(tmp_path):
    from hybridps.bench.events import kills
    # a backlog of about 5 s of a quiet joiner's work, kills within 0.8 s of each start: the
    # five runs cannot finish it (on a quiet machine a smaller one was joined before a kill)
    report = kills(str(tmp_path), count=5, events_s=20.0, rate=8000, window_s=2.0, timeout=240,
                   kill_within=(0.3, 0.8))
    assert report["kills"] == 5, report
    assert (report["rows_lost"], report["rows_duplicated"], report["wrong_labels"]) == (0, 0, 0)
    assert report["rows_emitted"] == report["rows_expected"] == 20 * 8000
    assert report["late_actions"] == report["late_actions_expected"]


# ---------------------------------------------------------------------- bench events: the checks it reports
def test_the_bench_counts_lost_duplicated_and_wrong_rows_against_its_ground_truth():
    from hybridps.bench.events import check_join, freshness
    truth = {"a": (1, 2.0), "b": (0, None), "c": (0, 15.0), "d": (1, 1.0)}
    parts = {"part-000000000000.parquet": [("a", 1, 0), ("b", 1, 0)],      # b: wrong label
             "part-000000000001.parquet": [("a", 1, 0), ("c", 1, 1)]}      # a twice; c: only a correction
    assert check_join(truth, parts) == {"rows_emitted": 3, "rows_expected": 4, "rows_lost": 2,  # c, d
                                        "rows_duplicated": 1, "wrong_labels": 1}
    landed = {"a": (100.0, 102.0), "b": (100.5, None)}
    status = [(104.0, 1, {"consumed_through": None}),
              (107.0, 2, {"consumed_through": "part-000000000000.parquet"})]
    # a: positive, from its click landing (107 - 102); b: negative, from its impression landing
    # (107 - 100.5); part 1 was never served
    served = {"part-000000000000.parquet": [("a", 1, 0), ("b", 0, 0)],
              "part-000000000001.parquet": [("c", 0, 0)]}
    assert freshness(truth, landed, served, status) == [(102.0, 5.0, True), (100.5, 6.5, False)]


def test_a_damaged_or_foreign_joiner_state_is_refused_naming_the_file(tmp_path):
    from hybridps.errors import CheckpointError
    from hybridps.join.state import JoinerCheckpoint, state_path
    JoinerCheckpoint(str(tmp_path)).snapshot({"settings": {"window_s": 10.0}, "seq": 3, "window": {},
                                              "watermark": {}, "positions": {}, "outbox": [],
                                              "next_entry_ms": 0})
    assert JoinerCheckpoint(str(tmp_path)).load({"window_s": 10.0})[0]["seq"] == 3
    with pytest.raises(ConfigError, match=r"joiner.json was saved with other join settings \(window_s"):
        JoinerCheckpoint(str(tmp_path)).load({"window_s": 20.0})
    raw = open(state_path(str(tmp_path)), "rb").read()
    open(state_path(str(tmp_path)), "wb").write(raw.replace(b'"seq":3', b'"seq":4'))
    with pytest.raises(CheckpointError, match="joiner.json: checksum mismatch"):
        JoinerCheckpoint(str(tmp_path)).load({"window_s": 10.0})


def test_a_log_record_cut_short_is_dropped_and_a_damaged_one_before_others_is_refused(tmp_path):
    from hybridps.errors import CheckpointError
    from hybridps.join.state import JoinerCheckpoint, log_path
    snapshot = {"settings": {}, "seq": 0, "window": {}, "watermark": {}, "positions": {},
                "outbox": [], "next_entry_ms": 0}
    checkpoint = JoinerCheckpoint(str(tmp_path))
    checkpoint.snapshot(snapshot)
    for seq in (1, 2, 3):
        checkpoint.append({"seq": seq})
    checkpoint.close()
    path = log_path(str(tmp_path), 1)
    whole = open(path, "rb").read()
    assert whole.count(b"\n") == 3
    open(path, "wb").write(whole[:-9])                    # the third record cut short by a kill
    reread = JoinerCheckpoint(str(tmp_path))
    assert [r["seq"] for r in reread.load({})[1]] == [1, 2]
    assert open(path, "rb").read() == whole[:whole.index(b"\n", whole.index(b"\n") + 1) + 1]
    reread.append({"seq": 3})                             # appended after the records kept
    reread.close()
    assert [r["seq"] for r in JoinerCheckpoint(str(tmp_path)).load({})[1]] == [1, 2, 3]
    first = open(path, "rb").read()
    open(path, "wb").write(first.replace(b'"seq":1', b'"seq":7', 1))
    with pytest.raises(CheckpointError, match=r"joiner-log-00000001.jsonl: record 1 has a checksum mismatch"):
        JoinerCheckpoint(str(tmp_path)).load({})


def test_the_log_is_due_for_compaction_once_past_its_snapshot_and_the_floor(tmp_path, monkeypatch):
    from hybridps.join import state
    monkeypatch.setattr(state, "COMPACT_MIN_BYTES", 1000)
    checkpoint = state.JoinerCheckpoint(str(tmp_path))
    checkpoint.snapshot({"x": "a" * 3000})                # a snapshot of about 3,000 bytes
    checkpoint.append({"y": "b" * 2000})
    assert not checkpoint.compaction_due()                # 2,000 < 3,000
    checkpoint.append({"y": "b" * 2000})
    assert checkpoint.compaction_due()                    # 4,000 > 3,000
    checkpoint.snapshot({})
    checkpoint.append({"y": "b" * 500})
    assert not checkpoint.compaction_due()                # 500 < the floor
    checkpoint.append({"y": "b" * 600})
    assert checkpoint.compaction_due()
    checkpoint.close()


def log_records(state_dir):
    """(snapshot, log records) of a joiner's state directory, loaded with the settings it holds."""
    import json
    from hybridps.join.state import JoinerCheckpoint, state_path
    with open(state_path(str(state_dir)), "rb") as fh:
        settings = json.loads(fh.read().partition(b"\n")[2])["settings"]
    return JoinerCheckpoint(str(state_dir)).load(settings)


def test_a_checkpoint_record_holds_what_changed_not_the_pending_impressions(tmp_path):
    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp(f"r{i}", float(i)) for i in range(50)])
    os.makedirs(tmp_path / "act")
    j = joiner(tmp_path, clock, window_s=1000.0, idle_timeout_s=100.0)
    j.poll()
    j.flush()                               # nothing left: the positions and operations recorded
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "r3", "event_time": 60.0, "action": "click", "event_id": "c3"}])
    put_events(tmp_path / "imp", "0002.parquet", [imp("x", 70.0)])
    j.poll()                                # r3 clicked waits (on_close); x joins the 50
    j.flush()
    state, records = log_records(tmp_path / "state")
    assert len(state["window"]["pending"]) == 0           # the snapshot of the start
    assert [op[:3] for op in records[0]["ops"] if op[0] == "i"] == [["i", f"r{i}", float(i)] for i in range(50)]
    assert [op[:4] for op in records[1]["ops"] if op[0] in "ia"] == [["i", "x", 70.0, imp("x", 70.0)],
                                                                    ["a", "r3", 60.0, "click"]]
    assert records[1]["positions"]["impressions"]["done"] == "0002.parquet"
    assert len(j.window.pending) == 51


def test_a_restart_writes_the_batch_recorded_but_not_written_from_its_replayed_operations(tmp_path):
    class Killed(Exception):
        pass

    def killed(*args):
        raise Killed()

    clock = Clock()
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0), imp("B", 1.0), imp("C", 2.0), imp("D", 25.0)])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "B", "event_time": 5.0, "action": "click", "event_id": "b"},
                {"request_id": "C", "event_time": 30.0, "action": "click", "event_id": "c"}])
    j = joiner(tmp_path, clock, output_rows=2)
    j.output.write = killed                 # recorded, then "killed" before its batches are written
    with pytest.raises(Killed):
        j.poll()                            # watermark min(25, 30): A, B and C close, D waits
    j.checkpoint.close()
    assert not read_output(tmp_path / "out")
    again = joiner(tmp_path, clock, output_rows=2)         # replays the log, writes its 2 batches
    assert sorted(os.listdir(tmp_path / "out")) == ["part-000000000000.parquet", "part-000000000001.parquet"]
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [("A", 0), ("B", 1), ("C", 0)]
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    again.run()
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [
        ("A", 0), ("B", 1), ("C", 0), ("D", 0)]


def test_a_log_grown_past_its_snapshot_is_compacted_and_a_restart_goes_on_from_the_new_one(tmp_path, monkeypatch):
    from hybridps.join.state import LOG_PREFIX, JoinerCheckpoint
    monkeypatch.setattr(JoinerCheckpoint, "compaction_due", lambda self: True)
    clock = Clock()
    for i in range(4):
        put_events(tmp_path / "imp", f"{i:04d}.parquet", [imp(f"r{i}", float(i))])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "r1", "event_time": 3.0, "action": "click", "event_id": "c"}])
    j = joiner(tmp_path, clock, read_batch=1, output_rows=1, emit="first_positive",
               idle_timeout_s=100.0)
    j.poll()                                # r0 in, the click buffered
    j.poll()                                # r1 takes it and leaves: a batch, then a snapshot
    j.checkpoint.close()
    assert read_output(tmp_path / "out") == [
        {"request_id": "r1", "event_time": 1.0, "item": 7, "label": 1, "correction": 0}]
    assert j.checkpoint.generation == 2     # 1: the start's
    assert [n for n in os.listdir(tmp_path / "state") if n.startswith(LOG_PREFIX)] == []
    again = joiner(tmp_path, clock, idle_timeout_s=100.0, emit="first_positive")
    assert sorted(again.window.pending) == ["r0"] and "r1" in again.window.closed
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    again.run()
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [
        ("r1", 1), ("r0", 0), ("r2", 0), ("r3", 0)]


def test_event_fields_name_what_is_wrong_and_read_iso_times():
    from hybridps.join.events import BadEvent, EventFields, parse_event_time
    fields = EventFields(action_types=["click", "conversion"])
    assert parse_event_time("1970-01-01T00:01:40Z") == 100.0 == parse_event_time("100")
    assert fields.action_of({"request_id": 7, "event_time": 1, "action": "click"}) == ("7", 1.0, "click", None)
    with pytest.raises(BadEvent, match="field 'action': 'like' is not one of the action types"):
        fields.action_of({"request_id": "a", "event_time": 1, "action": "like"})
    with pytest.raises(BadEvent, match="field 'event_time': 'nan' is not a finite time"):
        fields.impression({"request_id": "a", "event_time": "nan"})


@pytest.mark.slow
def test_sigterm_writes_the_rows_ready_saves_and_exits_0_and_a_restart_goes_on(tmp_path):
    import signal
    import time
    put_events(tmp_path / "imp", "0001.parquet", [imp("A", 0.0), imp("B", 30.0)])
    put_events(tmp_path / "act", "0001.parquet",
               [{"request_id": "A", "event_time": 2.0, "action": "click", "event_id": "a"},
                {"request_id": "Z", "event_time": 30.0, "action": "click", "event_id": "z"}])
    command = join_command(tmp_path, f"stream:{tmp_path / 'out'}") + ["--exit-when-done", "false"]
    proc = start_joiner(command)
    deadline = time.monotonic() + 120
    while not read_output(tmp_path / "out") if os.path.isdir(tmp_path / "out") else True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, out, err = wait_joiner(proc)
    assert code == 0, err[-3000:]
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [("A", 1)]
    for name in ("imp", "act"):
        open(tmp_path / name / "_END", "w").close()
    code, out, err = wait_joiner(start_joiner(command[:-2]))      # B was pending in the state
    assert code == 0, err[-3000:]
    assert [(r["request_id"], r["label"]) for r in read_output(tmp_path / "out")] == [("A", 1), ("B", 0)]


def test_output_columns_hold_every_field_met_in_order_with_none_where_a_row_lacks_it():
    from hybridps.join.outputs import columns_of
    assert columns_of([{"a": 1, "b": 2}, {"b": 4, "a": 3}]) == {"a": [1, 3], "b": [2, 4]}
    assert columns_of([{"a": 1, "b": 2}, {"a": 3, "c": 5}]) == {"a": [1, 3], "b": [2, None], "c": [None, 5]}
    assert columns_of([{"a": 1}, {"a": 2}]) == {"a": [1, 2]}


# ---------------------------------------------------------------------- joined rows -> a multi-task trainer
def funnel_truth():
    """(impressions, actions sorted by event time, {impression index: (click, conversion)}): 240
    impressions half a second apart; every third clicked after (i % 7) * 2 s (12 s: beyond the
    window); every sixth (a clicked one) also converts ((i // 6) % 4) * 1.5 s after its click.
    A label is 1 when its action comes within the window of the impression."""
    impressions, actions, truth = [], [], {}
    for i in range(N_IMPRESSIONS):
        rid, t = f"r{i:04d}", i * 0.5
        impressions.append(imp(rid, t, pos=i, user=i % 37, price=(i % 11) / 10.0))
        click = conversion = 0
        if i % 3 == 0:
            click_delay = (i % 7) * 2.0
            actions.append({"request_id": rid, "event_time": t + click_delay, "action": "click",
                            "event_id": f"c{i}"})
            click = int(click_delay <= WINDOW)
            if i % 6 == 0:
                conversion_delay = click_delay + ((i // 6) % 4) * 1.5
                actions.append({"request_id": rid, "event_time": t + conversion_delay,
                                "action": "conversion", "event_id": f"v{i}"})
                conversion = int(conversion_delay <= WINDOW)
        truth[i] = (click, conversion)
    actions.sort(key=lambda a: a["event_time"])
    return impressions, actions, truth


ESMM_YAML = """\
model: esmm
hidden: [8]
features:
  labels: [{name: click}, {name: conversion}]
  group_by: pos
  dense: [{name: price}]
  sparse:
    - {name: user, table: ids}
    - {name: item, table: ids}
  tables:
    ids: {dim: 4}
"""


@pytest.mark.slow
def test_joined_click_and_conversion_rows_train_esmm_with_the_generators_labels(tmp_path):
    """Impressions, clicks and conversions (only after a click) -> ``hybridps join`` with two
    action types -> ``hybridps train`` (esmm, ``labels: [click, conversion]``) on its stream
    directory until the end marker -> ``hybridps predict`` on the joined rows: every impression
    trained once, each task's label column the generator's (``group_by: pos`` carries the
    impression's index through to predict's output)."""
    import json
    import subprocess
    import sys
    import pyarrow.parquet as pq
    from tests.mpi_util import MPI_ENV, REPO
    impressions, actions, truth = funnel_truth()
    put_all_events(tmp_path, impressions, actions, 40, 30)
    assert sum(c for c, _ in truth.values()) and sum(v for _, v in truth.values())      # both tasks have positives
    assert any(c and not v for c, v in truth.values())                                  # and clicks without conversion

    def run(command, timeout):
        proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, **MPI_ENV), capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = tmp_path / "samples"
    joined = json.loads(run(join_command(tmp_path, f"stream:{out}")
                            + ["--action-types", "click,conversion", "--emit", "on_close", "--late", "count"],
                            timeout=60))
    assert joined["emitted"] == N_IMPRESSIONS and os.path.exists(out / "_END")
    (tmp_path / "esmm.yaml").write_text(ESMM_YAML)
    cli = [sys.executable, "-m", "hybridps.cli"]
    run(cli + ["train", "--config", str(tmp_path / "esmm.yaml"), "--data", f"stream:{out}", "--steps", "0",
               "--batch-size", "24", "--checkpoint-dir", str(tmp_path / "ckpt"), "--no-progress",
               "--metrics-out", str(tmp_path / "train.json")], timeout=120)
    with open(tmp_path / "train.json") as fh:
        trained = json.load(fh)
    stats = trained["data_stats"]
    assert trained["steps"] == N_IMPRESSIONS // 24 and trained["stopped_by"] == "end of stream", trained
    assert (stats["rows"], stats["rows_left"]) == (N_IMPRESSIONS, 0)
    assert stats["positives"] == sum(c for c, _ in truth.values())          # the first task's label: click
    run(cli + ["predict", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(out),
               "--out", str(tmp_path / "scores.parquet")], timeout=120)
    scores = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert sorted(r["pos"] for r in scores) == list(range(N_IMPRESSIONS))
    assert {r["pos"]: (r["click_label"], r["conversion_label"]) for r in scores} == truth
    assert all(0.0 <= r["click"] <= 1.0 and 0.0 <= r["conversion"] <= 1.0 for r in scores)
