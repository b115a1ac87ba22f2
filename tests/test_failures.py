"""A failing rank ends the whole job promptly; a stuck collective trips the watchdog.

Each scenario is a real 2- or 3-rank job; every wait is bounded: a job still running when the
wait after the failure (the failing rank's message, or the SIGKILL) runs out fails the test as
a hang. How long the job took to end is printed, not asserted (a loaded machine is slow):
  * a rank raising mid-run (``HYBRIDPS_TEST_FAIL_AT_STEP``, hybridps.testing_hooks) -> non-zero exit, the error
    printed once;
  * a rank killed with SIGKILL (as the OOM killer does) -> non-zero exit;
  * a collective that one rank never joins (a small script on hybridps.comm; and the trainer
    with one rank's data loader delayed) -> the watchdog prints where every rank is, once,
    and aborts the job with exit code 124.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from hybridps import testing_hooks
from tests.mpi_util import MPI_ENV, REPO, mpirun_available

pytestmark = pytest.mark.mpi

HYBRIDPS = os.path.join(os.path.dirname(sys.executable), "hybridps")
TRAIN_SMALL = ["train", "--steps", "100000", "--batch-size", "64", "--hidden", "16", "--dim", "8",
               "--vocab-size", "2000"]
WATCHDOG_EXIT_CODE = 124


class Job:
    """A launched job whose merged output is read line by line with arrival times."""

    def __init__(self, argv, env=None, cwd=REPO):
        if not mpirun_available():
            pytest.skip("mpirun not on PATH (run `make setup`)")
        self.marker = uuid.uuid4().hex
        full_env = dict(os.environ, **MPI_ENV, HYBRIDPS_TEST_MARKER=self.marker, **(env or {}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []                 # (monotonic time, line)
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append((time.monotonic(), line))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self):
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern, timeout):
        """Arrival time of the first output line matching ``pattern`` (fails after timeout)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = 0
        with self.changed:
            while True:
                for when, line in self.lines[seen:]:
                    if regex.search(line):
                        return when
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    self.kill()
                    pytest.fail(f"no output line matching {pattern!r} within {timeout}s:\n{self.output[-6000:]}")
                self.changed.wait(min(remaining, 0.5))

    def wait_exit(self, timeout):
        """(exit code, monotonic exit time); a job still running after ``timeout`` fails the test."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job still running {timeout}s later (hang):\n{self.output[-6000:]}")
        ended = time.monotonic()
        self.reader.join(timeout=10)
        return code, ended

    def kill(self):
        """Kill the process group this test started (its own session), if still alive."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def rank_pid(self, rank):
        """PID of the rank of this job, found by the marker in its environment."""
        wanted = (f"HYBRIDPS_TEST_MARKER={self.marker}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except OSError:
                continue
            if all(item in environ for item in wanted):
                return int(entry)
        pytest.fail(f"rank {rank} of the job not found in /proc:\n{self.output[-3000:]}")


def _launch(*train_args, ranks=2):
    return [HYBRIDPS, "launch", "-np", str(ranks), "--launcher", "mpirun", "--"] + list(train_args)


def test_a_rank_raising_mid_run_ends_the_job_within_bound(tmp_path):
    job = Job(_launch(*TRAIN_SMALL, "--no-progress"),
              env={"HYBRIDPS_WATCHDOG_DIR": str(tmp_path / "watchdog"),
                   **testing_hooks.environment(fail_at_step=5, fail_rank=1)})
    failed = job.wait_for(r"RuntimeError: injected failure at step 5 on rank 1", timeout=120)
    code, ended = job.wait_exit(timeout=120)
    print(f"raise: exit {code} {ended - failed:.2f}s after the failure ({ended - job.started:.1f}s in all)")
    assert code != 0
    out = job.output
    assert out.count("[hybridps rank 1/2] uncaught RuntimeError in main thread; aborting the whole job.") == 1
    assert out.count("RuntimeError: injected failure at step 5 on rank 1") == 1
    assert "[hybridps rank 0/2] uncaught" not in out


def test_a_rank_killed_with_sigkill_ends_the_job_within_bound(tmp_path):
    job = Job(_launch(*TRAIN_SMALL, "--log-every", "1"),
              env={"HYBRIDPS_WATCHDOG_DIR": str(tmp_path / "watchdog")})
    job.wait_for(r"^step 5/100000 ", timeout=120)           # rank 0's log: training is under way
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code, ended = job.wait_exit(timeout=120)
    print(f"SIGKILL: exit {code} {ended - killed:.2f}s after the kill ({ended - job.started:.1f}s in all)")
    assert code != 0
    assert re.search(r"rank 1 .*exited on signal 9", job.output), job.output[-3000:]


STUCK_SCRIPT = textwrap.dedent("""
    import time
    from hybridps import comm as comm_module, watchdog

    comm = comm_module.init(with_horovod=False)
    for step in range(3):
        watchdog.set_step(step); comm.barrier()     # the program tells the watchdog its step
    if comm.rank == 0:
        time.sleep(120)                         # rank 0 never joins the next barrier
    for step in range(3, 6):
        watchdog.set_step(step); comm.barrier()
    print("unreachable: the barrier completed", flush=True)
""")


def test_a_collective_one_rank_never_joins_trips_the_watchdog(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_SCRIPT)
    state_dir = tmp_path / "watchdog"
    job = Job(["mpirun", "-np", "3", "--oversubscribe", "--bind-to", "none", sys.executable, str(script)],
              env={"HYBRIDPS_WATCHDOG_TIMEOUT": "2", "HYBRIDPS_WATCHDOG_DIR": str(state_dir)})
    code, ended = job.wait_exit(timeout=60)
    out = job.output
    print(f"stuck barrier: exit {code} after {ended - job.started:.1f}s\n{out}")
    assert code == WATCHDOG_EXIT_CODE, out        # the watchdog ended it, before rank 0 woke
    assert "unreachable" not in out
    headline = re.findall(r"\[hybridps rank ([12])/3\] watchdog: stuck for ([\d.]+)s in barrier \(step 3\) "
                          r"started at \d\d:\d\d:\d\d\.\d{3}", out)
    assert len(headline) == 1, "one stuck rank reports, once"
    assert float(headline[0][1]) >= 2.0                 # at least the watchdog timeout
    assert out.count("watchdog: state of every rank") == 1
    # Rank 0 is the odd one out: not in a collective, sleeping at the line of the script.
    assert re.search(r"rank 0 \(.*pid \d+.*\): not in a collective \(step 2\); last collective barrier "
                     r"ended .*; main thread at stuck\.py:9 <module>", out), out
    for rank in (1, 2):
        assert re.search(rf"rank {rank} \(.*\): in barrier \(step 3\) for [\d.]+s since .* at "
                         rf"comm\.py:\d+ barrier <- stuck\.py:11 <module>", out), out


def test_a_stuck_training_step_trips_the_watchdog(tmp_path):
    slow = testing_hooks.environment(loader_delay_ms=60000.0, delay_rank=0)   # rank 0's first batch: 60 s
    job = Job(_launch(*TRAIN_SMALL, "--no-progress", "--watchdog-timeout", "3"),
              env={"HYBRIDPS_WATCHDOG_DIR": str(tmp_path / "watchdog"), **slow})
    tripped = job.wait_for(r"watchdog: stuck for", timeout=120)
    code, ended = job.wait_exit(timeout=60)
    out = job.output
    print(f"stuck training: exit {code} {ended - tripped:.2f}s after the watchdog message\n{out[-3000:]}")
    assert code == WATCHDOG_EXIT_CODE
    assert re.search(r"\[hybridps rank 1/2\] watchdog: stuck for [\d.]+s in \w+ \(step 0\)", out), out
    assert re.search(r"rank 0 \(.*\): not in a collective \(step 0\)", out), out
    assert re.search(r"rank 1 \(.*\): in \w+ \(step 0\) for [\d.]+s .* at comm\.py:\d+ ", out), out


def test_sigterm_says_which_rank_got_it_and_exits_non_zero(tmp_path):
    """Slurm signals every task of the job at its time limit: both ranks get SIGTERM."""
    job = Job(_launch(*TRAIN_SMALL, "--log-every", "1"),
              env={"HYBRIDPS_WATCHDOG_DIR": str(tmp_path / "watchdog")})
    job.wait_for(r"^step 5/100000 ", timeout=120)
    for rank in (0, 1):
        os.kill(job.rank_pid(rank), signal.SIGTERM)
    sent = time.monotonic()
    code, ended = job.wait_exit(timeout=120)
    out = job.output
    print(f"SIGTERM: exit {code} {ended - sent:.2f}s after the signal\n{out[-2000:]}")
    assert code != 0
    for rank in (0, 1):
        assert out.count(f"[hybridps rank {rank}/2] terminated by SIGTERM (signal 15: sent by Slurm at a time "
                         f"limit, scancel or kill, or by mpirun ending the job); exiting with code 143") == 1, \
            out[-3000:]
    assert "Traceback" not in out


def test_a_stopped_rank_is_reported_as_not_responding_not_with_an_old_stack(tmp_path):
    job = Job(_launch(*TRAIN_SMALL, "--log-every", "1", "--watchdog-timeout", "5"),
              env={"HYBRIDPS_WATCHDOG_DIR": str(tmp_path / "watchdog")})
    job.wait_for(r"^step 5/100000 ", timeout=120)
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGSTOP)
    try:
        job.wait_for(r"watchdog: stuck for", timeout=60)
        code, _ = job.wait_exit(timeout=60)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = job.output
    print(out[-3000:])
    assert code == WATCHDOG_EXIT_CODE
    assert re.search(r"\[hybridps rank 0/2\] watchdog: stuck for [\d.]+s in \w+", out), out[-3000:]
    match = re.search(r"rank 1 \(.*, pid (\d+)\): NO UPDATE for ([\d.]+)s although a running rank refreshes "
                      r"its state every 1\.25s: the rank is stopped \(SIGSTOP, a debugger\) or hung outside "
                      r"Python \(a C call holding the GIL\); the process is stopped \(SIGSTOP/SIGTSTP\)\. Its "
                      r"last state", out)
    assert match and int(match.group(1)) == victim and float(match.group(2)) >= 4.0, out[-3000:]
