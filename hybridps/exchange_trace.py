"""Exchange traces for the benchmarks: when and for how long every rank was in each collective.

With ``HYBRIDPS_EXCHANGE_TRACE=PREFIX`` in the environment, ``hybridps train`` records the
start and end (time.monotonic) of every collective hybridps.comm runs (the sparse
``alltoall_counts`` / ``alltoallv``, the dense allreduce, the PS worker's pull and push waits),
on every thread, plus the marks of the training loop (``steady_start`` after the warm-up,
``train_end``), and each rank writes ``PREFIX.rank<R>.json`` at the end: its host, the
steady steps and the events. ``hybridps bench scale`` reads them to measure the time in the
exchange (hybridps.bench.scale), which needs one clock for all ranks: true on the
network-namespace test bed (one machine), not across real machines. Off by default: then
nothing is recorded (hybridps.watchdog.collective checks one list slot).

What does not live here: the analysis (hybridps.bench.scale) and the collectives themselves.
"""
import collections
import json
import os
import socket

from hybridps import watchdog
from hybridps.config import env_exchange_trace

MAX_EVENTS = 1_000_000


def start():
    """Start recording when HYBRIDPS_EXCHANGE_TRACE is set; returns whether it is on."""
    if env_exchange_trace() is None:
        return False
    if watchdog._trace[0] is None:
        watchdog._trace[0] = collections.deque(maxlen=MAX_EVENTS)
    return True


def write(rank, steady_steps, extra=None):
    """Write this rank's trace to ``PREFIX.rank<R>.json`` and stop recording (no-op when off)."""
    prefix = env_exchange_trace()
    events = watchdog._trace[0]
    if prefix is None or events is None:
        return None
    watchdog._trace[0] = None
    path = f"{prefix}.rank{rank}.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"rank": rank, "host": socket.gethostname(), "steady_steps": steady_steps,
                   "events": list(events), **(extra or {})}, fh)
    return path
