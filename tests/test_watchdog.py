"""The watchdog's step and the exchange trace, in one process (no MPI).

The step a hang report shows is the one each thread told the watchdog (``set_step``), not a
local variable found on the stack: a loop whose variable has another name still reports it.
Collectives and spans reach the exchange trace only while it records.
"""
import json
import threading
import time

from hybridps import exchange_trace, watchdog


def _state_of_a_thread_stuck_in(name, thread_step, main_step):
    entered, release = threading.Event(), threading.Event()

    def worker():
        watchdog.set_step(thread_step)
        with watchdog.collective(name):
            entered.set()
            release.wait(10)
        watchdog.clear_step()

    thread = threading.Thread(target=worker, name="hybridps-comm-test")
    watchdog.set_step(main_step)
    thread.start()
    try:
        assert entered.wait(10)
        dog = watchdog._Watchdog(0, 2, abort=None, state_dir="/nonexistent", job_key="k")
        return dog._state(list(watchdog._active.items()), time.monotonic())
    finally:
        release.set()
        thread.join(10)


def test_each_thread_reports_the_step_it_set_whatever_its_variables_are_called():
    state = _state_of_a_thread_stuck_in("alltoallv", thread_step=12, main_step=9)
    [stuck] = [c for c in state["collectives"] if c["name"] == "alltoallv"]
    assert stuck["thread"] == "hybridps-comm-test" and stuck["step"] == 12


def test_a_thread_that_set_no_step_reports_the_main_threads():
    entered, release = threading.Event(), threading.Event()

    def worker():
        with watchdog.collective("barrier"):
            entered.set()
            release.wait(10)

    watchdog.set_step(41)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(10)
        dog = watchdog._Watchdog(0, 2, abort=None, state_dir="/nonexistent", job_key="k")
        state = dog._state(list(watchdog._active.items()), time.monotonic())
    finally:
        release.set()
        thread.join(10)
    assert [c["step"] for c in state["collectives"] if c["name"] == "barrier"] == [41]


def test_collectives_spans_and_marks_reach_the_trace_only_while_it_records(tmp_path, monkeypatch):
    with watchdog.collective("before"):
        pass
    assert exchange_trace.RECORDING[0] is None
    monkeypatch.setenv("HYBRIDPS_EXCHANGE_TRACE", str(tmp_path / "trace"))
    assert exchange_trace.start()
    with watchdog.collective("alltoallv"):
        pass
    with exchange_trace.traced("dense_wait"):
        pass
    exchange_trace.mark("steady_start")
    path = exchange_trace.write(rank=0, steady_steps=3)
    assert exchange_trace.RECORDING[0] is None
    with open(path) as fh:
        trace = json.load(fh)
    assert [e[0] for e in trace["events"]] == ["alltoallv", "dense_wait", "steady_start"]
    assert all(e[2] <= e[3] for e in trace["events"]) and trace["steady_steps"] == 3
