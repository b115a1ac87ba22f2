"""A real single-node Slurm on this machine runs launch/slurm/train.sbatch as a 4-task job.

The module fixture writes a slurm.conf into a temporary directory (one node ``localhost`` with
4 CPUs, oversubscription allowed; see docs/clusters.md, "Slurm on one machine", for what
mattered), makes a munge key, and starts munged, slurmctld and slurmd in the foreground flavour as child
processes, keeping their PIDs; the finalizer runs ``scontrol shutdown`` and then ends those
PIDs (never by name). Each test submits the template with ``sbatch --wait`` (under a timeout)
and checks the job log and the metrics file: once with ``srun --mpi=pmix`` (under the restart
supervisor, HYBRIDPS_MAX_RESTARTS) and once with ``mpirun`` inside the allocation, and once
with a rank killed under the supervisor. The compare template is only checked for syntax and header
(it runs six training jobs). Skipped with the reason when Slurm or munge is not installed
(``.ci/run`` installs them).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from hybridps import testing_hooks
from tests.mpi_util import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

TRAIN_SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")
COMPARE_SBATCH = os.path.join(REPO, "launch", "slurm", "compare.sbatch")
HYBRIDPS_BIN = os.path.join(os.path.dirname(sys.executable), "hybridps")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
JOB_TIMEOUT_S = 240


def _tool(name):
    """Path of a Slurm / munge program (daemons live in sbin, often not on a user's PATH)."""
    found = shutil.which(name)
    for directory in ("/usr/sbin", "/sbin", "/usr/bin"):
        if found is None and os.access(os.path.join(directory, name), os.X_OK):
            found = os.path.join(directory, name)
    return found


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SingleNodeSlurm:
    """munged + slurmctld + slurmd for one node, all files under ``root``."""

    def __init__(self, root):
        self.root = root
        self.procs = {}
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_dir = os.path.join(root, "munge")
        self.socket = os.path.join(self.munge_dir, "munge.sock")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def write_config(self):
        for sub in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.munge_dir, 0o755)       # munged refuses a socket directory others cannot read
        r = self.root
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=hybridpstest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1
MinJobAge=4
NodeName=localhost CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
""")

    def _spawn(self, name, argv):
        log = open(os.path.join(self.root, "log", f"{name}.console"), "w")
        argv = [_tool(argv[0])] + argv[1:]
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def start(self):
        self.write_config()
        key = os.path.join(self.munge_dir, "munge.key")
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True)
        os.chmod(key, 0o400)
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={self.munge_dir}/munged.pid",
                               f"--seed-file={self.munge_dir}/munged.seed",
                               f"--log-file={self.root}/log/munged.log"])
        self._wait(lambda: os.path.exists(self.socket), 20, "munged to create its socket", "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", self.conf])
        self._wait(lambda: self.node_state() == "idle", 60, "the node to become idle", "slurmctld")

    def node_state(self):
        proc = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=self.env,
                              capture_output=True, text=True, timeout=20)
        return proc.stdout.strip()

    def _wait(self, ready, timeout, what, daemon):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self):
        text = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as fh:
                text.append(f"--- {name}\n{fh.read()[-3000:]}")
        return "\n".join(text)

    def stop(self):
        """scontrol shutdown, then TERM / KILL the PIDs this object started (never by name)."""
        slurm = [self.procs[n] for n in ("slurmd", "slurmctld") if n in self.procs]
        if slurm and all(p.poll() is None for p in slurm):
            # Jobs left by a failed test first (their slurmstepd would outlive slurmd).
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30).stdout.strip():
                time.sleep(0.25)
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for proc in slurm + [self.procs[n] for n in ("munged",) if n in self.procs]:
            if proc is self.procs.get("munged") and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def slurm():
    missing = [name for name in DAEMONS if _tool(name) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}); .ci/run installs "
                    f"slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged on this machine needs root")
    root = tempfile.mkdtemp(prefix="hybridps-slurm-")
    cluster = SingleNodeSlurm(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values()), "a Slurm daemon survived"
    shutil.rmtree(root, ignore_errors=True)


def _submit(cluster, tmp_path, launcher, steps, extra_env=None, sbatch_args=(), train_args=(),
            while_running=None, timeout=JOB_TIMEOUT_S):
    """Submit train.sbatch with ``sbatch --wait``; ``while_running(tmp_path)`` is called while
    the job runs (it may end before the job; the job's time limit bounds it)."""
    env = dict(cluster.env, HYBRIDPS_BIN=HYBRIDPS_BIN, HYBRIDPS_LAUNCHER=launcher,
               PYTHONUNBUFFERED="1", **(extra_env or {}))
    for name in list(env):          # a job must not inherit launcher variables of this process
        if name.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_JOB", "SLURM_STEP")):
            del env[name]
    # nor the oversubscription settings (`make test` exports them): the launcher inside the job
    # must choose them itself from ranks versus cores, and the test checks that it did
    for name in ("OMPI_MCA_mpi_yield_when_idle", "OMP_NUM_THREADS", "HYBRIDPS_TF_THREADS"):
        env.pop(name, None)
    command = ["sbatch", "--wait", "--ntasks=4", "--nodes=1", "--time=00:10:00", *sbatch_args,
               TRAIN_SBATCH, "--steps", str(steps), "--batch-size", "64", "--hidden", "16", "--dim",
               "8", "--vocab-size", "2000", "--log-every", "5", "--warmup-steps", "2", *train_args]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            if while_running is not None:
                while_running(tmp_path)
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--full", "--partition=debug"], env=cluster.env, timeout=30)
        pytest.fail(f"sbatch --wait did not return within {timeout}s:\n{cluster.logs()}")
    job_id = re.search(r"Submitted batch job (\d+)", stdout)
    assert job_id, f"sbatch did not submit:\n{stdout}\n{stderr}"
    job_id = job_id.group(1)
    log_path = tmp_path / f"hybridps-{job_id}.out"
    log = log_path.read_text() if log_path.exists() else "(no job log)"
    assert proc.returncode == 0, (f"job {job_id} failed (sbatch exit {proc.returncode}):\n{log[-6000:]}"
                                  f"\n{stderr}\n{cluster.logs()}")
    return job_id, log, tmp_path / f"hybridps-{job_id}", time.monotonic() - started


@pytest.mark.parametrize("launcher, expected_command, supervised", [
    ("srun", r"srun --mpi=pmix -n 4 --kill-on-bad-exit=1", True),
    ("mpirun", r"mpirun -np 4 --oversubscribe --bind-to none", False),
], ids=["srun-under-the-supervisor", "mpirun"])
def test_train_sbatch_runs_a_four_task_job(slurm, tmp_path, launcher, expected_command, supervised):
    """The template as a 4-task job, once with mpirun, once with srun under the restart
    supervisor (HYBRIDPS_MAX_RESTARTS: `hybridps launch --max-restarts` inside the allocation,
    sbatch --no-kill, resuming from the checkpoint directory), which runs it through with no
    restart. (One job for srun and the supervisor: the mpirun job runs the template without.)"""
    steps = 10
    extra = (dict(extra_env={"HYBRIDPS_MAX_RESTARTS": "2"}, sbatch_args=["--no-kill"],
                  train_args=["--checkpoint-dir", str(tmp_path / "ckpt")]) if supervised else {})
    job_id, log, out_dir, seconds = _submit(slurm, tmp_path, launcher, steps, **extra)
    # The job log shows the launch command chosen inside the allocation, and the summary.
    assert re.search(expected_command, log), log
    assert f"train.sbatch: job {job_id}, 4 tasks on localhost" in log
    assert "train.sbatch: training exited with code 0" in log
    assert "OMPI_MCA_mpi_yield_when_idle=1" in log, "4 ranks on this machine's cores oversubscribe"
    assert log.count('"final_loss"') == 1, "only rank 0 prints the summary"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["ranks"] == 4
    assert metrics["steps"] == steps and len(metrics["loss_trajectory"]) == steps
    assert metrics["global_batch_size"] == 4 * 64
    assert 0.0 < metrics["final_loss"] < 5.0
    job = dict(line.split("=", 1) for line in (out_dir / "job.txt").read_text().splitlines())
    assert job["job_id"] == job_id and job["tasks"] == "4" and job["launcher"] == launcher
    if supervised:
        assert re.search(r"srun --mpi=pmix -n 4 --kill-on-bad-exit=1 .* train .* --resume", log), log
        assert "hybridps supervisor: the job finished (exit code 0); 0 restarts, history in " in log, log
    else:
        assert "hybridps supervisor" not in log, log
    print(f"{launcher}: job {job_id} took {seconds:.1f}s")


def test_train_sbatch_supervisor_relaunches_after_a_rank_is_killed(slurm, tmp_path):
    """A rank killed (srun --kill-on-bad-exit ends the step): the supervisor inside the
    allocation relaunches `train --resume` on the node, which answers, and the job finishes."""
    from hybridps.supervisor import is_training_rank
    marker = str(tmp_path / "results")

    def kill_a_rank(directory):
        deadline = time.monotonic() + 400
        logs = []
        while time.monotonic() < deadline:      # the template trains with --no-progress
            logs = list(directory.glob("hybridps-*.out"))
            if (directory / "ckpt" / "ckpt-0000000020").is_dir():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the job wrote no checkpoint of step 20:\n" + (logs[0].read_text()[-4000:] if logs
                                                                       else slurm.logs()))
        for pid in _processes_with(f"HYBRIDPS_OUT_DIR={marker}"):
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode() for a in fh.read().split(b"\0")]
            if is_training_rank(argv):
                os.kill(pid, signal.SIGKILL)          # one rank of this job, by its PID
                return
        pytest.fail("no rank of the job found to kill")

    # rank 0's loader sleeps 50 ms per batch (a testing aid, hybridps.testing_hooks): the 100
    # steps after the checkpoint of step 20 last at least 5 s, on a fast machine too, for the
    # kill to land in, and the resumed run trains at most 100 steps
    slowed = testing_hooks.environment(loader_delay_ms=50, delay_rank=0)
    job_id, log, out_dir, _ = _submit(
        slurm, tmp_path, "srun", 120,
        extra_env={"HYBRIDPS_MAX_RESTARTS": "2", "HYBRIDPS_OUT_DIR": marker, **slowed},
        sbatch_args=["--no-kill"], while_running=kill_a_rank, timeout=900,
        train_args=["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "10"])
    # without step lines (--no-progress) the seconds lost and rows trained again are not known
    assert re.search(r"hybridps supervisor: restart 1: .*; hosts dropped: none; resumed from the "
                     r"checkpoint of step [1-9]\d+ on 4 ranks; \? s lost; \? rows trained again", log), log[-6000:]
    assert "hybridps supervisor: the job finished (exit code 0); 1 restart, history in " in log
    restarts = json.loads((tmp_path / "results" / "restarts.json").read_text())["restarts"]
    assert len(restarts) == 1 and restarts[0]["ranks"] == 4
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["steps"] == 120 and metrics["first_step"] == restarts[0]["checkpoint_step"]


def _processes_with(assignment):
    """PIDs of processes whose environment holds ``assignment`` (NAME=value)."""
    found, wanted = [], assignment.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if wanted in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_compare_sbatch_is_valid_bash_and_documents_what_to_edit():
    for path in (TRAIN_SBATCH, COMPARE_SBATCH):
        subprocess.run(["bash", "-n", path], check=True, timeout=30)
        with open(path) as fh:
            text = fh.read()
        header = text.split("\nset -euo pipefail", 1)[0]
        assert "What to edit" in header and "What it writes" in header
        for directive in ("--nodes", "--ntasks-per-node", "--time", "--output"):
            assert f"#SBATCH {directive}=" in header
    with open(COMPARE_SBATCH) as fh:
        compare = fh.read()
    assert re.search(r'bench compare --ranks "\$RANKS" --out "\$OUT_DIR"', compare)
    for written in ("compare.json", "compare.md", "compare.png"):
        assert written in compare
