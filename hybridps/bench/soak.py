"""``hybridps bench soak``: a stream job under the supervisor of elastic restarts, with a rank
killed at random every interval, on the network-namespace test bed (root).

What lives here: :class:`ElasticPipeline` (also used by tests/test_elastic_multihost.py): a
test bed of N hosts x 1 rank, a producer renaming Parquet files into a stream directory until
told to stop, ``hybridps launch --hostfile ... --max-restarts ... -- train --data stream:DIR
--steps 0 --checkpoint-every-seconds ... --delta-every-seconds ...`` started on the bed's first
host, ``hybridps serve`` following the exports (on this machine's loopback), and a follower
recording the served version, its stream position and the time; and :func:`run_soak`, which
kills one rank (a random host's training process) every ``kill_every_s`` seconds for
``minutes``, then ends the stream and reports: restarts, seconds lost per restart (failure to
first step after it, the supervisor's history), hangs (a kill after which no step came within
the hang bound), rows produced / consumed / left / lost (lost = produced - consumed - left,
must be 0), rows trained again, RSS per rank after the first restart and at the end, the served
version's freshness over time. Writes ``soak.json``, ``soak.md`` and ``soak.png``.
What does not: the supervisor (hybridps.supervisor), the bed (launch/testbed/netns.py).
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

from hybridps.bench.report import (bench_environment, free_port, http_json, markdown_table, stop_processes,
                                   write_json)
from hybridps.bench.train import OVERSUBSCRIBE_ENV, multihot_features
from hybridps.supervisor import is_training_rank

HANG_S = 300.0                   # a kill not followed by a training step within this is a hang


class StreamProducer(threading.Thread):
    """Renames a Parquet file of ``rows`` rows into ``directory`` every ``interval_s`` seconds
    until :meth:`finish`, which writes the end marker after the file in flight."""

    def __init__(self, directory, schema, config, rows, interval_s):
        super().__init__(daemon=True)
        self.directory, self.schema, self.config = directory, schema, config
        self.rows, self.interval_s = rows, interval_s
        self.files = 0
        self.renamed = {}                  # file name -> unix time of its rename
        self.error = None
        self._finish = threading.Event()

    @property
    def rows_produced(self):
        return self.files * self.rows

    def finish(self):
        self._finish.set()
        self.join(timeout=60)

    def run(self):
        import pyarrow.parquet as pq
        from hybridps.bench.parquet_data import arrow_table, workload_columns
        from hybridps.data.synthetic_schema import make_schema_synthetic
        try:
            source = make_schema_synthetic(self.schema, self.config, 0, 1)
            while not self._finish.is_set():
                table = arrow_table(workload_columns(self.schema, source.raw_batch(self.files, self.rows)))
                name = f"events-{self.files:06d}.parquet"
                tmp = os.path.join(self.directory, f".{name}.tmp")
                pq.write_table(table, tmp, compression="none")
                os.rename(tmp, os.path.join(self.directory, name))
                self.renamed[name] = time.time()
                self.files += 1
                self._finish.wait(self.interval_s)
            open(os.path.join(self.directory, "_END"), "w").close()
        except Exception as exc:   # noqa: BLE001 - reported by the caller
            self.error = exc


class ElasticPipeline:
    """Stream -> supervised training on the bed -> exports -> serve (module docstring).

    Args:
        bed: an up TestBed (launch/testbed/netns.py), 1 slot per host.
        out_dir: where the stream, checkpoints, exports, history and logs go (shared by the
            bed's hosts: one file system).
        probe_timeout: the supervisor's ``--probe-timeout`` (None: its default).
        keepalive_s: idle seconds before Open MPI's daemons probe their connections (the bed's
            ``mpi_env``): a host whose link is down is noticed about 3 s after it.
    """

    def __init__(self, bed, out_dir, *, max_restarts=5, min_ranks=1, regrow_every=0.0,
                 probe_timeout=None, keepalive_s=5, batch_size=64, rows_per_file=256, interval_s=1.0,
                 checkpoint_every_seconds=3.0, delta_every_seconds=2.0):
        self.bed, self.out = bed, os.path.abspath(out_dir)
        self.settings = dict(max_restarts=max_restarts, min_ranks=min_ranks, regrow_every=regrow_every,
                             probe_timeout=probe_timeout, keepalive_s=keepalive_s,
                             batch_size=batch_size, rows_per_file=rows_per_file, interval_s=interval_s,
                             checkpoint_every_seconds=checkpoint_every_seconds,
                             delta_every_seconds=delta_every_seconds, hosts=len(bed.hosts))
        self.stream = os.path.join(self.out, "stream")
        self.exports = os.path.join(self.out, "exports")
        self.checkpoints = os.path.join(self.out, "ckpt")
        self.history = os.path.join(self.out, "history.json")
        self.metrics = os.path.join(self.out, "metrics.json")
        self.log_path = os.path.join(self.out, "supervisor.log")
        self.status_log = []          # (unix time, served version, step, stream position)
        self.status_failures = 0      # status requests not answered once serving started
        self.supervisor = self.server = self.producer = None
        self._stop = threading.Event()
        self._follower = None

    # ------------------------------------------------------------------ start and stop
    def start(self, timeout=300):
        import yaml
        from hybridps.config import make_config
        from hybridps.schema import build_schema
        for path in (self.stream, self.exports, self.checkpoints):
            os.makedirs(path, exist_ok=True)
        config_path = os.path.join(self.out, "soak.yaml")
        with open(config_path, "w") as fh:
            yaml.safe_dump({"features": multihot_features(num_fields=4, num_dense=2, dim=4, multi_hot=1,
                                                          max_len=5),
                            "model": "deepfm", "hidden": [8]}, fh, sort_keys=False)
        config = make_config(config_path, {"seed": 0})
        s = self.settings
        self.producer = StreamProducer(self.stream, build_schema(config), config, s["rows_per_file"],
                                       s["interval_s"])
        self.producer.start()
        launch = [sys.executable, "-m", "hybridps.cli", "launch", "--hostfile", self.bed.hostfile,
                  "--max-restarts", str(s["max_restarts"]), "--min-ranks", str(s["min_ranks"]),
                  "--regrow-every", str(s["regrow_every"]), "--history", self.history,
                  *(["--probe-timeout", str(s["probe_timeout"])] if s["probe_timeout"] else []), "--",
                  "train", "--config", config_path, "--data", f"stream:{self.stream}", "--steps", "0",
                  "--batch-size", str(s["batch_size"]), "--checkpoint-dir", self.checkpoints,
                  "--checkpoint-every-seconds", str(s["checkpoint_every_seconds"]),
                  "--keep-checkpoints", "2", "--delta-export-dir", self.exports,
                  "--delta-every-seconds", str(s["delta_every_seconds"]), "--log-every", "1",
                  "--stream-poll-s", "0.1", "--metrics-out", self.metrics]
        env = dict(os.environ, **OVERSUBSCRIBE_ENV, **self.bed.mpi_env(keepalive_s=s["keepalive_s"]))
        self._log = open(self.log_path, "w")
        self.supervisor = subprocess.Popen(self.bed.command(self.bed.hosts[0], launch), env=env,
                                           stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not any(n.startswith("full-") for n in os.listdir(self.exports)):
            if self.supervisor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training ended or timed out before its first export; see "
                                   f"{self.log_path}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "hybridps.cli", "serve", "--model-dir",
                                        self.exports, "--port", str(port), "--name", "soak"],
                                       env=dict(os.environ, **OVERSUBSCRIBE_ENV),
                                       stdout=open(os.path.join(self.out, "serve.log"), "w"),
                                       stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/v1/models/soak"
        while True:
            try:
                if http_json(self.url, timeout=2)["version"] is not None:
                    break
            except OSError:
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see serve.log")
            time.sleep(0.2)
        self._follower = threading.Thread(target=self._follow, daemon=True)
        self._follower.start()
        return self

    def _follow(self):
        while not self._stop.is_set():
            try:
                status = http_json(self.url, timeout=5)
                self.status_log.append((time.time(), status.get("version"), status.get("step"),
                                        status.get("position")))
            except OSError:
                self.status_failures += 1
            self._stop.wait(0.5)

    def end_stream_and_wait(self, timeout=600):
        """Write the stream's end marker; the job trains what is left and the supervisor ends.
        Returns the supervisor's exit code (None when it did not end within ``timeout``)."""
        self.producer.finish()
        try:
            return self.supervisor.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        """Stop the follower, the server and the supervisor (whatever still runs)."""
        self._stop.set()
        stop_processes(self.server, self.supervisor)
        if self._follower is not None:
            self._follower.join(timeout=10)
        if self.producer is not None and self.producer.is_alive():
            self.producer.finish()

    # ------------------------------------------------------------------ looking at it
    def log(self):
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def restarts(self):
        try:
            with open(self.history) as fh:
                return json.load(fh)["restarts"]
        except (OSError, ValueError, KeyError):
            return []

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.supervisor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not seen (supervisor exit {self.supervisor.poll()}):\n"
                                   f"{self.log()[-4000:]}")
            time.sleep(0.5)

    def checkpoints_written(self):
        """Names of the checkpoints in the checkpoint directory now."""
        return sorted(n for n in os.listdir(self.checkpoints) if n.startswith("ckpt-"))

    def steps_trained(self):
        """Rank 0's ``step N`` lines in the supervisor's log, in order."""
        return [int(line.split()[1]) for line in self.log().splitlines()
                if line.startswith("step ") and line.split()[1].isdigit()]

    def training_pids(self, host):
        """PIDs of the training processes (ranks) on ``host``."""
        found = []
        for pid in self.bed.pids(host):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = [a.decode(errors="replace") for a in fh.read().split(b"\0")]
            except OSError:
                continue
            if is_training_rank(argv):
                found.append(pid)
        return found

    def rss_mb(self):
        """{host: RSS in MB of its training process} (hosts with one running)."""
        sizes = {}
        for host in self.bed.hosts:
            for pid in self.training_pids(host):
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        for line in fh:
                            if line.startswith("VmRSS:"):
                                sizes[host] = int(line.split()[1]) / 1024.0
                except OSError:
                    pass
        return sizes

    def accounting(self):
        """Rows produced, consumed, left and lost from the last run's summary (its stream
        position counts every row consumed since the stream began: it travels with every
        checkpoint)."""
        with open(self.metrics) as fh:
            stats = json.load(fh)["data_stats"]
        produced = self.producer.rows_produced
        consumed, left = int(stats["rows_consumed"]), int(stats["rows_left"])
        return {"rows_produced": produced, "rows_consumed": consumed, "rows_left": left,
                "rows_lost": produced - consumed - left}


def run_soak(out_dir, minutes=15.0, kill_every_s=60.0, hosts=2, seed=0, max_restarts=100):
    """The soak (module docstring); returns the soak.json object."""
    from hybridps.bench.scale import load_testbed
    netns = load_testbed()
    reason = netns.unavailable_reason()
    if reason:
        raise SystemExit(f"bench soak needs the network-namespace test bed: {reason}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.listdir(out_dir):
        raise SystemExit(f"bench soak: {out_dir} is not empty; use a fresh --out directory")
    rng = random.Random(seed)
    kills, hangs, rss_first, rss_end = [], 0, None, None
    bed = netns.TestBed(hosts=hosts, slots=1).up()
    pipeline = ElasticPipeline(bed, out_dir, max_restarts=max_restarts)
    try:
        pipeline.start()
        started = time.monotonic()
        end = started + minutes * 60.0
        next_kill = started + kill_every_s
        while next_kill <= end:      # every kill_every_s, once the previous restart trains
            time.sleep(max(0.0, next_kill - time.monotonic()))
            next_kill += kill_every_s
            host = rng.choice(bed.hosts)
            pids = pipeline.training_pids(host)
            steps_before = len(pipeline.steps_trained())
            for pid in pids:
                os.kill(pid, 9)
            kills.append({"at_s": time.monotonic() - started, "host": host, "pids": pids})
            try:        # the next step after the kill, or a hang
                pipeline.wait_for(lambda: len(pipeline.restarts()) >= len(kills)
                                  and len(pipeline.steps_trained()) > steps_before + 1, HANG_S, "restart")
            except RuntimeError:
                hangs += 1
                break
            if rss_first is None:
                time.sleep(2.0)
                rss_first = pipeline.rss_mb()
        rss_end = pipeline.rss_mb()
        code = pipeline.end_stream_and_wait()
        hangs += code is None
        restarts = pipeline.restarts()
        accounting = pipeline.accounting() if code == 0 else {}
    finally:
        pipeline.close()
        bed.down()
    seconds = [r["seconds_lost"] for r in restarts if r.get("seconds_lost") is not None]
    report = {"minutes": minutes, "kill_every_s": kill_every_s, "hosts": hosts, "kills": len(kills),
              "kill_log": kills, "restarts": len(restarts), "hangs": hangs,
              "supervisor_exit_code": code, **accounting,
              "rows_trained_again": sum(r.get("rows_trained_again") or 0 for r in restarts),
              "restart_seconds": seconds,
              "restart_seconds_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
              "rss_mb_after_first_restart": _per_rank(rss_first, bed.hosts),
              "rss_mb_end": _per_rank(rss_end, bed.hosts),
              "serve_status_failures": pipeline.status_failures,
              "served_versions": [min(v for _, v, _, _ in pipeline.status_log if v is not None),
                                  max(v for _, v, _, _ in pipeline.status_log if v is not None)]
              if pipeline.status_log else None,
              "freshness": _freshness(pipeline.status_log, pipeline.producer.renamed),
              "history": restarts, "settings": pipeline.settings, "machine": bench_environment()}
    write_json(os.path.join(out_dir, "soak.json"), report)
    rows = [{"metric": k, "value": report.get(k)} for k in
            ("minutes", "kills", "restarts", "hangs", "rows_produced", "rows_consumed", "rows_left",
             "rows_lost", "rows_trained_again", "restart_seconds_median")]
    table = markdown_table(rows, [("metric", "metric", ""), ("value", "value", "")])
    with open(os.path.join(out_dir, "soak.md"), "w") as fh:
        fh.write(table + "\n\nseconds lost per restart: "
                 + ", ".join(f"{s:.1f}" for s in seconds) + "\n")
    _plot(os.path.join(out_dir, "soak.png"), pipeline.status_log, report["freshness"], kills, started)
    print(table)
    return report


def _per_rank(sizes, hosts):
    return None if sizes is None else [sizes.get(h) for h in hosts]


def _freshness(status_log, renamed):
    """[(unix time, served version, seconds since the newest stream file the served version
    covers was renamed into the stream)] (None before a version covers a whole file)."""
    series = []
    for t, version, _step, position in status_log:
        done = position.get("consumed_through") if isinstance(position, dict) else None
        series.append((t, version, t - renamed[done] if done in renamed else None))
    return series


def _plot(path, status_log, freshness, kills, started):
    """The served version and its freshness over time, the kills marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not status_log:
        return
    t0 = status_log[0][0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot([t - t0 for t, *_ in status_log], [v or 0 for _, v, _, _ in status_log], "-", linewidth=1)
    bottom.plot([t - t0 for t, _, f in freshness if f is not None],
                [f for _, _, f in freshness if f is not None], "-", linewidth=1)
    offset = t0 - (time.time() - (time.monotonic() - started))
    for axis in (top, bottom):
        for kill in kills:
            axis.axvline(kill["at_s"] - offset, color="red", linewidth=0.8, linestyle="--")
    top.set_ylabel("served version")
    top.set_title("serving through restarts (red: a rank killed)")
    bottom.set_ylabel("freshness (s)")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for soak.json/.md/.png and logs")
    parser.add_argument("--minutes", type=float, default=15.0, help="how long ranks are killed")
    parser.add_argument("--kill-every-s", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--hosts", type=int, default=2, help="test-bed hosts (1 rank each)")
    parser.add_argument("--seed", type=int, default=0, help="which rank is killed when")


def main(args):
    report = run_soak(args.out, minutes=args.minutes, kill_every_s=args.kill_every_s,
                      hosts=args.hosts, seed=args.seed)
    return 0 if report.get("rows_lost") == 0 and not report["hangs"] else 1
