"""Elastic restarts (hybridps.supervisor): the decisions as a table of events and expected next
worlds, the restart record's figures, the scanner's step and error lines, the wall-clock
checkpoint cadence (``checkpoint_every_seconds``), and the supervisor's process handling on one
node (a crash loop stops after N). The multi-host scenarios (a host killed, its link down, a
host taken back) are in tests/test_elastic_multihost.py on the network-namespace test bed.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from hybridps.supervisor import (Decision, Outcome, Policy, choose_world, decide, keep_waiting,
                                 regrow_due, regrow_hosts, restart_line, rows_trained_again,
                                 seconds_lost, training_ranks)
from tests.mpi_util import MPI_ENV, REPO, mpirun_available

AB = (("a", 1), ("b", 1))
P = Policy(max_restarts=2, min_ranks=1)

# (outcome, answering, failures in a row before, policy) -> (action, hosts, failures after)
TABLE = [
    ("finished", Outcome(0), {"a", "b"}, 0, P, "done", (), 0),
    ("a host lost after progress", Outcome(137, progressed=True), {"a"}, 0, P, "relaunch", (("a", 1),), 1),
    ("a failure, every host answers", Outcome(1, progressed=True), {"a", "b"}, 0, P, "relaunch", AB, 1),
    ("progress resets the count", Outcome(1, progressed=True), {"a", "b"}, 2, P, "relaunch", AB, 1),
    ("second failure without progress", Outcome(1), {"a", "b"}, 1, P, "relaunch", AB, 2),
    ("third failure without progress: crash loop", Outcome(1), {"a", "b"}, 2, P, "give up", (), 3),
    ("max_restarts 0: the first failure gives up", Outcome(1, progressed=True), {"a", "b"}, 0,
     Policy(0), "give up", (), 1),
    ("planned restart takes b back", Outcome(0, planned=True), {"a", "b"}, 1, P, "relaunch", AB, 0),
    ("planned restart, b silent again", Outcome(0, planned=True), {"a"}, 0, P, "relaunch", (("a", 1),), 0),
    ("no host answers", Outcome(1, progressed=True), set(), 0, P, "give up", (), 1),
    ("fewer ranks than min_ranks", Outcome(1, progressed=True), {"b"}, 0, Policy(5, min_ranks=2),
     "give up", (("b", 1),), 1),
    ("stopped by the operator", Outcome(143, stopped=True), {"a", "b"}, 1, P, "done", (), 1),
]


@pytest.mark.parametrize("name,outcome,answering,before,policy,action,hosts,after", TABLE,
                         ids=[row[0] for row in TABLE])
def test_decision_table(name, outcome, answering, before, policy, action, hosts, after):
    decision = decide(AB, outcome, answering, before, policy, cause="ValueError: boom")
    assert (decision.action, decision.hosts, decision.failures_in_row) == (action, hosts, after)
    if action == "give up" and after > policy.max_restarts:
        failures = "1 failure" if after == 1 else f"{after} failures"
        assert decision.reason.startswith(f"{failures} in a row without a new checkpoint "
                                          f"(--max-restarts {policy.max_restarts})")
        assert decision.reason.endswith("last error: ValueError: boom")
    if action == "give up" and after <= policy.max_restarts:
        assert f"fewer than --min-ranks {policy.min_ranks}" in decision.reason


def test_only_too_few_hosts_is_worth_waiting_for_and_only_for_the_given_period():
    short = decide(AB, Outcome(1, progressed=True), {"b"}, 0, Policy(5, min_ranks=2, wait_for_hosts=60))
    loop = decide(AB, Outcome(1), {"a", "b"}, 2, Policy(2, wait_for_hosts=60))
    assert short.action == loop.action == "give up"
    assert keep_waiting(short, 0.0, Policy(5, min_ranks=2, wait_for_hosts=60))
    assert keep_waiting(short, 59.9, Policy(5, min_ranks=2, wait_for_hosts=60))
    assert not keep_waiting(short, 60.0, Policy(5, min_ranks=2, wait_for_hosts=60))
    assert not keep_waiting(short, 0.0, Policy(5, min_ranks=2))          # 0: give up at once
    assert not keep_waiting(loop, 0.0, Policy(2, wait_for_hosts=60))     # a crash loop: no host to wait for


def _supervisor(hostfile, wait_for_hosts, answers, out):
    """A Supervisor over hosts a and b whose probe answers ``answers`` one after another, on a
    fake clock that its sleeps advance."""
    from argparse import Namespace
    from hybridps.config import make_config
    from hybridps.launch import Environment
    from hybridps.supervisor import Supervisor
    args = Namespace(max_restarts=2, min_ranks=2, regrow_every=0.0, wait_for_hosts=wait_for_hosts,
                     history=None, hostfile=hostfile, hosts=None, num_ranks=2, launcher="auto",
                     bind="none", threads_per_rank=0, launcher_args=[], watchdog_timeout=None)
    now = [0.0]
    supervisor = Supervisor(args, ["train", "--checkpoint-dir", "/c"],
                            make_config(overrides={"checkpoint_dir": "/c"}), Environment(cores=2),
                            out=out, clock=lambda: now[0],
                            sleep=lambda s: now.__setitem__(0, now[0] + s))
    probes = iter(answers)
    supervisor.probe = lambda hosts: next(probes)
    return supervisor, now


def test_the_supervisor_waits_for_a_host_that_comes_back_then_starts_on_both(tmp_path):
    import io
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    out = io.StringIO()
    supervisor, now = _supervisor(str(hostfile), 30, [{"a"}, {"a"}, {"a", "b"}], out)
    started = []

    class Launched(Exception):
        pass

    def launch(hosts, record):
        started.append(hosts)
        raise Launched
    supervisor._launch = launch
    with pytest.raises(Launched):
        supervisor._loop()
    assert started == [(("a", 1), ("b", 1))]
    assert now[0] == 20.0                                   # two probes 10 s apart
    assert out.getvalue().count("waiting for hosts: the hosts that answer hold 1 rank") == 2


def test_the_supervisor_gives_up_when_the_wait_for_hosts_runs_out(tmp_path):
    import io
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    out = io.StringIO()
    supervisor, now = _supervisor(str(hostfile), 25, [{"a"}] * 10, out)
    assert supervisor._loop() == 1
    assert now[0] == 25.0                                   # 10 + 10 + the 5 s left
    assert "not starting: the hosts that answer hold 1 rank, fewer than --min-ranks 2" in out.getvalue()
    supervisor, now = _supervisor(str(hostfile), 0, [{"a"}], io.StringIO())
    assert supervisor._loop() == 1 and now[0] == 0.0      # 0: at once, as before


def test_the_world_keeps_the_given_host_order_and_slots_and_one_node_stays_one_node():
    hosts = (("n3", 4), ("n1", 2), ("n2", 4))
    assert choose_world(hosts, {"n2", "n3"}, P) == Decision("relaunch", (("n3", 4), ("n2", 4)))
    assert choose_world(hosts, {"n2", "n3"}, P).ranks == 8
    local = ((None, 2),)
    assert decide(local, Outcome(1, progressed=True), {None}, 0, P).hosts == local


def test_regrow_is_due_only_with_a_dropped_host_after_the_period():
    policy = Policy(3, regrow_every=60)
    assert not regrow_due(59.9, policy, ["b"])
    assert regrow_due(60, policy, ["b"])
    assert not regrow_due(600, policy, [])
    assert not regrow_due(600, Policy(3), ["b"])          # 0: only at restarts
    assert regrow_hosts(["b", "c"], {"a", "c"}) == ["c"]


def test_a_ps_jobs_server_ranks_train_no_rows():
    from hybridps.config import Mode
    assert training_ranks(4, Mode.COLLECTIVE, 1) == 4
    assert training_ranks(4, Mode.PS, 1) == 3
    assert training_ranks(5, "ps", 2) == 3
    assert training_ranks(1, Mode.PS, 1) == 0


def test_restart_figures():
    # 7 steps past the checkpoint of step 40 on 2 ranks of 64 rows: 896 rows trained again
    assert rows_trained_again(47, 40, 128) == 7 * 128
    assert rows_trained_again(40, 40, 128) == 0
    assert rows_trained_again(None, 40, 128) is None
    assert seconds_lost(100.0, 130.0, 152.5) == 52.5          # from the last step line
    assert seconds_lost(None, 130.0, 152.5) == 22.5           # no step line: from the failure
    assert seconds_lost(100.0, 130.0, None) is None
    record = {"restart": 2, "cause": "host b was lost", "hosts_dropped": ["b"], "hosts_taken_back": [],
              "checkpoint_step": 40, "ranks": 1, "seconds_lost": 52.5, "rows_trained_again": 896}
    assert restart_line(record) == ("restart 2: host b was lost; hosts dropped: b; resumed from the "
                                    "checkpoint of step 40 on 1 rank; 52.5 s lost; 896 rows trained again")


def test_the_scanner_keeps_rank_0s_steps_with_their_time_and_the_last_error():
    from hybridps.postmortem import FailureScanner
    now = [10.0]
    scanner = FailureScanner(clock=lambda: now[0])
    scanner.feed("hybridps launch: mpirun -np 2 ...\nstep 41 rank-0 loss 0.5 10 samples/s\n")
    now[0] = 12.0
    scanner.feed("step 42/100 rank-0 loss 0.4 10 samples/s\nTraceback (most recent call last):\n"
                 "RuntimeError: injected failure at step 42 on rank 1\n")
    scanner.feed("[hybridps rank 1/2] error: the stream file a.csv changed\nnot a step 43\n")
    assert (scanner.first_step, scanner.first_step_at, scanner.last_step, scanner.last_step_at) == (41, 10.0, 42, 12.0)
    assert scanner.last_error == "[hybridps rank 1/2] error: the stream file a.csv changed"


# ---------------------------------------------------------------------- checkpoint_every_seconds
class OneRankComm:
    rank, size = 0, 1

    def allgather_object(self, vote):
        return [vote]


def test_wall_clock_checkpoints_fall_due_on_rank_0s_clock_and_restart_when_written(monkeypatch):
    from hybridps import step_control
    now = [100.0]
    monkeypatch.setattr(step_control.time, "monotonic", lambda: now[0])
    control = step_control.StepAgreement(OneRankComm(), checkpoint_every_seconds=10)
    now[0] = 109.9
    assert control.agree(4) == "go" and 5 not in control.checkpoint_points
    now[0] = 110.0
    assert control.agree(5) == "go" and 6 in control.checkpoint_points and 6 in control.timed_points
    assert 6 not in control.delta_points                   # a checkpoint, not a delta
    now[0] = 113.0
    control.checkpoint_written(6)                          # written at 113: the clock restarts
    assert 6 not in control.checkpoint_points
    now[0] = 122.0
    assert control.agree(6) == "go" and 7 not in control.checkpoint_points
    now[0] = 123.0
    assert control.agree(7) == "go" and 8 in control.checkpoint_points


def test_checkpoint_every_seconds_is_validated():
    from hybridps.config import make_config
    from hybridps.errors import ConfigError
    assert make_config().checkpoint_every_seconds == 0.0
    assert make_config(overrides={"checkpoint_every_seconds": 2.5, "checkpoint_dir": "/c"}).checkpoint_every_seconds == 2.5
    with pytest.raises(ConfigError, match="checkpoint_every_seconds.*seconds >= 0"):
        make_config(overrides={"checkpoint_every_seconds": -1, "checkpoint_dir": "/c"})
    with pytest.raises(ConfigError, match="checkpoint_every_seconds' needs checkpoint_dir"):
        make_config(overrides={"checkpoint_every_seconds": 5})
    with pytest.raises(ConfigError, match="checkpoint_every_seconds' runs in collective mode"):
        make_config(overrides={"checkpoint_every_seconds": 5, "checkpoint_dir": "/c", "mode": "ps"})


def test_the_supervisor_refuses_what_it_cannot_restart():
    from argparse import Namespace
    from hybridps.errors import ConfigError
    from hybridps.launch import Environment
    from hybridps.supervisor import Supervisor
    args = Namespace(max_restarts=2, min_ranks=1, regrow_every=0.0, history=None, hostfile=None,
                     hosts=None, num_ranks=1, launcher="auto", bind="none", threads_per_rank=0,
                     launcher_args=[], watchdog_timeout=None)
    from hybridps.config import make_config
    env = Environment(cores=2)
    with pytest.raises(ConfigError, match="needs train's --checkpoint-dir"):
        Supervisor(args, ["train", "--steps", "5"], make_config(), env)
    with pytest.raises(ConfigError, match="supervises a training job"):
        Supervisor(args, ["doctor"], None, env)
    supervisor = Supervisor(args, ["train", "--checkpoint-dir", "/c"],
                            make_config(overrides={"checkpoint_dir": "/c"}), env)
    assert supervisor.program == ["train", "--checkpoint-dir", "/c", "--resume"]
    assert supervisor.all_hosts == ((None, 1),)


def test_the_probe_timeout_flag_reaches_every_probe_and_is_validated(tmp_path, monkeypatch):
    """``--probe-timeout``: the seconds a host has to answer (default 20, the doctor's), given
    to every probe of the hosts; not a positive finite number: refused naming the flag."""
    import hybridps.doctor
    from hybridps.cli import build_parser
    from hybridps.config import make_config
    from hybridps.errors import ConfigError
    from hybridps.launch import Environment
    from hybridps.supervisor import Supervisor
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    parse = build_parser().parse_args
    assert parse(["launch", "--max-restarts", "1", "--", "train"]).probe_timeout == 20.0
    args = parse(["launch", "--hostfile", str(hostfile), "--max-restarts", "1", "--probe-timeout", "4.5",
                  "--", "train"])
    asked = []
    monkeypatch.setattr(hybridps.doctor, "probe_hosts",
                        lambda hosts, environment, launcher, timeout: asked.append((hosts, timeout)) or {"a"})
    config = make_config(overrides={"checkpoint_dir": "/c"})
    supervisor = Supervisor(args, ["train", "--checkpoint-dir", "/c"], config, Environment(cores=2))
    assert supervisor.probe(["a", "b"]) == {"a"} and asked == [(["a", "b"], 4.5)]
    for bad in ("0", "-1", "inf", "nan"):
        args.probe_timeout = float(bad)
        with pytest.raises(ConfigError, match="--probe-timeout > 0"):
            Supervisor(args, ["train", "--checkpoint-dir", "/c"], config, Environment(cores=2))


@pytest.mark.mpi
@pytest.mark.slow
def test_wall_clock_checkpoints_are_written_while_training(tmp_path):
    """30 steps of at least 0.1 s each (a slowed loader): with a checkpoint every 0.5 s at
    least one is written before the end (keep them all to count)."""
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "hybridps.cli", "train", "--steps", "30", "--batch-size", "16",
               "--hidden", "8", "--dim", "4", "--no-progress", "--checkpoint-dir", str(ckpt),
               "--checkpoint-every-seconds", "0.5", "--keep-checkpoints", "100"]
    slowed = {"HYBRIDPS_TEST_LOADER_DELAY_MS": "100", "HYBRIDPS_TEST_DELAY_RANK": "0"}   # testing aid
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, **MPI_ENV, **slowed),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted(int(name.split("-")[1]) for name in os.listdir(ckpt) if name.startswith("ckpt-"))
    assert steps[-1] == 30 and len(steps) >= 2 and all(0 < s < 30 for s in steps[:-1]), steps


@pytest.mark.mpi
@pytest.mark.slow
def test_a_crash_loop_stops_after_max_restarts_with_the_last_error(tmp_path):
    """A job that fails at its first step every time (a bug, not a host): 1 run + 1 restart,
    then the supervisor stops with the error, and the history has the restart. (One restart
    is enough to be a loop: the second failure counts on from the first, with no checkpoint
    between them; the counting itself is the decision table's.)"""
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    history = tmp_path / "history.json"
    command = [sys.executable, "-m", "hybridps.cli", "launch", "-np", "1", "--max-restarts", "1",
               "--history", str(history), "--", "train", "--steps", "20", "--batch-size", "16",
               "--hidden", "8", "--dim", "4", "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--log-every", "1"]
    failing = {"HYBRIDPS_TEST_FAIL_AT_STEP": "0", "HYBRIDPS_TEST_FAIL_RANK": "0"}   # testing aid
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, **MPI_ENV, **failing),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert len(re.findall(r"^hybridps launch: .*mpirun -np 1 ", out, re.MULTILINE)) == 2, out[-4000:]
    assert ("hybridps supervisor: giving up: 2 failures in a row without a new checkpoint "
            "(--max-restarts 1): this looks like a bug or a bad setting, not a lost host; last "
            "error: RuntimeError: injected failure at step 0 on rank 0") in out, out[-4000:]
    restarts = json.loads(history.read_text())["restarts"]
    assert [r["restart"] for r in restarts] == [1]
    assert all(r["checkpoint_step"] == 0 and r["hosts_dropped"] == [] and r["seconds_lost"] is None
               and r["cause"].startswith("RuntimeError: injected failure") for r in restarts)


def test_descendants_finds_the_processes_below_a_launcher():
    from hybridps.supervisor import descendants
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        for _ in range(50):
            found = descendants(child.pid)
            if any(argv[:2] == ["sleep", "30"] for _, argv in found):
                break
            time.sleep(0.1)
        assert any(argv[:2] == ["sleep", "30"] for _, argv in found), found
        assert descendants(os.getpid()) and all(pid != os.getpid() for pid, _ in descendants(os.getpid()))
    finally:
        for pid, _ in descendants(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()


def test_a_training_rank_is_told_from_its_launcher_and_supervisor():
    from hybridps.supervisor import is_training_rank
    assert is_training_rank(["/v/bin/python", "-m", "hybridps.cli", "train", "--steps", "0"])
    assert is_training_rank(["/v/bin/hybridps", "train", "--data", "stream:/s"])
    assert not is_training_rank(["/v/bin/python", "-m", "hybridps.cli", "launch", "--max-restarts", "3",
                                 "--", "train", "--steps", "0"])
    assert not is_training_rank(["mpirun", "-np", "2", "/v/bin/python", "-m", "hybridps.cli", "train"])
    assert not is_training_rank(["/v/bin/python", "-m", "hybridps.cli", "serve"])
