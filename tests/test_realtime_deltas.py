"""Wall-clock deltas on a quiet stream, under real MPI (2 ranks): what was trained reaches
serving once the delta interval has passed, without waiting for the next file or a stop.

Each job is tests/parallel/realtime_scenarios.py under mpirun; the test is the producer. One
file of 48 rows (3 global steps of 16) arrives after the job has waited longer than the delta
interval, then nothing (no ``_END``): the export after step 3, whose stream position is the end
of that file, must appear while the job waits; then a second file, and the export after step
6 likewise, before the test sends SIGTERM. The BSP job draws batches on its training thread,
the ASP job on its exchange thread (which pushes the trained steps ahead of its schedule for
an export while idle, and must go on training after it): both paths are covered.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.mpi_util import MPI_ENV, REPO, mpirun_available
from tests.schema_data import FEATURES, rows, write_parquet

pytestmark = pytest.mark.mpi

BATCH = 8                       # per rank: 16 rows per global step
FILE_ROWS = 48                  # one file: 3 global steps
DELTA_SECONDS = 1.0             # the interval is not what is tested: that it passes while idle is
SCRIPT = os.path.join(REPO, "tests", "parallel", "realtime_scenarios.py")


def _start(out, name, overrides):
    command = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable,
               SCRIPT, str(out), name, json.dumps(overrides)]
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **MPI_ENV), stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(condition, what, out, names, timeout=150):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join((out / f"{n}.log").read_text()[-3000:] for n in names)
            pytest.fail(f"{what} within {timeout}s:\n{logs}")
        time.sleep(0.2)


def _exports(root):
    """[(ExportEntry, manifest)] of the complete exports under ``root``, in sequence order."""
    from hybridps.checkpoint.format import MANIFEST
    from hybridps.export.delta import list_exports
    found = []
    for entry in list_exports(str(root)):
        with open(os.path.join(entry.path, MANIFEST)) as fh:
            found.append((entry, json.load(fh)))
    return found


@pytest.fixture(scope="module")
def quiet_stream_runs(tmp_path_factory):
    """A BSP and an ASP job, each on its own stream directory that gets one file and then
    nothing; {name: (exports seen while the job waited, exit code, log)}."""
    import yaml
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    out = tmp_path_factory.mktemp("realtime")
    with open(out / "config.yaml", "w") as fh:
        yaml.safe_dump({"model": "wide_deep", "hidden": [8], "seed": 3, "warmup_steps": 1,
                        "features": dict(FEATURES, group_by="row")}, fh, sort_keys=False)
    names, jobs = ("bsp", "asp"), {}
    for name in names:
        (out / name / "stream").mkdir(parents=True)
        jobs[name] = _start(out, name, {
            "data": f"stream:{out / name / 'stream'}", "steps": 0, "batch_size": BATCH, "sync": name,
            "stream_poll_s": 0.05, "delta_export_dir": str(out / name / "deltas"),
            "delta_every_seconds": DELTA_SECONDS})
    try:
        _wait(lambda: all((out / n / f"pid-{r}").exists() for n in names for r in (0, 1)),
              "the jobs did not start", out, names)
        time.sleep(DELTA_SECONDS + 1.0)      # idle longer than the interval, nothing trained
        before = {n: _exports(out / n / "deltas") for n in names}
        seen = []
        for index in (0, 1):         # the second file: training goes on after an idle export
            for name in names:
                stream = out / name / "stream"
                file = f"part-{index:05d}.parquet"
                write_parquet(stream / f".{file}.tmp", rows(FILE_ROWS, seed=index + 1), FILE_ROWS)
                os.rename(stream / f".{file}.tmp", stream / file)
            steps = 3 * (index + 1)
            _wait(lambda: all(any(e.to_step == steps for e, _ in _exports(out / n / "deltas")) for n in names),
                  f"no export after step {steps} while the stream was quiet", out, names)
            seen.append({n: _exports(out / n / "deltas") for n in names})
        for name in names:
            os.kill(int((out / name / "pid-0").read_text()), signal.SIGTERM)
        results = {}
        for name in names:
            code = jobs[name].wait(timeout=120)
            with open(out / name / "metrics.json") as fh:
                steps = json.load(fh)["steps"]
            results[name] = (before[name], [s[name] for s in seen], code, steps,
                             (out / f"{name}.log").read_text())
        return results
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()


@pytest.mark.parametrize("name", ["bsp", "asp"])
def test_a_due_delta_is_written_while_the_stream_is_quiet(quiet_stream_runs, name):
    before, seen, code, steps, log = quiet_stream_runs[name]
    assert before == [], "an export although no step had trained"
    assert code == 0 and steps == 6, log[-3000:]
    for index, exports in enumerate(seen):      # after each file, before the next one or SIGTERM
        done = 3 * (index + 1)
        final = [manifest for entry, manifest in exports if entry.to_step == done]
        assert len(final) == 1, [e.name for e, _ in exports]
        position = final[0]["position"]
        assert position["consumed_through"] == f"part-{index:05d}.parquet" and position["file"] is None
        assert position["rows_consumed"] == FILE_ROWS * (index + 1)
        to_steps = [entry.to_step for entry, _ in exports]
        assert to_steps == sorted(to_steps) and to_steps[-1] == done, to_steps
