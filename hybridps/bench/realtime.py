"""``hybridps bench realtime``: how fresh serving stays while training follows a stream.

What lives here: the whole pipeline on one machine, measured. A producer renames Parquet files
of the multihot workload into a stream directory at a fixed rate; 2 ranks train on it
(``--data stream:DIR --steps 0 --delta-every-seconds T``) writing deltas and full exports into
one directory; ``hybridps serve`` follows that directory. For each file the freshness is the
time from its rename into the stream until serving reports (``GET /v1/models/NAME``) a version
whose stream position covers the file. While training runs, a bounded load generator on
localhost sends requests of batch 1 (one at a time: latency) and of batch 256 (rows/s).
A second case (``bursty/``) runs the pipeline again on a bursty producer: once training and
serving run on a first file, ``burst_files`` files ``burst_interval_s`` apart, then ``pause_s``
without a file, ``bursts`` times (the end marker after the last pause); it reports the freshness of each burst's last file, which wall-clock
deltas written while the stream is quiet must publish within the pause, not with the next
burst. Writes ``realtime.json``, ``realtime.md`` and ``realtime.png`` (each file's freshness
over time).
What does not: the server (hybridps.serving), the stream source (hybridps.data.stream).
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np

from hybridps.bench.report import (bench_environment, free_port, http_json, markdown_table, stop_processes,
                                   stream_covers, write_json)
from hybridps.bench.train import OVERSUBSCRIBE_ENV, multihot_features

TARGETS = {"freshness_p50_s": 10.0, "freshness_p99_s": 20.0, "serve_p99_ms_batch1": 20.0}


class Producer(threading.Thread):
    """Renames one Parquet file of ``rows`` rows into ``directory`` at each of ``offsets``
    (seconds after it starts), then the end marker at ``end_at``; records each file's rename
    time. With ``ready`` (a threading.Event), one more file comes first, at once, and the
    offsets count from when ``ready`` is set (training and serving have started on it)."""

    def __init__(self, directory, schema, config, offsets, end_at, rows, ready=None):
        super().__init__(daemon=True)
        self.directory, self.offsets, self.end_at, self.rows = directory, list(offsets), end_at, rows
        self.schema, self.config, self.ready = schema, config, ready
        self.renamed = {}                  # file name -> wall time of its rename
        self.error = None

    def tables(self):
        from hybridps.bench.parquet_data import arrow_table, workload_columns
        from hybridps.data.synthetic_schema import make_schema_synthetic
        source = make_schema_synthetic(self.schema, self.config, 0, 1)
        count = len(self.offsets) + (self.ready is not None)
        return [arrow_table(workload_columns(self.schema, source.raw_batch(i, self.rows))) for i in range(count)]

    def run(self):
        try:
            tables = self.tables()                       # made before the clock starts
            if self.ready is not None:
                self._rename(0, tables.pop(0))
                self.ready.wait()
            first = len(self.renamed)
            start = time.monotonic()
            for i, (table, offset) in enumerate(zip(tables, self.offsets)):
                time.sleep(max(0.0, start + offset - time.monotonic()))
                self._rename(first + i, table)
            time.sleep(max(0.0, start + self.end_at - time.monotonic()))
            open(os.path.join(self.directory, "_END"), "w").close()
        except Exception as exc:   # noqa: BLE001 - reported by the runner
            self.error = exc

    def _rename(self, index, table):
        import pyarrow.parquet as pq
        name = file_name(index)
        tmp = os.path.join(self.directory, f".{name}.tmp")
        pq.write_table(table, tmp, compression="none")
        os.rename(tmp, os.path.join(self.directory, name))
        self.renamed[name] = time.time()


def file_name(index):
    return f"events-{index:06d}.parquet"


def steady_schedule(files, interval_s):
    """A file every ``interval_s`` seconds: (rename offsets, end marker offset: with the last)."""
    offsets = [i * interval_s for i in range(files)]
    return offsets, offsets[-1] if offsets else 0.0


def bursty_schedule(bursts, burst_files, burst_interval_s, pause_s):
    """``bursts`` bursts of ``burst_files`` files ``burst_interval_s`` apart, each followed by
    ``pause_s`` seconds without a file: (rename offsets, end marker offset: after the last
    pause, indices of each burst's last file)."""
    offsets, last = [], []
    for b in range(bursts):
        begin = b * ((burst_files - 1) * burst_interval_s + pause_s)
        offsets.extend(begin + j * burst_interval_s for j in range(burst_files))
        last.append(len(offsets) - 1)
    return offsets, (offsets[-1] + pause_s if offsets else 0.0), last


def request_rows(schema, config, count):
    """``count`` rows of raw feature values in the row form of the REST API."""
    from hybridps.bench.parquet_data import workload_columns
    from hybridps.data.synthetic_schema import make_schema_synthetic
    columns = workload_columns(schema, make_schema_synthetic(schema, config, 0, 1).raw_batch(10_000, count))
    instances = []
    for i in range(count):
        row = {}
        for name, value in columns.items():
            if name == schema.label:
                continue
            if isinstance(value, tuple):
                ids, lengths = value
                start = int(np.sum(lengths[:i]))
                row[name] = [int(x) for x in ids[start:start + int(lengths[i])]]
            else:
                row[name] = value[i].item()
        instances.append(row)
    return instances


def run_realtime_bench(out_dir, files=40, rows_per_file=2048, interval_s=1.0, batch_size=512,
                       delta_every_seconds=5.0, full_export_every=10, requests_batch1=400,
                       requests_batch256=60, timeout=900, bursts=3, burst_files=5,
                       burst_interval_s=1.0, pause_s=20.0):
    """Run the pipeline on the steady producer, then (``bursts`` > 0) on the bursty one;
    returns the realtime.json object."""
    import yaml
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    out_dir = os.path.abspath(out_dir)
    cases = {"steady": out_dir, **({"bursty": os.path.join(out_dir, "bursty")} if bursts else {})}
    for case_dir in cases.values():
        for path in (os.path.join(case_dir, "stream"), os.path.join(case_dir, "deltas")):
            os.makedirs(path, exist_ok=True)
            if os.listdir(path):
                raise SystemExit(f"bench realtime: {path} is not empty; use a fresh --out directory")
    features = multihot_features()
    config_path = os.path.join(out_dir, "realtime.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump({"features": features, "model": "deepfm"}, fh, sort_keys=False)
    config = make_config(config_path, {"seed": 0})
    schema = build_schema(config)
    training = dict(config_path=config_path, schema=schema, config=config, rows_per_file=rows_per_file,
                    batch_size=batch_size, delta_every_seconds=delta_every_seconds,
                    full_export_every=full_export_every, timeout=timeout)
    offsets, end_at = steady_schedule(files, interval_s)
    steady = _run_pipeline(out_dir, offsets, end_at, load=(requests_batch1, requests_batch256),
                           **training)
    renamed, latencies, bulk = steady["renamed"], steady["latencies"], steady["bulk"]
    fresh = _freshness(renamed, steady["status_log"])
    values = np.array(list(fresh.values())) if fresh else np.array([np.nan])
    report = {
        "freshness_p50_s": float(np.percentile(values, 50)),
        "freshness_p99_s": float(np.percentile(values, 99)),
        "freshness_max_s": float(np.max(values)),
        "files": files, "files_covered": len(fresh), "freshness_s": fresh,
        "serve_p50_ms_batch1": float(np.percentile(latencies, 50)),
        "serve_p99_ms_batch1": float(np.percentile(latencies, 99)),
        "serve_rows_per_s_batch256": requests_batch256 * 256 / bulk["seconds"],
        "load_while_training": bulk["training_was_running"],
        "targets": TARGETS,
        "settings": {"files": files, "rows_per_file": rows_per_file, "interval_s": interval_s,
                     "batch_size_per_rank": batch_size, "ranks": 2,
                     "delta_every_seconds": delta_every_seconds, "full_export_every": full_export_every,
                     "requests_batch1": requests_batch1, "requests_batch256": requests_batch256,
                     "workload": "multihot", "model": "deepfm"},
        "machine": bench_environment(),
    }
    if bursts:
        report.update(_bursty_case(cases["bursty"], bursts, burst_files, burst_interval_s, pause_s,
                                   training))
    write_json(os.path.join(out_dir, "realtime.json"), report)
    keys = ["freshness_p50_s", "freshness_p99_s", "freshness_max_s", "serve_p50_ms_batch1",
            "serve_p99_ms_batch1", "serve_rows_per_s_batch256"]
    keys += ["burst_last_file_freshness_max_s"] if bursts else []
    rows = [{"metric": k, "value": report[k], "target": f"<= {TARGETS[k]:g}" if k in TARGETS else "",
             "met": ("yes" if report[k] <= TARGETS[k] else "NO") if k in TARGETS else ""}
            for k in keys]
    table = markdown_table(rows, [("metric", "metric", ""), ("value", "value", ",.2f"),
                                  ("target", "target", ""), ("met", "met", "")])
    with open(os.path.join(out_dir, "realtime.md"), "w") as fh:
        fh.write(table + f"\n\n{len(fresh)} of {files} files covered by a served version; "
                 f"load generated while training ran: {bulk['training_was_running']}\n")
        if bursts:
            shown = ", ".join("-" if f is None else f"{f:.1f}" for f in report["burst_last_file_freshness_s"])
            fh.write(f"\nbursty producer ({bursts} bursts of {burst_files} files {burst_interval_s:g} s "
                     f"apart, then {pause_s:g} s without a file): freshness of each burst's last "
                     f"file {shown} s\n")
    _plot(os.path.join(out_dir, "realtime.png"), renamed, fresh)
    print(table)
    return report


def _bursty_case(case_dir, bursts, burst_files, burst_interval_s, pause_s, training):
    """The pipeline on the bursty producer, whose bursts begin once training and serving run
    (on a first file): the report's fields of the freshness of each burst's last file (None
    where serving never covered it)."""
    offsets, end_at, last = bursty_schedule(bursts, burst_files, burst_interval_s, pause_s)
    run = _run_pipeline(case_dir, offsets, end_at, load=None, primed=True, **training)
    fresh = _freshness(run["renamed"], run["status_log"])
    last = [i + 1 for i in last]             # file 0 primes training and serving
    last_fresh = [fresh.get(file_name(i)) for i in last]
    return {"burst_last_file_freshness_s": last_fresh,
            "burst_last_file_freshness_max_s": (max(last_fresh) if None not in last_fresh else None),
            "bursty": {"files": len(run["renamed"]), "files_covered": len(fresh), "freshness_s": fresh,
                       "last_files": [file_name(i) for i in last],
                       "settings": {"bursts": bursts, "burst_files": burst_files,
                                    "burst_interval_s": burst_interval_s, "pause_s": pause_s}}}


def _freshness(renamed, status_log):
    """{file: seconds from its rename until serving first reported a position covering it}."""
    fresh = {}
    for name, at in sorted(renamed.items()):
        covered = next((t for t, _, position in status_log if stream_covers(position, name)), None)
        if covered is not None:
            fresh[name] = covered - at
    return fresh


def _run_pipeline(out_dir, offsets, end_at, *, config_path, schema, config, rows_per_file, batch_size,
                  delta_every_seconds, full_export_every, timeout, load, primed=False):
    """Training on a stream fed at ``offsets``, and ``hybridps serve`` following its exports,
    in ``out_dir``; ``load`` (requests of batch 1, of batch 256) sent while training runs, or
    None; ``primed``: the offsets count from when serving answers (Producer ``ready``).
    Returns {renamed, status_log, latencies, bulk}."""
    stream, deltas = os.path.join(out_dir, "stream"), os.path.join(out_dir, "deltas")
    env = dict(os.environ, **OVERSUBSCRIBE_ENV)
    logs = {name: open(os.path.join(out_dir, f"{name}.log"), "w") for name in ("train", "serve")}
    train = subprocess.Popen(
        ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, "-m",
         "hybridps.cli", "train", "--config", config_path, "--data", f"stream:{stream}",
         "--steps", "0", "--batch-size", str(batch_size), "--delta-export-dir", deltas,
         "--delta-every-seconds", str(delta_every_seconds), "--full-export-every",
         str(full_export_every), "--log-every", "20", "--metrics-out",
         os.path.join(out_dir, "train-metrics.json")],
        env=env, stdout=logs["train"], stderr=subprocess.STDOUT)
    ready = threading.Event() if primed else None
    producer = Producer(stream, schema, config, offsets, end_at, rows_per_file, ready=ready)
    server = None
    status_log, latencies, bulk = [], [], {}
    try:
        producer.start()
        deadline = time.monotonic() + timeout
        while not any(n.startswith("full-") for n in os.listdir(deltas)):   # the first export
            if train.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench realtime: training ended or timed out before its first "
                                 f"export; see {logs['train'].name}")
            time.sleep(0.2)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "hybridps.cli", "serve", "--model-dir", deltas,
                                   "--port", str(port), "--name", "realtime"],
                                  env=env, stdout=logs["serve"], stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}/v1/models/realtime"
        while True:     # the port answers at once; the model is ready when AVAILABLE
            try:
                if http_json(base, timeout=2)["model_version_status"][0]["state"] == "AVAILABLE":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench realtime: the server did not start; see {logs['serve'].name}")
            time.sleep(0.2)
        if ready is not None:
            ready.set()
        stop = threading.Event()

        def follow():
            while not stop.is_set():
                try:
                    status = http_json(base, timeout=5)
                    status_log.append((time.time(), status.get("version"), status.get("position")))
                except OSError:
                    pass
                stop.wait(0.1)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        if load is not None:
            requests_batch1, requests_batch256 = load
            one, many = request_rows(schema, config, 1), request_rows(schema, config, 256)
            time.sleep(min(10.0, end_at / 4))                     # training is running by now
            for _ in range(requests_batch1):                      # one at a time: latency
                started = time.perf_counter()
                http_json(base + ":predict", {"instances": one})
                latencies.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            for _ in range(requests_batch256):
                http_json(base + ":predict", {"instances": many})
            bulk["seconds"] = time.perf_counter() - started
            bulk["training_was_running"] = train.poll() is None
        producer.join(timeout=end_at + 120)
        while train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)                                           # the last delta is followed
        stop.set()
        follower.join()
    finally:
        if ready is not None:
            ready.set()                    # the producer ends too
        stop_processes(server, train)
    if producer.error is not None:
        raise SystemExit(f"bench realtime: the producer failed: {producer.error}")
    return {"renamed": producer.renamed, "status_log": status_log, "latencies": latencies, "bulk": bulk}


def _plot(path, renamed, fresh):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not fresh:
        return
    start = min(renamed.values())
    names = sorted(fresh)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([renamed[n] - start for n in names], [fresh[n] for n in names], "o-", markersize=3)
    ax.axhline(TARGETS["freshness_p50_s"], linestyle="--", linewidth=0.8, label="p50 target")
    ax.set_xlabel("file renamed into the stream (s after the first)")
    ax.set_ylabel("until served (s)")
    ax.set_title("freshness of each stream file")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for realtime.json/.md/.png and logs")
    parser.add_argument("--files", type=int, default=40, help="stream files the producer writes")
    parser.add_argument("--rows-per-file", type=int, default=2048)
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds between files")
    parser.add_argument("--batch-size", type=int, default=512, help="per rank")
    parser.add_argument("--delta-every-seconds", type=float, default=5.0)
    parser.add_argument("--full-export-every", type=int, default=10)
    parser.add_argument("--requests-batch1", type=int, default=400)
    parser.add_argument("--requests-batch256", type=int, default=60)
    parser.add_argument("--bursts", type=int, default=3,
                        help="bursts of the bursty case (0: skip it)")
    parser.add_argument("--burst-files", type=int, default=5, help="files per burst")
    parser.add_argument("--burst-interval-s", type=float, default=1.0,
                        help="seconds between the files of a burst")
    parser.add_argument("--pause-s", type=float, default=20.0,
                        help="seconds without a file after each burst")


def main(args):
    run_realtime_bench(args.out, files=args.files, rows_per_file=args.rows_per_file,
                       interval_s=args.interval_s, batch_size=args.batch_size,
                       delta_every_seconds=args.delta_every_seconds,
                       full_export_every=args.full_export_every,
                       requests_batch1=args.requests_batch1, requests_batch256=args.requests_batch256,
                       bursts=args.bursts, burst_files=args.burst_files,
                       burst_interval_s=args.burst_interval_s, pause_s=args.pause_s)
    return 0
