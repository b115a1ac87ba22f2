"""Exchange traces for the benchmarks: when and for how long every rank was in each collective.

With ``HYBRIDPS_EXCHANGE_TRACE=PREFIX`` in the environment, ``hybridps train`` records the
start and end (time.monotonic) of every collective hybridps.comm runs (the sparse
``alltoall_counts`` / ``alltoallv``, the dense allreduce, the PS worker's pull and push waits),
on every thread, plus the marks of the training loop (``steady_start`` after the warm-up,
``train_end``), and each rank writes ``PREFIX.rank<R>.json`` at the end: its host, the
steady steps and the events. ``hybridps bench scale`` reads them to measure the time in the
exchange (hybridps.bench.scale), which needs one clock for all ranks: true on the
network-namespace test bed (one machine), not across real machines. Off by default: then
nothing is recorded (hybridps.watchdog.collective checks one list slot, :data:`RECORDING`).

What lives here: starting and writing a trace, :class:`traced` spans and :func:`mark` events
of the code that is not a collective. What does not live here: the analysis
(hybridps.bench.scale) and the collectives themselves (hybridps.comm, timed by
hybridps.watchdog.collective).
"""
import collections
import json
import os
import socket
import threading
import time

from hybridps.config import env_exchange_trace

MAX_EVENTS = 1_000_000
# [the deque of (name, thread name, start, end) events] while recording, [None] when off
RECORDING = [None]


class traced:
    """``with traced("dense_wait"): ...`` records a span in the exchange trace (nothing at all
    when tracing is off)."""
    __slots__ = ("name", "_start")

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self._start = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        if RECORDING[0] is not None:
            RECORDING[0].append((self.name, threading.current_thread().name, self._start,
                                 time.monotonic()))
        return False


def mark(name):
    """Record an instant event in the exchange trace (nothing when tracing is off)."""
    if RECORDING[0] is not None:
        now = time.monotonic()
        RECORDING[0].append((name, threading.current_thread().name, now, now))


def start():
    """Start recording when HYBRIDPS_EXCHANGE_TRACE is set; returns whether it is on."""
    if env_exchange_trace() is None:
        return False
    if RECORDING[0] is None:
        RECORDING[0] = collections.deque(maxlen=MAX_EVENTS)
    return True


def write(rank, steady_steps, extra=None):
    """Write this rank's trace to ``PREFIX.rank<R>.json`` and stop recording (no-op when off)."""
    prefix = env_exchange_trace()
    events = RECORDING[0]
    if prefix is None or events is None:
        return None
    RECORDING[0] = None
    path = f"{prefix}.rank{rank}.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"rank": rank, "host": socket.gethostname(), "steady_steps": steady_steps,
                   "events": list(events), **(extra or {})}, fh)
    return path
