"""Slurm on two hosts of the network-namespace test bed: ``sbatch -N 2`` runs train.sbatch.

Each host of the bed (launch/testbed/netns.py) runs its own slurmd (``slurmd -N <host>``, one
NodeName per host, with the host's address as NodeAddr); slurmctld runs on the first host;
one munged serves both (its socket is a file, and the hosts share the file system). What
mattered beyond a single-node Slurm (tests/test_slurm.py, docs/clusters.md):
  * the rsh agent enters a host with ``nsenter --net`` rather than ``ip netns exec``, which
    mounts a fresh /sys without /sys/fs/cgroup: slurmd then stopped with "No filesystem
    mounted on /sys/fs/cgroup ... slurmd initialization failed";
  * every host needs a /tmp of its own (as real nodes have): with one shared /tmp the second
    slurmstepd failed with "mpi/pmix_v4: pmixp_mkdir: Cannot create directory
    /tmp/spmix_appdir_0_1.0: File exists" and the step was aborted. The Slurm files and the
    job's directory live under /var/tmp, which the hosts share (a cluster's shared file system);
  * per-node SlurmdSpoolDir / SlurmdPidFile / SlurmdLogFile (``%n``), created beforehand.
The test submits train.sbatch with 2 nodes x 1 task, once with ``srun --mpi=pmix`` and once
with ``mpirun`` inside the allocation, and checks that the ranks ran on both hosts (the rank
map, the metrics). Skipped with the reason when Slurm, munge or the bed are missing.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.test_multihost import netns
from tests.test_slurm import DAEMONS, HYBRIDPS_BIN, TRAIN_SBATCH, _tool

pytestmark = [pytest.mark.slurm, pytest.mark.netns, pytest.mark.mpi]

JOB_TIMEOUT_S = 240


class BedSlurm:
    """munged (root namespace) + slurmctld (host 0) + one slurmd per host of ``bed``."""

    def __init__(self, bed):
        self.bed = bed
        self.root = tempfile.mkdtemp(prefix=f"{bed.prefix}-slurm-", dir="/var/tmp")
        os.chmod(self.root, 0o755)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.socket = os.path.join(self.root, "munge", "munge.sock")
        self.procs = {}
        self.env = dict(os.environ, SLURM_CONF=self.conf, **bed.mpi_env())

    def start(self):
        r, bed = self.root, self.bed
        for sub in ["state", "log", "munge", "jobs"] + [f"spool-{h}" for h in bed.hosts]:
            os.makedirs(os.path.join(r, sub))
        os.chmod(os.path.join(r, "munge"), 0o755)
        os.chmod(os.path.join(r, "jobs"), 0o755)
        for host in bed.hosts:                      # a node-local /tmp per host
            tmp = os.path.join(r, f"tmp-{host}")
            os.makedirs(tmp)
            os.chmod(tmp, 0o1777)
            bed.private_dir(host, "/tmp", tmp)
        nodes = "\n".join(f"NodeName={h} NodeAddr={bed.addresses[h]} CPUs=2 State=UNKNOWN" for h in bed.hosts)
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=hybridpsbed
SlurmctldHost={bed.hosts[0]}({bed.addresses[bed.hosts[0]]})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
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
{nodes}
PartitionName=debug Nodes={','.join(bed.hosts)} Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
""")
        key = os.path.join(r, "munge", "munge.key")
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True)
        os.chmod(key, 0o400)
        self._spawn("munged", [_tool("munged"), "-F", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/munged.seed",
                               f"--log-file={r}/log/munged.log"])
        self._wait(lambda: os.path.exists(self.socket), 20, "munged's socket")
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i", "-f", self.conf], host=bed.hosts[0])
        for host in bed.hosts:
            self._spawn(f"slurmd-{host}", [_tool("slurmd"), "-D", "-N", host, "-f", self.conf], host=host)
        self._wait(lambda: self.node_states() == ["idle"] * len(bed.hosts), 60, "every node to be idle")

    def _spawn(self, name, argv, host=None):
        log = open(os.path.join(self.root, "log", f"{name}.console"), "w")
        self.procs[name] = subprocess.Popen(self.bed.command(host, argv) if host else argv, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def client(self, argv, timeout=30, env=None):
        """Run a Slurm client command on host 0 (where slurmctld listens)."""
        return subprocess.run(self.bed.command(self.bed.hosts[0], argv), env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)

    def node_states(self):
        out = self.client(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return out

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self):
        text = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as fh:
                text.append(f"--- {name}\n{fh.read()[-2500:]}")
        return "\n".join(text)

    def stop(self):
        """scontrol shutdown, then end the PIDs started here; the bed's teardown kills whatever
        is left in its namespaces (slurmstepd included)."""
        if all(p.poll() is None for n, p in self.procs.items() if n != "munged"):
            try:
                self.client(["scancel", "--full", "--partition=debug"])
                self.client(["scontrol", "shutdown"])
            except subprocess.TimeoutExpired:
                pass
        for name, proc in self.procs.items():
            if name == "munged" and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def bed_slurm():
    missing = [name for name in DAEMONS if _tool(name) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}); `make test` installs them")
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network-namespace test bed unavailable: {reason}")
    checkout = os.path.realpath(TRAIN_SBATCH)
    if checkout.startswith(os.path.realpath(tempfile.gettempdir()) + os.sep):
        # every bed host mounts a node-local /tmp of its own over the shared one (see above)
        pytest.skip(f"the checkout is under {tempfile.gettempdir()} ({checkout}), which each test-bed "
                    f"host replaces with its own node-local /tmp; clone the repository elsewhere")
    bed = netns.TestBed(hosts=2, slots=1).up()
    cluster = BedSlurm(bed)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        bed.down()
    assert all(p.poll() is not None for p in cluster.procs.values()), "a Slurm daemon survived"


@pytest.mark.parametrize("launcher, expected_command", [
    ("srun", r"srun --mpi=pmix -n 2 --kill-on-bad-exit=1"),
    ("mpirun", r"mpirun -np 2 --bind-to none"),
])
def test_sbatch_two_nodes_runs_train_sbatch_across_hosts(bed_slurm, launcher, expected_command):
    jobs = tempfile.mkdtemp(prefix=f"{launcher}-", dir=os.path.join(bed_slurm.root, "jobs"))
    os.chmod(jobs, 0o755)
    env = dict(bed_slurm.env, HYBRIDPS_BIN=HYBRIDPS_BIN, HYBRIDPS_LAUNCHER=launcher, PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    for name in list(env):
        if name.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_JOB", "SLURM_STEP")):
            del env[name]
    command = ["sh", "-c", f"cd {jobs} && exec sbatch --wait -N 2 --ntasks-per-node=1 --time=00:10:00 "
               f"{TRAIN_SBATCH} --steps 8 --batch-size 64 --hidden 16 --dim 8 --vocab-size 2000 "
               f"--log-every 4 --warmup-steps 2"]
    started = time.monotonic()
    try:
        proc = bed_slurm.client(command, timeout=JOB_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        bed_slurm.client(["scancel", "--full", "--partition=debug"])
        pytest.fail(f"sbatch --wait did not return within {JOB_TIMEOUT_S}s:\n{bed_slurm.logs()}")
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert job_id, f"sbatch did not submit:\n{proc.stdout}\n{proc.stderr}\n{bed_slurm.logs()}"
    job_id = job_id.group(1)
    log_path = os.path.join(jobs, f"hybridps-{job_id}.out")
    log = open(log_path).read() if os.path.exists(log_path) else "(no job log)"
    assert proc.returncode == 0, f"job {job_id} failed:\n{log[-6000:]}\n{bed_slurm.logs()}"
    h0, h1 = bed_slurm.bed.hosts
    assert re.search(expected_command, log), log
    assert re.search(rf"train.sbatch: job {job_id}, 2 tasks on {re.escape(bed_slurm.bed.prefix)}-h\[0-1\]", log), log
    assert f"[hybridps] ranks per host: {h0}=0 {h1}=1" in log, "one rank on each host"
    assert "train.sbatch: training exited with code 0" in log
    metrics = json.loads(open(os.path.join(jobs, f"hybridps-{job_id}", "metrics.json")).read())
    assert metrics["ranks"] == 2 and metrics["steps"] == 8 and len(metrics["loss_trajectory"]) == 8
    print(f"{launcher}: 2-node job {job_id} took {time.monotonic() - started:.1f}s")
