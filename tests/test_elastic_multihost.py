"""Elastic restarts on the network-namespace test bed: 2 hosts x 1 rank train on a stream under
``hybridps launch --max-restarts`` (hybridps.supervisor), ``hybridps serve`` follows the exports.

One pipeline, three restarts (one bed, one server, one stream: the start-up is paid once):

  * host B turned off (every process there killed, nothing starts there): the supervisor
    relaunches on host A alone from the last checkpoint, serve's version keeps rising after the
    restart; host B turned on again is taken back at the next planned restart
    (``--regrow-every``);
  * then host B's link taken down: the same, on host A alone (the link failure is noticed
    through the daemons' TCP keepalive, the bed's ``keepalive_s``, and the probe of B gives up
    after ``--probe-timeout``: both set short here, as the test bed's hosts answer at once);
  * when the stream ends no row is lost (consumed + left == produced).
The pipeline is hybridps.bench.soak.ElasticPipeline (also the soak's). Every process runs
under a timeout and the bed is torn down after the test, failed or not. Skipped with the
reason when the bed cannot be built.
"""
import shutil
import tempfile
import time

import pytest

from tests.mpi_util import mpirun_available
from tests.test_multihost import netns

pytestmark = [pytest.mark.netns, pytest.mark.mpi, pytest.mark.slow]

STEP_TIMEOUT_S = 300


@pytest.fixture
def pipeline():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network-namespace test bed unavailable: {reason}")
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    from hybridps.bench.soak import ElasticPipeline
    made = []
    # a directory of its own: pytest's numbered temporary directories are pruned by other
    # pytest runs on this machine, also while a long test runs
    out = tempfile.mkdtemp(prefix="hybridps-elastic-")

    def make(**settings):
        bed = netns.TestBed(hosts=2, slots=1).up()
        made.append(bed)
        run = ElasticPipeline(bed, out, **settings)
        made.append(run)
        return run.start()

    yield make
    for thing in reversed(made):
        (thing.close if hasattr(thing, "close") else thing.down)()
    shutil.rmtree(out, ignore_errors=True)


def _versions_after(run, since):
    return [v for t, v, _, _ in run.status_log if t > since and v is not None]


def _restart_and_serving(run, lost_host, restarts, step_before):
    """After the failure: the restart record, training going on, serving's version rising."""
    a, b = run.bed.hosts
    run.wait_for(lambda: len(run.restarts()) >= restarts, STEP_TIMEOUT_S, f"restart {restarts}")
    record = run.restarts()[restarts - 1]
    assert record["hosts_dropped"] == [lost_host] and record["hosts"] == [a] and record["ranks"] == 1
    assert record["cause"] != "" and record["seconds_lost"] is not None and record["seconds_lost"] >= 0
    assert record["last_step_trained"] is not None and record["checkpoint_step"] <= record["last_step_trained"]
    assert record["rows_trained_again"] == (record["last_step_trained"] - record["checkpoint_step"]) * 64 * 2
    assert record["checkpoint_step"] > 0 and record["last_step_trained"] >= step_before
    restarted_at = time.time()
    served = max(v for _, v, _, _ in run.status_log if v is not None)
    run.wait_for(lambda: any(v > served + 1 for v in _versions_after(run, restarted_at)),
                 STEP_TIMEOUT_S, "serve's version rising after the restart")
    # serve answered with a version through the gap (the last good one until the next export)
    assert run.status_failures == 0 and all(v is not None for _, v, _, _ in run.status_log)
    return record


def test_a_host_turned_off_then_taken_back_then_its_link_down_is_dropped_and_no_row_is_lost(pipeline):
    run = pipeline(max_restarts=3, regrow_every=3.0, probe_timeout=5.0, keepalive_s=2)
    a, b = run.bed.hosts
    run.wait_for(lambda: len(run.steps_trained()) > 5 and len(run.checkpoints_written()) > 0,
                 STEP_TIMEOUT_S, "training and a checkpoint")
    # host B turned off: dropped
    step_before = run.steps_trained()[-1]
    assert run.bed.power(b, False), "processes of host B were killed"
    record = _restart_and_serving(run, b, 1, step_before)
    assert f"host {b} was lost" in record["cause"]
    assert run.restarts()[0]["planned"] is False
    # B answers again: taken back at a planned restart
    run.bed.power(b, True)
    run.wait_for(lambda: len(run.restarts()) >= 2, STEP_TIMEOUT_S, "the planned restart")
    regrow = run.restarts()[1]
    assert regrow["planned"] is True and regrow["hosts_taken_back"] == [b] and regrow["hosts"] == [a, b]
    assert regrow["rows_trained_again"] == 0          # SIGTERM: a final checkpoint of the last step
    assert regrow["cause"] == "planned restart to take hosts back"
    first = len(run.steps_trained())
    run.wait_for(lambda: len(run.steps_trained()) > first + 3, STEP_TIMEOUT_S, "training on both hosts")
    # B's link taken down: dropped again, the job goes on on A
    step_before = run.steps_trained()[-1]
    run.bed.set_link(b, False)
    link = _restart_and_serving(run, b, 3, step_before)
    assert link["planned"] is False
    assert run.end_stream_and_wait(timeout=STEP_TIMEOUT_S) == 0, run.log()[-4000:]
    rows = run.accounting()
    assert rows["rows_lost"] == 0 and rows["rows_consumed"] + rows["rows_left"] == rows["rows_produced"], rows
    assert rows["rows_left"] < 64 * 2                 # what cannot fill one more global batch
    assert "hybridps supervisor: the job finished (exit code 0); 3 restarts" in run.log()
