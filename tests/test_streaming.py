"""Streaming training under real MPI: a directory stream and a Redis stream on 2 ranks, each
row trained exactly once across a kill, a graceful SIGTERM stop and resumes.

Each run is tests/parallel/stream_scenarios.py under mpirun (it logs the row ids of every batch
each rank draws); a producer thread in the test writes the data while the job runs, the way a
real producer does (a temporary name, then a rename; Redis: XADD). The expected rows come from
the producer's own list, in stream order: global step ``g`` holds rows ``[16 g, 16 g + 16)``,
rank 0 the first 8, rank 1 the next 8.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hybridps import testing_hooks
from hybridps.errors import DataError
from tests.mpi_util import MPI_ENV, REPO, mpirun_available
from tests.schema_data import FEATURES, rows, write_csv, write_parquet

BATCH = 8                    # per rank; 16 rows per global step
STREAM_FEATURES = dict(FEATURES, group_by="row")
SCRIPT = os.path.join(REPO, "tests", "parallel", "stream_scenarios.py")


def start_job(out, name, overrides, ranks=2, env=None):
    """``env``: more environment variables (a testing aid of hybridps.testing_hooks)."""
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    command = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", sys.executable,
               SCRIPT, str(out), name, json.dumps(overrides)]
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **MPI_ENV, **(env or {})), stdout=log,
                            stderr=subprocess.STDOUT)


def finish(out, name, proc, timeout=180):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{name} hung:\n" + (out / f"{name}.log").read_text()[-4000:])
    return proc.returncode, (out / f"{name}.log").read_text()


def drawn(out, name, rank, below=None):
    """{step: row ids} this rank drew in run ``name`` (steps < ``below`` only)."""
    path = out / name / f"rows-{rank}.jsonl"
    steps = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        if below is None or entry["step"] < below:
            steps[entry["step"]] = entry["rows"]
    return steps


def _wait_until(done, out, name, what, timeout):
    """Poll ``done()`` until it holds; after ``timeout`` seconds fail with run ``name``'s log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    pytest.fail(f"{name}: {what}:\n" + (out / f"{name}.log").read_text()[-4000:])


def wait_for_steps(out, name, count, timeout=120):
    _wait_until(lambda: len(drawn(out, name, 0)) >= count and len(drawn(out, name, 1)) >= count,
                out, name, f"did not reach {count} steps", timeout)


def wait_for_log_line(out, name, start, timeout=120):
    """Until a line of run ``name``'s log starts with ``start`` (rank 0's ``step N`` line is
    written once step N - 1 is trained)."""
    _wait_until(lambda: any(line.startswith(start) for line in (out / f"{name}.log").read_text().splitlines()),
                out, name, f"no line starting {start!r}", timeout)


def metrics(out, name):
    with open(out / name / "metrics.json") as fh:
        return json.load(fh)


def assert_each_row_once(out, runs, stream_rows):
    """Rows trained by the runs (each: name, steps counted up to (exclusive), None: all) are the
    stream's first rows in order, every row once, split 8/8 per global step."""
    trained = {}
    for name, below in runs:
        for rank in (0, 1):
            for step, ids in drawn(out, name, rank, below).items():
                trained[(step, rank)] = ids
    steps = sorted({step for step, _ in trained})
    assert steps == list(range(len(steps))), steps
    for step in steps:
        want = stream_rows[16 * step:16 * step + 16]
        assert trained[(step, 0)] + trained[(step, 1)] == want, step
    return len(steps)


def write_config(out, **extra):
    import yaml
    with open(out / "config.yaml", "w") as fh:
        yaml.safe_dump(dict({"model": "wide_deep", "hidden": [8], "seed": 3, "warmup_steps": 1,
                             "features": STREAM_FEATURES}, **extra), fh, sort_keys=False)


# ---------------------------------------------------------------------- a directory stream
FILES, ROWS_PER_FILE = 8, 37            # 296 rows: 18 global steps of 16, 8 rows left


class DirectoryProducer(threading.Thread):
    """Writes ``files`` Parquet files into ``directory`` (a dot-name, then a rename), one every
    ``interval`` seconds after ``first_delay``, and the end marker after the last if ``end``."""

    def __init__(self, directory, files, interval, first_delay=0.0, end=True):
        super().__init__(daemon=True)
        self.directory, self.files, self.interval = directory, files, interval
        self.first_delay, self.end = first_delay, end

    def run(self):
        time.sleep(self.first_delay)
        for i in self.files:
            name = f"events-{i:05d}.parquet"
            write_parquet(self.directory / f".{name}.tmp", rows(ROWS_PER_FILE, seed=i), ROWS_PER_FILE)
            os.rename(self.directory / f".{name}.tmp", self.directory / name)
            time.sleep(self.interval)
        if self.end:
            open(self.directory / "_END", "w").close()


def directory_rows(files):
    return [int(r) for i in files for r in rows(ROWS_PER_FILE, seed=i)["row"]]


@pytest.fixture(scope="module")
def directory_runs(tmp_path_factory):
    """kill (an injected failure after the checkpoint of step 6, while files still arrive),
    resume + SIGTERM to rank 1 (graceful stop, exit 0), resume to the end marker (ASP)."""
    out = tmp_path_factory.mktemp("dirstream")
    write_config(out)
    stream = out / "stream"
    stream.mkdir()
    common = {"data": f"stream:{stream}", "steps": 0, "batch_size": BATCH,
              "checkpoint_dir": str(out / "ckpt"), "stream_poll_s": 0.05}
    # the first file comes after more than the watchdog timeout: waiting for data is not a hang
    producer = DirectoryProducer(stream, range(0, 4), interval=0.3, first_delay=5.0, end=False)
    producer.start()
    job = start_job(out, "killed", dict(common, checkpoint_every=3, watchdog_timeout=3.0),
                    env=testing_hooks.environment(fail_at_step=7, fail_rank=1))
    killed = finish(out, "killed", job)
    producer.join()
    job = start_job(out, "stopped", dict(common, resume=True, checkpoint_every=100))
    late = DirectoryProducer(stream, range(4, 6), interval=0.5, end=False)
    late.start()
    wait_for_steps(out, "stopped", 3)
    pid = int((out / "stopped" / "pid-1").read_text())
    os.kill(pid, signal.SIGTERM)
    stopped = finish(out, "stopped", job)
    late.join()
    job = start_job(out, "ended", dict(common, resume=True, sync="asp"))
    DirectoryProducer(stream, range(6, FILES), interval=0.2, end=True).run()
    ended = finish(out, "ended", job)
    return out, killed, stopped, ended


@pytest.mark.mpi
def test_a_killed_directory_stream_job_resumes_at_the_next_unconsumed_row(directory_runs):
    out, killed, stopped, ended = directory_runs
    assert killed[0] != 0 and "injected failure at step 7" in killed[1]
    assert "got SIGTERM" in stopped[1] and stopped[0] == 0, stopped[1][-3000:]
    assert ended[0] == 0, ended[1][-3000:]
    first_stop = metrics(out, "stopped")
    assert first_stop["first_step"] == 6 and first_stop["stopped_by"] == "signal"
    last = metrics(out, "ended")
    assert last["first_step"] == first_stop["steps"] and last["stopped_by"] == "end of stream"
    # killed after its checkpoint of step 6: steps >= 6 of that run are trained again after it
    steps = assert_each_row_once(out, [("killed", 6), ("stopped", None), ("ended", None)],
                                 directory_rows(range(FILES)))
    assert steps == 18 == last["steps"]
    assert last["data_stats"]["rows_left"] == FILES * ROWS_PER_FILE - 16 * 18
    assert last["data_stats"]["rows_consumed"] == 16 * 18


@pytest.mark.mpi
def test_waiting_for_stream_data_longer_than_the_watchdog_timeout_is_not_a_hang(directory_runs):
    out, killed, _, _ = directory_runs
    # the injected failure, not the watchdog, ended the first run (its wait was 5 s > 3 s)
    assert "watchdog: stuck" not in killed[1]
    assert len(drawn(out, "killed", 0)) >= 7


@pytest.mark.mpi
def test_sigterm_leaves_a_resumable_checkpoint_of_the_step_it_stopped_at(directory_runs):
    out, _, _, _ = directory_runs
    from hybridps.checkpoint.reader import load_manifest
    stopped = metrics(out, "stopped")
    manifest = load_manifest(str(out / "ckpt" / f"ckpt-{stopped['steps']:010d}"))
    assert manifest["step"] == stopped["steps"]
    states = [s for s in manifest["data_state"] if s]
    assert states and all(s["rows_consumed"] == 16 * stopped["steps"] for s in states)


# ---------------------------------------------------------------------- a Redis stream
REDIS_ROWS = 16 * 14 + 5                # 14 global steps, 5 entries left before the end entry


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (make setup installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port, client
    proc.terminate()
    proc.wait(timeout=10)


def redis_entries():
    columns = rows(REDIS_ROWS, seed=4)
    for i in range(REDIS_ROWS):
        yield {"row": str(columns["row"][i]), "label": str(columns["label"][i]),
               "x": repr(float(columns["x"][i])), "y": repr(float(columns["y"][i])),
               "user": columns["user"][i], "item": str(columns["item"][i]),
               "tags": "|".join(columns["tags"][i]), "seen": "|".join(map(str, columns["seen"][i]))}


def produce_redis(client, key, entries, interval):
    for fields in entries:
        client.xadd(key, fields)
        time.sleep(interval)


@pytest.mark.mpi
def test_a_redis_stream_trains_each_entry_once_across_a_kill_a_sigterm_to_mpirun_and_resumes(
        tmp_path, redis_server):
    from hybridps.data.hashing import text_ids
    port, client = redis_server
    out = tmp_path
    write_config(out)
    url = f"redis://127.0.0.1:{port}/events"
    common = {"data": url, "steps": 0, "batch_size": BATCH, "checkpoint_dir": str(out / "ckpt"),
              "stream_poll_s": 0.05}
    entries = list(redis_entries())
    producer = threading.Thread(target=produce_redis, args=(client, "events", entries[:120], 0.01))
    producer.start()
    killed = finish(out, "killed", start_job(out, "killed", dict(common, checkpoint_every=2),
                                             env=testing_hooks.environment(fail_at_step=5, fail_rank=0)))
    producer.join()
    assert killed[0] != 0 and "injected failure at step 5" in killed[1]
    job = start_job(out, "stopped", dict(common, resume=True))
    wait_for_log_line(out, "stopped", "step 7 ")    # 120 entries = 7 steps; it waits for more
    os.kill(job.pid, signal.SIGTERM)           # mpirun passes SIGTERM on to every rank
    stopped = finish(out, "stopped", job)
    assert stopped[1].count("got SIGTERM") == 2, stopped[1][-3000:]
    stop = metrics(out, "stopped")
    assert stop["stopped_by"] == "signal" and stop["first_step"] == 4 and stop["steps"] == 7
    job = start_job(out, "ended", dict(common, resume=True, sync="asp"))
    produce_redis(client, "events", entries[120:], 0.002)
    client.xadd("events", {"_end": "1"})
    ended = finish(out, "ended", job)
    assert ended[0] == 0, ended[1][-3000:]
    last = metrics(out, "ended")
    assert last["first_step"] == 7 and last["stopped_by"] == "end of stream"
    # the row column arrives as text: its group ids are the text ids of the row numbers
    stream_rows = [int(i) for i in text_ids(np.array([e["row"] for e in entries], dtype=object))]
    steps = assert_each_row_once(out, [("killed", 4), ("stopped", None), ("ended", None)], stream_rows)
    assert steps == 14 == last["steps"]
    assert last["data_stats"]["rows_left"] == 5


def test_stream_specs_that_cannot_work_are_refused_with_what_to_do(tmp_path):
    from hybridps.config import make_config
    from hybridps.data import open_data
    from hybridps.errors import ConfigError, DataError
    from hybridps.schema import build_schema
    config = make_config(overrides={"data": f"stream:{tmp_path / 'missing'}", "features": STREAM_FEATURES})
    schema = build_schema(config)
    with pytest.raises(DataError, match="does not exist.*producer"):
        open_data(config, schema, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="features:' schema"):
        preset = make_config(overrides={"data": f"stream:{tmp_path}"})
        open_data(preset, build_schema(preset), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="redis://HOST:PORT/STREAM"):
        open_data(make_config(overrides={"data": "redis://127.0.0.1:1", "features": STREAM_FEATURES}),
                  schema, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="collective mode"):
        make_config(overrides={"data": f"stream:{tmp_path}", "mode": "ps", "features": STREAM_FEATURES})
    with pytest.raises(ConfigError, match="delta_export_dir"):
        make_config(overrides={"delta_every_seconds": 5})


# ---------------------------------------------------------------------- one process, no MPI
class OneRank:
    """A StepAgreement stand-in for one process: go when ready, end when ended, raise a source's
    failure, else give up (the test has written everything it will)."""

    notes = ()

    def __init__(self):
        self.waits = 0

    def agree(self, step, ready=True, ended=False, failure=None, notes=()):
        if failure:
            raise DataError(failure)
        self.notes = tuple(notes)
        return "go" if ready else ("end" if ended else "wait")

    def wait(self):
        self.waits += 1
        if self.waits > 3:
            raise TimeoutError("no more data")


def group_ids(batches):
    return [int(g) for b in batches for g in b.groups]


def test_a_directory_stream_reads_files_in_name_order_and_skips_what_it_must(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hybridps.config import make_config
    from hybridps.data.stream import DirectoryStream
    from hybridps.errors import DataError
    from hybridps.schema import build_schema
    schema = build_schema(make_config(overrides={"features": STREAM_FEATURES}))
    write_parquet(tmp_path / "b-0002.parquet", rows(5, seed=2), 5)
    write_parquet(tmp_path / "b-0001.parquet", rows(6, seed=1), 6)
    write_parquet(tmp_path / ".b-0003.parquet.tmp", rows(4, seed=3), 4)      # not renamed yet
    pq.write_table(pa.table({k: v[:0] for k, v in rows(1, seed=9).items()}), tmp_path / "b-0000.parquet")
    stream = DirectoryStream(str(tmp_path), schema)
    control = OneRank()
    with pytest.raises(TimeoutError):
        got = []
        for batch in stream.iter_batches(4, None, control=control):
            got.append(batch)
    assert group_ids(got) == directory_like([1, 2], [6, 5])[:8]      # empty file, then name order
    state = stream.state()
    assert state["consumed_through"] == "b-0001.parquet" and state["file"] == "b-0002.parquet"
    assert state["row"] == 2
    # a late file (named before one read) is ignored and counted (after a resume, names up to
    # the position count as consumed); a damaged one names itself
    write_parquet(tmp_path / "a-late.parquet", rows(3, seed=7), 3)
    with pytest.raises(TimeoutError):
        list(stream.iter_batches(4, None, control=OneRank()))
    assert stream.stats()["late_files"] == 1 and "a-late.parquet" in stream.stats()["bad_line_examples"][0]
    (tmp_path / "b-0004.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="b-0004.parquet"):
        list(stream.iter_batches(4, None, control=OneRank()))
    skipping = DirectoryStream(str(tmp_path), schema, on_bad_line="skip")
    skipping.restore(state)
    os.rename(tmp_path / ".b-0003.parquet.tmp", tmp_path / "b-0003.parquet")
    write_csv(tmp_path / "b-0005.csv", rows(3, seed=5))                 # CSV through the schema
    open(tmp_path / "_END", "w").close()
    rest = list(skipping.iter_batches(4, None, control=OneRank()))
    assert group_ids(rest) == directory_like([2, 3, 5], [5, 4, 3])[2:10]     # 2 rows left at the end
    stats = skipping.stats()
    assert stats["late_files"] == 0 and stats["bad_files"] == 1 and skipping.rows_left == 2
    # a position in a file that is gone cannot be resumed from
    os.remove(tmp_path / "b-0002.parquet")
    with pytest.raises(DataError, match="no longer there"):
        DirectoryStream(str(tmp_path), schema).restore(state)


def directory_like(seeds, counts):
    return [int(r) for seed, n in zip(seeds, counts) for r in rows(n, seed=seed)["row"]]


@pytest.mark.mpi
def test_steps_0_on_synthetic_data_trains_until_sigterm_then_checkpoints_and_exits_0(tmp_path):
    """One process, no stream: --steps 0 runs until SIGTERM, which ends it after a whole step
    with a checkpoint of that step and exit code 0."""
    command = [sys.executable, "-m", "hybridps.cli", "train", "--steps", "0", "--batch-size", "64",
               "--hidden", "8", "--log-every", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--metrics-out", str(tmp_path / "m.json")]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **MPI_ENV), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "step 5 " not in (tmp_path / "log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    with open(tmp_path / "m.json") as fh:
        summary = json.load(fh)
    assert summary["stopped_by"] == "signal" and summary["steps"] >= 5
    assert len(summary["loss_trajectory"]) == summary["steps"]
    from hybridps.checkpoint.reader import load_manifest
    assert load_manifest(str(tmp_path / "ckpt" / f"ckpt-{summary['steps']:010d}"))["step"] == summary["steps"]


# ---------------------------------------------------------------------- files that change, bad lines
def stream_schema():
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    return build_schema(make_config(overrides={"features": STREAM_FEATURES}))


def csv_text(columns, header=True):
    """CSV lines of ``columns`` (the header line first if ``header``)."""
    names = list(columns)
    lines = [",".join(names)] if header else []
    for i in range(len(columns["row"])):
        lines.append(",".join("|".join(map(str, v)) if isinstance(v, list) else str(v)
                              for v in (columns[name][i] for name in names)))
    return "\n".join(lines) + "\n"


def part(columns, start, stop):
    return {name: values[start:stop] for name, values in columns.items()}


def changing_stream(tmp_path, on_bad_line):
    """a-0001.csv (6 rows) and the first 5 of b-0002.csv's 9 rows are read and 8 rows trained
    (batches of 4); then b-0002.csv gets its last 4 rows in place (no rename)."""
    from hybridps.data.stream import DirectoryStream
    a, b = rows(6, seed=11), rows(9, seed=12)
    (tmp_path / "a-0001.csv").write_text(csv_text(a))
    (tmp_path / "b-0002.csv").write_text(csv_text(part(b, 0, 5)))
    stream = DirectoryStream(str(tmp_path), stream_schema(), on_bad_line=on_bad_line)
    got = []
    with pytest.raises(TimeoutError):
        for batch in stream.iter_batches(4, None, control=OneRank()):
            got.append(batch)
    with open(tmp_path / "b-0002.csv", "a") as fh:
        fh.write(csv_text(part(b, 5, 9), header=False))
    return stream, got, a, b


def test_a_stream_file_that_grows_after_it_was_read_stops_the_run_with_an_error_naming_it(tmp_path):
    stream, got, a, b = changing_stream(tmp_path, "raise")
    assert group_ids(got) == [int(r) for r in a["row"]] + [int(r) for r in b["row"][:2]]
    with pytest.raises(DataError, match=r"b-0002\.csv changed after it was read.*rename"):
        list(stream.iter_batches(4, None, control=OneRank()))


def test_with_skip_a_stream_file_that_changed_is_counted_and_its_untrained_rows_accounted(tmp_path):
    stream, got, a, b = changing_stream(tmp_path, "skip")
    c = rows(5, seed=13)
    (tmp_path / "c-0003.csv").write_text(csv_text(c))
    open(tmp_path / "_END", "w").close()
    got += list(stream.iter_batches(4, None, control=OneRank()))
    # trained: a, the 2 rows of b in a trained batch, then c's first 4 (1 row left at the end)
    want = [int(r) for r in a["row"]] + [int(r) for r in b["row"][:2]] + [int(r) for r in c["row"][:4]]
    assert group_ids(got) == want
    stats = stream.stats()
    assert stats["bad_files"] == 1 and stats["rows_dropped"] == 3 and stats["rows_left"] == 1
    assert any("b-0002.csv: changed after it was read" in e for e in stats["bad_line_examples"])
    # every row read is trained, dropped or left: 6 + 5 + 5 rows read
    assert len(want) + stats["rows_dropped"] + stats["rows_left"] == 6 + 5 + 5


def test_a_stream_file_read_before_and_deleted_or_left_unchanged_is_no_error(tmp_path):
    from hybridps.data.stream import DirectoryStream
    a, b = rows(4, seed=21), rows(4, seed=22)
    (tmp_path / "a-0001.csv").write_text(csv_text(a))
    stream = DirectoryStream(str(tmp_path), stream_schema())
    control = OneRank()
    with pytest.raises(TimeoutError):
        list(stream.iter_batches(4, None, control=control))
    os.remove(tmp_path / "a-0001.csv")                 # consumed files may be deleted
    (tmp_path / "b-0002.csv").write_text(csv_text(b))
    open(tmp_path / "_END", "w").close()
    assert group_ids(stream.iter_batches(4, None, control=OneRank())) == [int(r) for r in b["row"]]
    assert stream.stats()["bad_files"] == 0 and stream.failure is None


def with_bad_x(text, columns, data_index):
    """CSV ``text`` of ``columns`` whose data line ``data_index`` has no number in column x."""
    lines = text.splitlines()
    cells = lines[data_index + 1].split(",")
    cells[list(columns).index("x")] = "not-a-number"
    lines[data_index + 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


def test_malformed_lines_of_a_stream_csv_file_are_skipped_and_counted_with_skip(tmp_path):
    from hybridps.data.stream import DirectoryStream
    a = rows(5, seed=31)
    (tmp_path / "a-0001.csv").write_text(with_bad_x(csv_text(a), a, 2))   # file line 4
    open(tmp_path / "_END", "w").close()
    stream = DirectoryStream(str(tmp_path), stream_schema(), on_bad_line="skip")
    got = list(stream.iter_batches(2, None, control=OneRank()))
    assert group_ids(got) == [int(r) for i, r in enumerate(a["row"]) if i != 2]
    stats = stream.stats()
    assert stats["bad_lines"] == 1 and stats["bad_files"] == 0
    assert any("a-0001.csv, line 4" in e for e in stats["bad_line_examples"])


# ---------------------------------------------------------------------- Redis: wrong keys, a lost server
class RedisServer:
    """A private redis-server on a free loopback port; its entries survive a SIGKILL and a
    restart (append-only file, synced on every write)."""

    def __init__(self, workdir):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server not installed (make setup installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir, self.proc = workdir, None
        os.makedirs(workdir, exist_ok=True)
        import redis
        self.client = redis.Redis(port=self.port)
        self.start()

    def start(self):
        import redis
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


class PatientRank(OneRank):
    """OneRank whose waits sleep (``poll_s``), giving up after ``seconds``."""

    def __init__(self, seconds, poll_s=0.05):
        super().__init__()
        self.deadline, self.poll_s = time.monotonic() + seconds, poll_s

    def wait(self):
        if time.monotonic() > self.deadline:
            raise TimeoutError("no more data")
        time.sleep(self.poll_s)


def test_a_redis_key_that_is_not_a_stream_is_refused_naming_the_key_and_its_type(private_redis):
    from hybridps.data.stream import RedisStream
    from hybridps.errors import ConfigError
    client = private_redis.client
    client.set("events", "x")
    url = f"redis://127.0.0.1:{private_redis.port}/events"
    with pytest.raises(ConfigError, match=r"key 'events' .* holds a string, not a stream"):
        RedisStream(url, stream_schema())
    # replaced while the run reads it: the same error, through the per-step agreement
    client.delete("events")
    client.xadd("events", dict(next(redis_entries())))
    stream = RedisStream(url, stream_schema())
    client.delete("events")
    client.rpush("events", "x")
    with pytest.raises(DataError, match=r"key 'events' .* holds a list, not a stream"):
        list(stream.iter_batches(4, None, control=OneRank()))


def test_a_redis_server_that_is_not_running_is_named_with_what_to_do():
    from hybridps.data.stream import RedisStream
    with socket.socket() as s:               # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"Redis server at 127\.0\.0\.1:{port} .*start redis-server"):
        RedisStream(f"redis://127.0.0.1:{port}/events", stream_schema())


def test_a_lost_redis_server_is_tried_again_then_fails_naming_it(private_redis, capfd):
    from hybridps.data.stream import RedisStream
    entries = list(redis_entries())[:12]
    for fields in entries:
        private_redis.client.xadd("events", fields)
    stream = RedisStream(f"redis://127.0.0.1:{private_redis.port}/events", stream_schema(),
                         retry_seconds=1.0)
    got = []
    with pytest.raises(TimeoutError):
        for batch in stream.iter_batches(4, None, control=PatientRank(0.5)):
            got.append(batch)
    assert len(got) == 3 and stream.state()["last_id"] == stream.last_id
    # lost, then back within stream_retry_seconds: reading goes on
    private_redis.kill()
    with pytest.raises(TimeoutError):
        list(stream.iter_batches(4, None, control=PatientRank(0.3)))
    private_redis.start()
    for fields in list(redis_entries())[12:16]:
        private_redis.client.xadd("events", fields)
    got += list(stream.iter_batches(4, 1, control=PatientRank(10)))
    assert len(got) == 4 and stream.failure is None
    # lost for longer than stream_retry_seconds: a failure naming the server
    last_id = stream.last_id
    private_redis.kill()
    with pytest.raises(DataError, match=rf"Redis server at 127\.0\.0\.1:{private_redis.port} .*"
                                        rf"unreachable for 1\.\ds"):
        list(stream.iter_batches(4, None, control=PatientRank(30)))
    assert stream.last_id == last_id          # the position: the last entry trained
    err = capfd.readouterr().err
    assert err.count("lost the Redis server") == 2 and err.count("reached the Redis server") == 1


# ---------------------------------------------------------------------- the per-step agreement
class TwoRankComm:
    """Rank ``rank`` of two, the other rank's vote given: a stand-in for the allgather."""

    def __init__(self, rank, other_vote):
        self.rank, self.size, self.other_vote, self.barriers = rank, 2, other_vote, 0

    def allgather_object(self, vote):
        return [vote, self.other_vote] if self.rank == 0 else [self.other_vote, vote]

    def barrier(self):
        self.barriers += 1


def vote(ready=True, ended=False, failure=None, notes=()):
    """A rank's vote as StepAgreement.agree gathers it: stop, ready, ended, delta due, failure, notes,
    checkpoint due."""
    return (False, ready, ended, False, failure, tuple(notes), False)


def test_a_source_failure_on_one_rank_ends_every_rank_at_the_same_step_and_one_raises_it():
    from hybridps.step_control import StepAgreement, reset_stop, stop_requested
    # rank 0 is ready; rank 1's source failed: both end before this step
    on_0 = StepAgreement(TwoRankComm(0, vote(ready=False, failure="lost the server")))
    on_1 = StepAgreement(TwoRankComm(1, vote(ready=True)))
    assert on_0.agree(7, ready=True) == "end"
    assert on_1.agree(7, ready=False, failure="lost the server") == "end"
    for control in (on_0, on_1):
        assert control.failure == (1, "lost the server") and control.stopped_by == "stream failure"
    with pytest.raises(DataError, match=r"lost the server; every rank stopped after step 7, the "
                                        r"checkpoint of that step in /ck holds"):
        on_1.raise_failure(7, "/ck")
    try:
        on_0.raise_failure(7, "/ck")      # waits in a collective the failing rank never joins
        assert on_0.comm.barriers == 1 and stop_requested()   # its end by SIGTERM is no stop request
    finally:
        reset_stop()


def test_the_agreement_hands_every_rank_the_notes_of_all():
    from hybridps.step_control import StepAgreement
    control = StepAgreement(TwoRankComm(0, vote(notes=["b.csv", "a.csv"])))
    assert control.agree(0, notes=["b.csv"]) == "go" and control.notes == ("a.csv", "b.csv")
    assert control.agree(1) == "go" and control.failure is None


def test_stream_retry_seconds_is_validated():
    from hybridps.config import make_config
    from hybridps.errors import ConfigError
    assert make_config().stream_retry_seconds == 60.0
    with pytest.raises(ConfigError, match="stream_retry_seconds.*seconds >= 0"):
        make_config(overrides={"stream_retry_seconds": -1})


# ---------------------------------------------------------------------- 2 ranks: the same, agreed
def grow_in_place(out, name, on_bad_line):
    """a-00001.csv (37 rows), then b-00002.csv renamed in with 120 of its 200 rows; once the job
    has trained the 9 steps those 157 rows fill, b's last 80 rows are appended in place (the
    breach); with skip, c-00003.csv (37 rows and a malformed one) and the end marker follow."""
    stream = out / f"{name}-stream"
    stream.mkdir()
    a, b, c = rows(37, seed=41), rows(200, seed=42), rows(38, seed=43)
    (stream / "a-00001.csv").write_text(csv_text(a))
    (stream / ".b-00002.csv").write_text(csv_text(part(b, 0, 120)))
    os.rename(stream / ".b-00002.csv", stream / "b-00002.csv")
    job = start_job(out, name, {"data": f"stream:{stream}", "steps": 0, "batch_size": BATCH,
                                "checkpoint_dir": str(out / f"{name}-ckpt"), "stream_poll_s": 0.05,
                                "on_bad_line": on_bad_line})
    wait_for_steps(out, name, 9)
    time.sleep(0.5)                        # both ranks wait for a 10th step: 13 rows are left
    with open(stream / "b-00002.csv", "a") as fh:
        fh.write(csv_text(part(b, 120, 200), header=False))
    if on_bad_line == "skip":
        (stream / ".c-00003.csv").write_text(with_bad_x(csv_text(c), c, 5))
        os.rename(stream / ".c-00003.csv", stream / "c-00003.csv")
        open(stream / "_END", "w").close()
    code, log = finish(out, name, job)
    ids = [int(r) for r in a["row"]] + [int(r) for r in b["row"]]
    return code, log, ids, [int(r) for i, r in enumerate(c["row"]) if i != 5], stream


@pytest.mark.mpi
def test_two_ranks_stop_at_one_step_with_a_checkpoint_when_a_stream_file_grows_after_it_was_read(tmp_path):
    from hybridps.checkpoint.reader import load_manifest
    write_config(tmp_path)
    code, log, ids, _, stream = grow_in_place(tmp_path, "grown", "raise")
    assert code != 0, log[-3000:]
    error = f"error: stream file {stream / 'b-00002.csv'} changed after it was read"
    assert log.count(error) == 1, log[-3000:]          # one rank reports it, once
    assert "every rank stopped after step 9" in log
    # the 9 steps before the breach was seen, each row once; their checkpoint, their position
    assert assert_each_row_once(tmp_path, [("grown", None)], ids) == 9
    summary = metrics(tmp_path, "grown")
    assert summary["stopped_by"] == "stream failure" and summary["steps"] == 9
    manifest = load_manifest(str(tmp_path / "grown-ckpt" / f"ckpt-{9:010d}"))
    states = [s for s in manifest["data_state"] if s]
    assert states and all(s["file"] == "b-00002.csv" and s["row"] == 144 - 37 for s in states)
    # the position is in the grown file: a resume reads on in it as it is now, losing no row
    open(stream / "_END", "w").close()
    resumed = finish(tmp_path, "resumed", start_job(tmp_path, "resumed", {
        "data": f"stream:{stream}", "steps": 0, "batch_size": BATCH, "resume": True,
        "checkpoint_dir": str(tmp_path / "grown-ckpt"), "stream_poll_s": 0.05}))
    assert resumed[0] == 0, resumed[1][-3000:]
    assert assert_each_row_once(tmp_path, [("grown", None), ("resumed", None)], ids) == 14
    assert metrics(tmp_path, "resumed")["data_stats"]["rows_left"] == 37 + 200 - 16 * 14


@pytest.mark.mpi
def test_two_ranks_with_skip_count_a_grown_stream_file_and_account_for_every_row_read(tmp_path):
    write_config(tmp_path)
    code, log, ids, c_ids, _ = grow_in_place(tmp_path, "skipped", "skip")
    assert code == 0, log[-3000:]
    summary = metrics(tmp_path, "skipped")
    stats = summary["data_stats"]
    # trained: the 144 rows of 9 steps, then c's 37 rows fill 2 steps with 5 left; b's 13 rows
    # read but not trained are dropped on both ranks, and its 80 later rows never read
    assert assert_each_row_once(tmp_path, [("skipped", None)], ids[:144] + c_ids) == 11
    assert stats["bad_files"] == 1 and stats["rows_dropped"] == 13 and stats["rows_left"] == 5
    assert 16 * 11 + stats["rows_dropped"] + stats["rows_left"] == 37 + 120 + 37
    assert any("b-00002.csv: changed after it was read" in e for e in stats["bad_line_examples"])
    # c's malformed line: skipped, counted once (every rank reads it)
    assert stats["bad_lines"] == 1
    assert any("c-00003.csv, line 7" in e for e in stats["bad_line_examples"])


@pytest.mark.mpi
def test_two_ranks_refuse_a_redis_key_that_is_not_a_stream(tmp_path, private_redis):
    write_config(tmp_path)
    private_redis.client.set("events", "not a stream")
    code, log = finish(tmp_path, "wrongtype", start_job(tmp_path, "wrongtype", {
        "data": f"redis://127.0.0.1:{private_redis.port}/events", "steps": 0, "batch_size": BATCH}))
    assert code != 0 and "error: Redis key 'events'" in log and "holds a string, not a stream" in log
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.mpi
def test_two_ranks_stop_together_when_redis_is_lost_and_resume_without_loss_once_it_is_back(
        tmp_path, private_redis):
    from hybridps.data.hashing import text_ids
    from hybridps.checkpoint.reader import load_manifest
    write_config(tmp_path)
    client = private_redis.client
    entries = list(redis_entries())
    common = {"data": f"redis://127.0.0.1:{private_redis.port}/events", "steps": 0,
              "batch_size": BATCH, "checkpoint_dir": str(tmp_path / "ckpt"), "stream_poll_s": 0.05,
              "stream_retry_seconds": 2.0}
    produce_redis(client, "events", entries[:120], 0)      # 7 steps and 8 entries
    job = start_job(tmp_path, "lost", common)
    wait_for_steps(tmp_path, "lost", 7)
    private_redis.kill()
    code, log = finish(tmp_path, "lost", job)
    assert code != 0, log[-3000:]
    assert log.count("lost the Redis server") == 2 and "Traceback" not in log, log[-3000:]
    assert log.count(f"Redis server at 127.0.0.1:{private_redis.port} of stream 'events' was "
                     f"unreachable") == 1, log[-3000:]
    assert "every rank stopped after step 7" in log
    stop = metrics(tmp_path, "lost")
    assert stop["stopped_by"] == "stream failure" and stop["steps"] == 7
    manifest = load_manifest(str(tmp_path / "ckpt" / f"ckpt-{7:010d}"))
    ids = [entry_id.decode() for entry_id, _ in client_after_restart(private_redis).xrange("events")]
    assert all(s["last_id"] == ids[16 * 7 - 1] for s in manifest["data_state"] if s)
    job = start_job(tmp_path, "back", dict(common, resume=True))
    produce_redis(client, "events", entries[120:], 0)
    client.xadd("events", {"_end": "1"})
    code, log = finish(tmp_path, "back", job)
    assert code == 0, log[-3000:]
    assert metrics(tmp_path, "back")["first_step"] == 7
    stream_rows = [int(i) for i in text_ids(np.array([e["row"] for e in entries], dtype=object))]
    assert assert_each_row_once(tmp_path, [("lost", None), ("back", None)], stream_rows) == 14


def client_after_restart(server):
    server.start()                         # its append-only file holds every entry written
    return server.client


def not_utf8(columns, data_index):
    """CSV bytes of ``columns`` whose data line ``data_index`` has a user value not in UTF-8."""
    lines = csv_text(columns).encode().split(b"\n")
    cells = lines[data_index + 1].split(b",")
    cells[list(columns).index("user")] = b"u\xff\xfe"
    lines[data_index + 1] = b",".join(cells)
    return b"\n".join(lines)


def test_a_line_of_a_stream_csv_file_that_is_not_utf8_is_skipped_and_counted_with_skip(tmp_path):
    from hybridps.data.stream import DirectoryStream
    a = rows(6, seed=51)
    (tmp_path / "a-0001.csv").write_bytes(not_utf8(a, 2))          # file line 4
    open(tmp_path / "_END", "w").close()
    stream = DirectoryStream(str(tmp_path), stream_schema(), on_bad_line="skip")
    got = list(stream.iter_batches(5, None, control=OneRank()))
    assert group_ids(got) == [int(r) for i, r in enumerate(a["row"]) if i != 2]
    stats = stream.stats()
    assert stats["bad_lines"] == 1 and stats["bad_files"] == 0
    assert any("a-0001.csv, line 4" in e for e in stats["bad_line_examples"])


def test_a_stream_directory_out_of_reach_is_tried_again_then_fails_naming_it(tmp_path, capfd):
    from hybridps.data.stream import DirectoryStream
    directory, away = tmp_path / "stream", tmp_path / "away"
    directory.mkdir()
    a, b = rows(4, seed=61), rows(4, seed=62)
    (directory / "a-0001.csv").write_text(csv_text(a))
    stream = DirectoryStream(str(directory), stream_schema(), retry_seconds=1.0)
    got = list(stream.iter_batches(4, 1, control=PatientRank(5)))
    os.rename(directory, away)              # gone for a while, then back with one more file
    with pytest.raises(TimeoutError):
        list(stream.iter_batches(4, None, control=PatientRank(0.3)))
    (away / "b-0002.csv").write_text(csv_text(b))
    os.rename(away, directory)
    got += list(stream.iter_batches(4, 1, control=PatientRank(10)))
    assert group_ids(got) == [int(r) for r in a["row"]] + [int(r) for r in b["row"]]
    os.rename(directory, away)              # gone for longer than stream_retry_seconds
    with pytest.raises(DataError, match=rf"stream directory {directory} was unreachable for 1\.\ds"):
        list(stream.iter_batches(4, None, control=PatientRank(30)))
    err = capfd.readouterr().err
    assert err.count(f"lost stream directory {directory}") == 2
    assert err.count(f"reached stream directory {directory} again") == 1


# ---------------------------------------------------------------------- several streams as one
def test_merged_stream_specs_are_split_before_each_stream_and_a_single_stream_is_not_merged(tmp_path):
    from hybridps.data.merged_stream import MergedStream, open_streams, split_stream_specs
    from hybridps.data.stream import DirectoryStream
    from hybridps.errors import ConfigError
    assert split_stream_specs("stream:/a,b,stream:/c,redis://h:1/s") == ["stream:/a,b", "stream:/c", "redis://h:1/s"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    schema = stream_schema()
    merged = open_streams(f"stream:{tmp_path / 'a'},stream:{tmp_path / 'b'}", schema, rank=0, world_size=1)
    assert isinstance(merged, MergedStream) and len(merged.streams) == 2
    assert isinstance(open_streams(f"stream:{tmp_path / 'a'}", schema, rank=0, world_size=1), DirectoryStream)
    with pytest.raises(ConfigError, match="two or more different streams"):
        open_streams(f"stream:{tmp_path / 'a'},stream:{tmp_path / 'a'}", schema, rank=0, world_size=1)


def merged_pair(tmp_path):
    """Rank 0 and rank 1 of two, each a MergedStream over its own copy of streams a and b
    (the copies fill at different moments, as files reach ranks at different moments)."""
    from hybridps.data.merged_stream import MergedStream
    ranks = []
    for rank in (0, 1):
        dirs = [tmp_path / f"r{rank}" / name for name in ("a", "b")]
        for d in dirs:
            d.mkdir(parents=True)
        ranks.append(MergedStream([f"stream:{d}" for d in dirs], stream_schema(), rank=rank, world_size=2))
    return ranks


def put(tmp_path, rank, stream, seed, count):
    directory = tmp_path / f"r{rank}" / stream
    write_parquet(directory / f".{seed:04d}.tmp", rows(count, seed=seed), count)
    os.rename(directory / f".{seed:04d}.tmp", directory / f"{seed:04d}.parquet")


def agree(ranks, need):
    """One poll of every rank and the agreement's notes applied on each: (ready, ended) per rank."""
    votes = [r._poll(need) for r in ranks]
    notes = sorted({n for r in ranks for n in r._notes})
    for r in ranks:
        r._notes = []
        r._apply_notes(notes)
    return votes


def test_ranks_that_hold_different_files_agree_on_one_merged_order_of_rows_all_hold(tmp_path):
    ranks = merged_pair(tmp_path)
    put(tmp_path, 0, "a", 1, 5)                 # rank 0: a has 5 + 4 rows, b nothing yet
    put(tmp_path, 0, "a", 3, 4)
    put(tmp_path, 1, "a", 1, 5)                 # rank 1: a has 5, b has 6
    put(tmp_path, 1, "b", 2, 6)
    assert agree(ranks, 8) == [(False, False)] * 2
    # the rows every rank holds: a's first 5 (rank 1 has no more of a; rank 0 none of b)
    assert [r.segments for r in ranks] == [[[0, 5]]] * 2
    put(tmp_path, 0, "b", 2, 6)
    agree(ranks, 8)                             # now b's 6 (rank 1 still lacks a's file 3)
    assert [r.segments for r in ranks] == [[[0, 5], [1, 6]]] * 2
    want = [int(g) for g in list(rows(5, seed=1)["row"]) + list(rows(6, seed=2)["row"])]
    for r in ranks:
        assert [int(g) for g in r._rows(0, 11).groups] == want
        r._advance(8)
    assert [r.state()["streams"][0]["consumed_through"] for r in ranks] == ["0001.parquet"] * 2
    assert [r.state()["streams"][1]["row"] for r in ranks] == [3, 3]
    assert [r._available() for r in ranks] == [3, 3]


def test_a_merged_stream_resumes_from_its_vector_of_positions_and_ends_when_every_stream_has(tmp_path):
    ranks = merged_pair(tmp_path)
    for rank in (0, 1):
        put(tmp_path, rank, "a", 1, 5)
        put(tmp_path, rank, "b", 2, 6)
    agree(ranks, 4)
    for r in ranks:
        r._advance(7)                           # a's 5, b's first 2
    saved = ranks[0].state()
    assert [s["rows_consumed"] for s in saved["streams"]] == [5, 2]
    resumed = merged_pair(tmp_path / "again")
    for rank in (0, 1):
        for stream, seed, count in (("a", 1, 5), ("b", 2, 6), ("a", 3, 4)):
            put(tmp_path / "again", rank, stream, seed, count)
    for r in resumed:
        state = dict(saved, path=r.where,
                     streams=[dict(s, path=d.where) for s, d in zip(saved["streams"], r.streams)])
        r.restore(state)
    for rank in (0, 1):
        for stream in ("a", "b"):
            open(tmp_path / "again" / f"r{rank}" / stream / "_END", "w").close()
    assert agree(resumed, 4) == [(False, False)] * 2
    # after the vector of positions: a's new file, then b's 4 rows left (one segment per stream,
    # in stream order); none of the 7 rows before it again
    got = [[int(g) for g in r._rows(0, 8).groups] for r in resumed]
    assert got[0] == got[1] == [int(g) for g in list(rows(4, seed=3)["row"]) + list(rows(6, seed=2)["row"][2:])]
    for r in resumed:
        r._advance(8)
    assert agree(resumed, 4) == [(False, True)] * 2       # all read, every end marker there


@pytest.mark.mpi
def test_two_ranks_train_two_merged_streams_each_row_once_across_a_kill_and_a_resume(tmp_path):
    from hybridps.checkpoint.reader import load_manifest
    out = tmp_path
    write_config(out)
    a, b = out / "a", out / "b"
    a.mkdir()
    b.mkdir()
    common = {"data": f"stream:{a},stream:{b}", "steps": 0, "batch_size": BATCH,
              "checkpoint_dir": str(out / "ckpt"), "stream_poll_s": 0.05}
    producers = [DirectoryProducer(a, [0, 2, 4], interval=0.2, end=False),     # 37 rows a file
                 DirectoryProducer(b, [1, 3], interval=0.5, end=False)]
    for p in producers:
        p.start()
    killed = finish(out, "killed", start_job(out, "killed", dict(common, checkpoint_every=3),
                                             env=testing_hooks.environment(fail_at_step=7, fail_rank=1)))
    for p in producers:
        p.join()
    assert killed[0] != 0 and "injected failure at step 7" in killed[1], killed[1][-3000:]
    job = start_job(out, "ended", dict(common, resume=True))
    producers = [DirectoryProducer(a, [6], interval=0.3, end=True),
                 DirectoryProducer(b, [5, 7], interval=0.2, end=True)]
    for p in producers:
        p.start()
    ended = finish(out, "ended", job)
    for p in producers:
        p.join()
    assert ended[0] == 0, ended[1][-3000:]
    last = metrics(out, "ended")
    assert last["first_step"] == 6 and last["stopped_by"] == "end of stream"
    # the merged sequence: each global step is rank 0's 8 rows then rank 1's; the killed run's
    # steps from 6 on (after its checkpoint) were trained again by the resumed run
    sequence = []
    for name, below in (("killed", 6), ("ended", None)):
        trained = [drawn(out, name, rank, below) for rank in (0, 1)]
        assert sorted(trained[0]) == sorted(trained[1])
        for step in sorted(trained[0]):
            sequence += trained[0][step] + trained[1][step]
    total = 8 * ROWS_PER_FILE
    assert len(sequence) == len(set(sequence)) == 16 * last["steps"] and total - len(sequence) < 16
    for files in ([0, 2, 4, 6], [1, 3, 5, 7]):             # each stream's rows in its own order
        own = set(directory_rows(files))
        in_order = [r for r in sequence if r in own]
        assert in_order == directory_rows(files)[:len(in_order)]
    manifest = load_manifest(str(out / "ckpt" / f"ckpt-{last['steps']:010d}"))
    states = [s for s in manifest["data_state"] if s]
    assert len(states) == 2 and states[0] == states[1] and states[0]["kind"] == "merged"
    assert sum(s["rows_consumed"] for s in states[0]["streams"]) == 16 * last["steps"]
