"""``hybridps bench events``: raw events -> ``hybridps join`` -> 2-rank training ->
``hybridps serve``, measured: joiner throughput, join correctness, and freshness.

What lives here: a load generator of impressions and delayed clicks (most clicks within
seconds, a share far beyond the window, many impressions never clicked), renamed as Parquet
files into two event directories (the producer contract), and the phases (``--phases``).
*Throughput*: a backlog of events joined by one ``hybridps join`` process, then by two
(partitions 0/2 and 1/2 at once): events per second per process, the median of ``repeats``
runs, from the joiners' own run time and from the wall clock with their start-up. *Memory*:
the bytes 100,000 pending impressions hold (tracemalloc) and the joiner's estimate of them.
*Kills*: the joiner SIGKILLed at random moments over a backlog, then run to its end, its output
checked against the ground truth. *Live*: the generator writes in real time while a joiner
(``emit: first_positive``), ``hybridps train --data stream:DIR --steps 0`` on 2 ranks with timed
deltas, and ``hybridps serve`` run; a follower polls serve's status. A row's freshness is the
time from its action landing (a positive) or its impression landing (a negative) until serving
first reports a stream position covering the output part that holds it (rows that landed once
serving answered: before it, training and serving were starting). Correctness compares
the joiner's output with the generator's ground truth (each impression once, labels right,
late clicks counted). Writes ``realtime.json`` (``events_per_s_per_joiner``, ``rows_emitted``,
``rows_expected``, ``rows_lost``, ``rows_duplicated``, ``wrong_labels``, ``late_actions``,
``freshness_positive_p50_s``, ``freshness_positive_p99_s``, ``freshness_negative_p50_s``,
``window_s``, ..., the load average) and ``realtime.png`` (freshness over time). On a shared
machine the times are indicative. What does not: the joiner (hybridps.join), the plain stream case
(hybridps.bench.realtime).
"""
import heapq
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from hybridps.bench.report import (bench_environment, free_port, http_json, stop_processes, stream_covers,
                                   write_json)
from hybridps.bench.train import OVERSUBSCRIBE_ENV

FEATURES = {"label": "label",
            "dense": [{"name": "price"}, {"name": "age"}],
            "sparse": [{"name": "user", "table": "ids"}, {"name": "item", "table": "ids"},
                       {"name": "site", "table": "ids"}, {"name": "hour", "table": "ids"}],
            "tables": {"ids": {"dim": 8}}}
TARGETS = {"events_per_s_per_joiner": 20_000, "freshness_positive_p50_s": 10.0,
           "freshness_positive_p99_s": 20.0}


class EventGenerator:
    """Impressions at ``rate`` per second and their clicks: with probability ``click_rate`` a
    click after a delay, exponential with mean ``click_mean_s`` or, for ``tail_share`` of the
    clicks, uniform in (window, 2 window) (late). Ground truth: ``truth[rid] = (label, click
    delay or None)``."""

    def __init__(self, window_s, rate, click_rate=0.3, click_mean_s=2.0, tail_share=0.1, seed=0):
        self.window_s, self.rate = window_s, rate
        self.click_rate, self.click_mean_s, self.tail_share = click_rate, click_mean_s, tail_share
        self.rng = np.random.default_rng(seed)
        self.truth, self.scheduled = {}, []      # scheduled: heap of (click time, rid)
        self.count = 0

    def impressions(self, count, t):
        rng, n = self.rng, count
        rids = [f"q{self.count + i:09d}" for i in range(n)]
        self.count += n
        rows = {"request_id": rids, "event_time": np.full(n, t),
                "user": rng.integers(0, 5000, n), "item": rng.integers(0, 2000, n),
                "site": rng.integers(0, 50, n), "hour": rng.integers(0, 24, n),
                "price": rng.random(n).astype(np.float32), "age": rng.random(n).astype(np.float32)}
        clicked = rng.random(n) < self.click_rate
        tail = rng.random(n) < self.tail_share
        delays = np.where(tail, self.window_s * (1 + rng.random(n)), rng.exponential(self.click_mean_s, n))
        for rid, c, d in zip(rids, clicked, delays):
            if c:
                heapq.heappush(self.scheduled, (t + float(d), rid))
                self.truth[rid] = (int(d <= self.window_s), float(d))
            else:
                self.truth[rid] = (0, None)
        return rows

    def clicks_until(self, t):
        out = []
        while self.scheduled and self.scheduled[0][0] <= t:
            when, rid = heapq.heappop(self.scheduled)
            out.append((when, rid))
        return {"request_id": [r for _, r in out], "event_time": [w for w, _ in out],
                "action": ["click"] * len(out), "event_id": [f"c-{r}" for _, r in out]}


def _rename(directory, name, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = os.path.join(directory, "." + name)
    pq.write_table(pa.table(columns), tmp, compression="none")
    os.rename(tmp, os.path.join(directory, name))
    return time.time()


def _join_command(root, out, partition="0/1", emit="on_close", window_s=10.0, idle_timeout_s=2.0):
    return [sys.executable, "-m", "hybridps.cli", "join", "--impressions", f"stream:{root}/imp",
            "--actions", f"stream:{root}/act", "--output", f"stream:{out}", "--state-dir",
            f"{out}-state", "--window-s", str(window_s), "--emit", emit, "--partition", partition,
            "--idle-timeout-s", str(idle_timeout_s), "--output-rows", "4096", "--flush-s", "0.5",
            "--read-batch", "8192", "--progress-every-s", "5"]


def write_backlog(root, events_s, rate, window_s, seed=0):
    """A backlog of ``events_s`` seconds of event time (``rate`` impressions a second, their
    clicks) renamed into ``root``/imp and ``root``/act, both ended: (generator, events)."""
    imp, act = os.path.join(root, "imp"), os.path.join(root, "act")
    os.makedirs(imp), os.makedirs(act)
    gen = EventGenerator(window_s, rate, seed=seed)
    for second in range(int(events_s)):
        _rename(imp, f"{second:06d}.parquet", gen.impressions(rate, float(second)))
        _rename(act, f"{second:06d}.parquet", gen.clicks_until(float(second + 1)))
    _rename(act, "999999.parquet", gen.clicks_until(float("inf")))
    for d in (imp, act):
        open(os.path.join(d, "_END"), "w").close()
    return gen, gen.count + sum(1 for t in gen.truth.values() if t[1] is not None)


def throughput(root, events_s=20.0, rate=5000, window_s=10.0, processes=(1, 2), repeats=3):
    """Events joined per second per process over a backlog, by 1 process and by 2 at once
    (partitions 0/2, 1/2: each reads every event, keeps half), the median of ``repeats`` runs:
    {processes: {"wall": events / seconds from start to exit, "joining": events / the
    joiner's own run seconds (start-up excluded), "cpu": events / the joiner's CPU seconds
    (what a process does with a core of its own, on a machine others load too)}}."""
    _gen, events = write_backlog(root, events_s, rate, window_s)
    runs = {count: {"wall": [], "joining": [], "cpu": []} for count in processes}
    for repeat in range(repeats):
        for count in processes:       # every process reads every event, keeps its partition's
            outs = [os.path.join(root, f"out{count}-{repeat}-{p}") for p in range(count)]
            started = time.monotonic()
            procs = [subprocess.Popen(_join_command(root, out, f"{p}/{count}", window_s=window_s),
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                     for p, out in enumerate(outs)]
            summaries = [json.loads(proc.communicate(timeout=600)[0]) for proc in procs]
            wall = time.monotonic() - started
            runs[count]["wall"].append(events / wall)
            runs[count]["joining"].append(float(np.mean([events / s["run_seconds"] for s in summaries])))
            runs[count]["cpu"].append(float(np.mean([events / s["cpu_seconds"] for s in summaries])))
    result = {count: {k: float(np.median(v)) for k, v in r.items()} for count, r in runs.items()}
    return result, events, runs


def state_memory(root, pending=100_000, rate=5000, window_s=10.0):
    """Bytes held by ``pending`` impressions of the generator waiting in a join window (read
    from Parquet as the joiner reads them), measured with tracemalloc, and the joiner's own
    estimate of them (hybridps.join.process, max_pending_bytes): {measured_mb, estimated_mb}."""
    import tracemalloc
    from hybridps.join.config import make_join_config
    from hybridps.join.process import Joiner
    imp, act = os.path.join(root, "imp"), os.path.join(root, "act")
    os.makedirs(imp), os.makedirs(act)
    gen = EventGenerator(window_s, rate)
    for second in range(pending // rate):
        _rename(imp, f"{second:06d}.parquet", gen.impressions(rate, 0.0))
    config = make_join_config(overrides=dict(
        impressions=f"stream:{imp}", actions=f"stream:{act}", output=f"stream:{root}/out",
        state_dir=f"{root}/state", window_s=1e9, max_pending=pending, read_batch=pending,
        idle_timeout_s=1e9, progress_every_s=0))
    joiner = Joiner(config)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    joiner.poll()
    joiner.ops = []                 # the log record's operations: the checkpoint's, not the state's
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(joiner.window.pending) == pending, len(joiner.window.pending)
    return {"pending": pending, "measured_mb": held / 2**20, "estimated_mb": joiner.pending_bytes() / 2**20}


def kills(root, count=20, events_s=15.0, rate=4000, window_s=10.0, seed=0, timeout=900,
          kill_within=(0.3, 4.0)):
    """The joiner over a backlog, SIGKILLed ``count`` times at random moments (uniform in
    ``kill_within`` seconds after each start), then run to its end: the output against the
    generator's ground truth (check_join) and the kills that landed."""
    import random
    import signal
    gen, events = write_backlog(root, events_s, rate, window_s, seed=seed)
    out = os.path.join(root, "out")
    # small reads and batches: many log records and parts, so kills land between them
    command = _join_command(root, out, window_s=window_s) + ["--read-batch", "1000", "--output-rows",
                                                             "500", "--flush-s", "0.05"]
    rng, landed, runs = random.Random(seed), 0, 0
    deadline = time.monotonic() + timeout
    while landed < count and time.monotonic() < deadline:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs += 1
        try:
            proc.wait(timeout=rng.uniform(*kill_within))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        landed += proc.returncode == -signal.SIGKILL
        if proc.returncode == 0:
            break                   # it finished: the backlog was too small for the kills asked
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    summary = json.loads(proc.stdout)
    report = check_join(gen.truth, _parts(out))
    expected_late = sum(1 for label, delay in gen.truth.values() if delay is not None and not label)
    return {"kills": landed, "joiner_starts": runs + 1, "events": events, **report,
            "late_actions": summary.get("late_actions"), "late_actions_expected": expected_late}


def live(root, config_path, seconds=60.0, rate=200, window_s=10.0, delta_every_seconds=5.0, timeout=600):
    """The live pipeline (module docstring): {truth, landed, parts, status_log, summary}."""
    imp, act, out, deltas = (os.path.join(root, n) for n in ("imp", "act", "stream", "deltas"))
    for d in (imp, act, out, deltas):
        os.makedirs(d)
    env = dict(os.environ, **OVERSUBSCRIBE_ENV)
    logs = {n: open(os.path.join(root, f"{n}.log"), "w") for n in ("join", "train", "serve")}
    joiner = subprocess.Popen(_join_command(root, out, emit="first_positive", window_s=window_s),
                              env=env, stdout=subprocess.PIPE, stderr=logs["join"], text=True)
    train = subprocess.Popen(
        ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, "-m",
         "hybridps.cli", "train", "--config", config_path, "--data", f"stream:{out}", "--steps", "0",
         "--batch-size", "64", "--delta-export-dir", deltas, "--delta-every-seconds",
         str(delta_every_seconds), "--log-every", "50"], env=env, stdout=logs["train"], stderr=subprocess.STDOUT)
    gen = EventGenerator(window_s, rate, seed=1)
    landed = {}          # rid: (impression landing, click landing or None)
    status_log, server, stop = [], None, threading.Event()
    try:
        tick, start = 0.5, time.time()
        while time.time() - start < seconds + 2 * window_s:
            now = time.time()
            if now - start < seconds:
                rows = gen.impressions(int(rate * tick), now)
                at = _rename(imp, f"{now:017.6f}.parquet", rows)
                landed.update((rid, [at, None]) for rid in rows["request_id"])
            clicks = gen.clicks_until(now)
            if clicks["request_id"]:
                at = _rename(act, f"{now:017.6f}.parquet", clicks)
                for rid in clicks["request_id"]:
                    landed[rid][1] = at
            if server is None and any(n.startswith("full-") for n in os.listdir(deltas)):
                server, base = _start_server(deltas, env, logs["serve"])
                threading.Thread(target=_follow, args=(base, status_log, stop), daemon=True).start()
            time.sleep(max(0.0, tick - (time.time() - now)))
        for d in (imp, act):
            open(os.path.join(d, "_END"), "w").close()
        out_text, _ = joiner.communicate(timeout=timeout)
        deadline = time.monotonic() + timeout
        while train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2 * delta_every_seconds)
    finally:
        stop.set()
        stop_processes(server, train, joiner)
    parts = _parts(out)
    return {"truth": gen.truth, "landed": landed, "parts": parts, "status_log": status_log,
            "summary": json.loads(out_text) if out_text.strip() else {}}


def _start_server(deltas, env, log):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hybridps.cli", "serve", "--model-dir", deltas,
                               "--port", str(port), "--name", "events"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}/v1/models/events"


def _follow(base, status_log, stop):
    while not stop.is_set():
        try:
            status = http_json(base, timeout=5)
            status_log.append((time.time(), status.get("version"), status.get("position")))
        except (OSError, ValueError):
            pass
        stop.wait(0.1)


def _parts(out):
    """{part name: [(request id, label, correction)]} of the joiner's output."""
    import pyarrow.parquet as pq
    parts = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("part-"):
            t = pq.read_table(os.path.join(out, name), columns=["request_id", "label", "correction"])
            parts[name] = list(zip(*(t.column(c).to_pylist() for c in ("request_id", "label", "correction"))))
    return parts


def check_join(truth, parts):
    """Rows emitted, lost, duplicated and wrong against the ground truth."""
    seen, wrong, duplicated = {}, 0, 0
    for rows in parts.values():
        for rid, label, correction in rows:
            if correction:
                continue
            duplicated += rid in seen
            seen[rid] = label
            wrong += label != truth[rid][0]
    return {"rows_emitted": len(seen) + duplicated, "rows_expected": len(truth),
            "rows_lost": len(set(truth) - set(seen)), "rows_duplicated": duplicated, "wrong_labels": wrong}


def freshness(truth, landed, parts, status_log):
    """[(landing time, seconds until served, positive)] of every row whose part was served."""
    points = []
    for name, rows in parts.items():
        covered = next((t for t, _, position in status_log if stream_covers(position, name)), None)
        if covered is None:
            continue
        for rid, label, correction in rows:
            if correction or rid not in landed:
                continue
            at = landed[rid][1] if label else landed[rid][0]
            if at is not None:
                points.append((at, covered - at, bool(label)))
    return points


PHASES = ("throughput", "memory", "kills", "live")


def run_events_bench(out_dir, seconds=60.0, rate=200, window_s=10.0, throughput_seconds=20.0,
                     throughput_rate=5000, delta_every_seconds=5.0, phases=("throughput", "memory", "live"),
                     repeats=3, kill_count=20):
    import yaml
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.listdir(out_dir):
        raise SystemExit(f"bench events: {out_dir} is not empty; use a fresh --out directory")
    report = {"window_s": window_s, "targets": TARGETS, "phases": list(phases)}
    if "throughput" in phases:
        rates, backlog, runs = throughput(os.path.join(out_dir, "throughput"), throughput_seconds,
                                          throughput_rate, window_s, repeats=repeats)
        report.update({"events_per_s_per_joiner": rates[1]["joining"],
                       "events_per_s_per_joiner_2_processes": rates[2]["joining"],
                       "events_per_cpu_s_per_joiner": rates[1]["cpu"],
                       "events_per_cpu_s_per_joiner_2_processes": rates[2]["cpu"],
                       "events_per_s_per_joiner_with_startup": rates[1]["wall"],
                       "events_per_s_per_joiner_2_processes_with_startup": rates[2]["wall"],
                       "throughput_events": backlog, "throughput_repeats": repeats,
                       "throughput_runs": {str(k): v for k, v in runs.items()}})
    if "memory" in phases:
        report["state_100k_pending"] = state_memory(os.path.join(out_dir, "memory"))
    if "kills" in phases:
        report["kills"] = kills(os.path.join(out_dir, "kills"), kill_count, window_s=window_s)
    if "live" in phases:
        config_path = os.path.join(out_dir, "events.yaml")
        with open(config_path, "w") as fh:
            yaml.safe_dump({"features": FEATURES, "model": "deepfm", "hidden": [32]}, fh, sort_keys=False)
        run = live(os.path.join(out_dir, "live"), config_path, seconds, rate, window_s, delta_every_seconds)
        # rows that landed once serving answered (before it, training and serving were starting)
        serving_since = run["status_log"][0][0] if run["status_log"] else float("inf")
        points = [p for p in freshness(run["truth"], run["landed"], run["parts"], run["status_log"])
                  if p[0] >= serving_since]
        positive = np.array([f for _, f, p in points if p] or [np.nan])
        negative = np.array([f for _, f, p in points if not p] or [np.nan])
        expected_late = sum(1 for label, delay in run["truth"].values() if delay is not None and not label)
        report.update({**check_join(run["truth"], run["parts"]),
                       "late_actions": run["summary"].get("late_actions"),
                       "late_actions_expected": expected_late,
                       "freshness_positive_p50_s": float(np.nanpercentile(positive, 50)),
                       "freshness_positive_p99_s": float(np.nanpercentile(positive, 99)),
                       "freshness_negative_p50_s": float(np.nanpercentile(negative, 50)),
                       "rows_served": len(points),
                       "settings": {"seconds": seconds, "impressions_per_s": rate, "emit": "first_positive",
                                    "delta_every_seconds": delta_every_seconds, "ranks": 2}})
        _plot(os.path.join(out_dir, "realtime.png"), points, window_s)
    report["machine"] = {**bench_environment(), "load_average": os.getloadavg()}
    write_json(os.path.join(out_dir, "realtime.json"), report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "targets", "throughput_runs")},
                     indent=1))
    return report


def _plot(path, points, window_s):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not points:
        return
    start = min(p[0] for p in points)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for positive, label, marker in ((True, "positive (from its click)", "o"),
                                    (False, "negative (from its impression)", ".")):
        xs = [a - start for a, _, p in points if p == positive]
        ys = [f for _, f, p in points if p == positive]
        ax.plot(xs, ys, marker, markersize=2, label=label, alpha=0.5)
    ax.axhline(window_s, linestyle="--", linewidth=0.8, label="window")
    ax.set_xlabel("event landed (s after the first)")
    ax.set_ylabel("until served (s)")
    ax.set_title("freshness of joined rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for realtime.json/.png and logs")
    parser.add_argument("--phases", default="throughput,memory,live",
                        help=f"comma-separated, of {','.join(PHASES)}")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds the live generator writes impressions")
    parser.add_argument("--rate", type=int, default=200, help="live impressions per second")
    parser.add_argument("--window-s", type=float, default=10.0, help="the join window")
    parser.add_argument("--throughput-seconds", type=float, default=20.0,
                        help="seconds of events in the throughput backlog")
    parser.add_argument("--throughput-rate", type=int, default=5000,
                        help="impressions per second of event time in the backlog")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs (the median is reported)")
    parser.add_argument("--kills", type=int, default=20,
                        help="kills phase: SIGKILLs of the joiner at random moments")
    parser.add_argument("--delta-every-seconds", type=float, default=5.0)


def main(args):
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"bench events: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    run_events_bench(args.out, seconds=args.seconds, rate=args.rate, window_s=args.window_s,
                     throughput_seconds=args.throughput_seconds, throughput_rate=args.throughput_rate,
                     delta_every_seconds=args.delta_every_seconds, phases=phases, repeats=args.repeats,
                     kill_count=args.kills)
    return 0
