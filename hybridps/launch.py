"""``hybridps launch``: start a job with mpirun, horovodrun or srun, with the right settings.

What lives here: pure command builders (:func:`build_plan` turns a request and a detected
:class:`Environment` into a :class:`LaunchPlan`: argv, environment, and the reasons for each
choice), the pure readers of launcher environment variables (:func:`local_rank_and_size`,
:func:`expand_nodelist`, :func:`slurm_tasks_on_node`), and the small impure edges:
:func:`detect_environment` (which MPI, which launchers, cores, Slurm allocation, root) and
:func:`run_plan` (prints the command, runs it, forwards signals, returns its exit code).
What does not: MPI itself (this module never imports mpi4py) and training.

Settings applied (docs/design.md: The stack, Launch and failure):
  * threads per rank = usable cores of the node // ranks per node (at least 1), as
    ``OMP_NUM_THREADS`` and ``HYBRIDPS_TF_THREADS``;
  * more ranks per node than cores: Open MPI ``--oversubscribe`` and
    ``OMPI_MCA_mpi_yield_when_idle=1`` (otherwise every collective costs a time slice);
  * Open MPI as root: ``--allow-run-as-root``; no binding by default (``--bind-to none
    --map-by slot``, as horovodrun does: TensorFlow sizes its own thread pools), or one block
    of ``threads`` cores per rank with ``bind="core"``;
  * srun: ``--mpi=pmix`` (Open MPI) or ``pmi2`` (MPICH), ``--kill-on-bad-exit=1`` so a rank
    that dies ends the step;
  * Horovod: its stall check shuts Horovod down (every rank then raises, and the job aborts)
    when an allreduce waits longer than the watchdog timeout (at least 30 s) for tensors some
    ranks never send;
  * Open MPI on several hosts (``--hosts`` / ``--hostfile``): TCP keepalive on the connections
    between mpirun and its daemons (``oob_tcp_keepalive_*``: 10 s idle, then 5 probes 2 s
    apart), so a node that dies or drops off the network ends the job within about 20 s
    instead of Open MPI's default of 8 minutes (:func:`run_plan` then names the lost host and
    the ranks that ran there, hybridps.postmortem); and a 4 MiB eager limit for the TCP
    transport (``btl_tcp_eager_limit``, ``btl_tcp_max_send_size``), which doubled two-way
    alltoallv throughput over TCP.
Variables already set in the caller's environment are kept (the user's choice wins).
"""
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from hybridps.errors import ConfigError

from hybridps.hosts import (expand_nodelist, local_rank_and_size, parse_hostfile,  # noqa: F401
                            parse_hosts, slurm_tasks_on_node, _int_or_none)
from hybridps.wording import counted

LAUNCHERS = ("auto", "mpirun", "horovodrun", "srun")
BINDINGS = ("none", "core")
MPI_FLAVORS = ("openmpi", "mpich", "intel", "unknown")
HYBRIDPS_COMMANDS = ("train", "bench", "doctor", "export", "inspect")
DEFAULT_WATCHDOG_TIMEOUT_S = 300.0
# Open MPI on several hosts: a lost node is noticed after 10 s without traffic plus 5
# unanswered probes 2 s apart; messages up to 4 MiB go eagerly over TCP (no rendezvous round
# trip: alltoallv ran at 0.53 of a 1 Gbit/s link in both directions with the default 64 KiB
# limit, at 0.95 with 4 MiB, on the network-namespace test bed).
OPENMPI_MULTI_HOST = {"OMPI_MCA_oob_tcp_keepalive_time": "10", "OMPI_MCA_oob_tcp_keepalive_intvl": "2",
                      "OMPI_MCA_oob_tcp_keepalive_probes": "5",
                      "OMPI_MCA_btl_tcp_eager_limit": str(4 << 20),
                      "OMPI_MCA_btl_tcp_max_send_size": str(4 << 20)}
_SRUN_PLUGIN = {"openmpi": "pmix", "mpich": "pmi2", "intel": "pmi2", "unknown": "pmix"}


@dataclass(frozen=True)
class Environment:
    """Where ``hybridps launch`` runs: found by :func:`detect_environment`, or built by tests."""
    cores: int                                  # usable cores of this node (CPU affinity)
    is_root: bool = False
    mpi_flavor: str = "openmpi"                 # of the mpirun on PATH: one of MPI_FLAVORS
    in_slurm: bool = False                      # inside a Slurm allocation (SLURM_JOB_ID set)
    slurm_ntasks: Optional[int] = None
    slurm_nodes: Tuple[str, ...] = ()           # host names of the allocation
    slurm_tasks_per_node: Optional[int] = None  # tasks on this node of the allocation
    srun_mpi_plugins: Tuple[str, ...] = ()      # `srun --mpi=list`; () when unknown
    mpirun: Optional[str] = "mpirun"            # paths (None: not found)
    horovodrun: Optional[str] = "horovodrun"
    srun: Optional[str] = None
    python: str = "python3"


@dataclass
class LaunchPlan:
    """A command to run: argv, the variables it adds to the environment, and why."""
    launcher: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    ranks: int = 0
    ranks_per_node: int = 0
    threads_per_rank: int = 0
    hosts: List[str] = field(default_factory=list)   # from --hosts / --hostfile
    multi_host: bool = False

    def command_line(self):
        """The plan as one shell line: ``VAR=value ... launcher args`` (copy-pastable)."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in sorted(self.env.items())]
        return " ".join(assignments + [shlex.join(self.argv)])


# ------------------------------------------------------------------ pure readers of the environment


# ------------------------------------------------------------------ the builder
def build_plan(program, env, num_ranks=None, launcher="auto", hosts=None, bind="none",
               threads_per_rank=0, extra_args=(), environ=None, watchdog_timeout=None,
               hostfile=None):
    """Build the command and environment that start ``program`` on ``num_ranks`` ranks.

    Pure: it reads only its arguments (``environ`` is the caller's environment, used to keep
    variables the user already set).

    Args:
        program: argv of one rank, e.g. ``[python, "-m", "hybridps.cli", "train", ...]``.
        env: the detected :class:`Environment`.
        num_ranks: ranks to start; None inside a Slurm allocation means all its tasks.
        launcher: one of LAUNCHERS; "auto" is srun inside a Slurm allocation (when srun and
            a suitable MPI plugin are there), else mpirun.
        hosts: ``"h1:2,h2:2"`` (slots optional), or None for this node / the allocation.
        hostfile: path of an MPI hostfile (instead of ``hosts``), passed to the launcher as
            is; read here (:func:`parse_hostfile`) for the ranks per node and the rank count.
        bind: "none" or "core" (``threads_per_rank`` cores per rank).
        threads_per_rank: 0 = cores of the node // ranks per node.
        extra_args: passed to the launcher before the program.
        environ: mapping of the caller's environment (default: empty).
        watchdog_timeout: seconds; sets Horovod's stall shutdown (default 300, at least 30).
    Returns:
        LaunchPlan.
    Raises:
        ConfigError: an impossible request (srun outside Slurm, a missing launcher, no rank
            count, core binding with more ranks than cores ...), saying what to do instead.
    """
    environ = dict(environ or {})
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: allowed {', '.join(LAUNCHERS)}")
    if bind not in BINDINGS:
        raise ConfigError(f"--bind {bind!r}: allowed {', '.join(BINDINGS)}")
    if not program:
        raise ConfigError("nothing to launch; e.g. hybridps launch -np 2 -- train --steps 100")
    notes = []
    if hostfile and launcher == "auto":
        launcher = "mpirun"
        notes.append("launcher mpirun: a hostfile was given")
    launcher = _choose_launcher(launcher, env, notes)
    if hostfile and hosts:
        raise ConfigError("give either --hosts or --hostfile, not both")
    if hostfile and launcher == "srun":
        raise ConfigError("--hostfile does not apply to srun: it runs on the nodes of the Slurm "
                          "allocation (use --hosts to pick some of them, or --launcher mpirun)")
    host_slots = parse_hostfile(hostfile) if hostfile else parse_hosts(hosts)
    if num_ranks is None and hostfile and all(s for _, s in host_slots):
        num_ranks = sum(s for _, s in host_slots)
        notes.append(f"{counted(num_ranks, 'rank')}: the slots of {hostfile}")
    if num_ranks is None:
        if not env.slurm_ntasks:
            raise ConfigError("give the number of ranks with -np N (outside a Slurm allocation "
                              "there is no task count to default to)")
        num_ranks = env.slurm_ntasks
        notes.append(f"{counted(num_ranks, 'rank')}: the tasks of this Slurm allocation (SLURM_NTASKS)")
    if num_ranks < 1:
        raise ConfigError(f"-np {num_ranks}: need at least 1 rank")
    if not host_slots and launcher == "horovodrun" and len(env.slurm_nodes) > 1:
        per_node = env.slurm_tasks_per_node or math.ceil(num_ranks / len(env.slurm_nodes))
        host_slots = [(h, per_node) for h in env.slurm_nodes]
        notes.append("hosts: the nodes of this Slurm allocation")
    if host_slots:
        even = math.ceil(num_ranks / len(host_slots))
        host_slots = [(h, s or even) for h, s in host_slots]
        if sum(s for _, s in host_slots) < num_ranks:
            source = f"--hostfile {hostfile}" if hostfile else f"--hosts {hosts!r}"
            raise ConfigError(f"{source} has {sum(s for _, s in host_slots)} slots for "
                              f"{counted(num_ranks, 'rank')}; add hosts or slots (host:slots)")
        ranks_per_node = min(max(s for _, s in host_slots), num_ranks)
    elif env.in_slurm and (env.slurm_tasks_per_node or len(env.slurm_nodes) > 1):
        ranks_per_node = min(env.slurm_tasks_per_node or math.ceil(num_ranks / len(env.slurm_nodes)),
                             num_ranks)
    else:
        ranks_per_node = num_ranks
    cores = max(env.cores, 1)
    threads = threads_per_rank or max(1, cores // ranks_per_node)
    oversubscribed = ranks_per_node > cores
    notes.append(f"{counted(ranks_per_node, 'rank')} per node on {counted(cores, 'usable core')}: {threads} thread(s) "
                 f"per rank" + (", oversubscribed" if oversubscribed else ""))
    if bind == "core" and ranks_per_node * threads > cores:
        raise ConfigError(f"--bind core needs {ranks_per_node} x {threads} cores per node but "
                          f"{cores} are usable; use --bind none or fewer ranks / threads")

    env_vars = {"OMP_NUM_THREADS": str(threads), "HYBRIDPS_TF_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1"}
    openmpi = env.mpi_flavor == "openmpi"
    if oversubscribed:
        if openmpi:
            env_vars["OMPI_MCA_mpi_yield_when_idle"] = "1"
        else:
            notes.append(f"{env.mpi_flavor} has no yield-when-idle setting: expect slow collectives "
                         f"with more ranks than cores")
    timeout = watchdog_timeout or DEFAULT_WATCHDOG_TIMEOUT_S
    # Floors of 15 / 30 s: ranks reach Horovod's first broadcast seconds apart at start-up.
    env_vars["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(int(max(15, min(60, timeout / 2))))
    env_vars["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(int(max(30, timeout)))
    multi_host = len({h for h, _ in host_slots}) > 1 or (env.in_slurm and len(env.slurm_nodes) > 1)
    if multi_host and openmpi:
        keepalive = launcher in ("mpirun", "horovodrun")     # srun watches its nodes itself
        env_vars.update({k: v for k, v in OPENMPI_MULTI_HOST.items() if keepalive or "btl_tcp" in k})
        notes.append("several hosts: " + ("TCP keepalive between mpirun and its daemons (a lost "
                                          "node ends the job in about 20 s); " if keepalive else "")
                     + "4 MiB eager limit for Open MPI's TCP transport")
    kept = sorted(name for name in env_vars if name in environ)
    for name in kept:
        del env_vars[name]
    if kept:
        notes.append(f"kept from your environment: {', '.join(kept)}")

    if launcher == "srun":
        argv = _srun_argv(env, num_ranks, host_slots, bind, threads, notes)
    elif launcher == "horovodrun":
        argv = _horovodrun_argv(env, num_ranks, host_slots, bind, threads, oversubscribed)
    elif openmpi:
        argv = _openmpi_argv(env, num_ranks, host_slots, bind, threads, oversubscribed,
                             list(env_vars) + list(kept), environ, hostfile)
    else:
        argv = _hydra_argv(env, num_ranks, host_slots, bind, env_vars, hostfile)
    if launcher == "horovodrun" and hostfile:
        at = argv.index("-H")
        argv[at:at + 2] = ["--hostfile", hostfile]
    argv += list(extra_args) + list(program)
    return LaunchPlan(launcher=launcher, argv=argv, env=env_vars, notes=notes, ranks=num_ranks,
                      ranks_per_node=ranks_per_node, threads_per_rank=threads,
                      hosts=[h for h, _ in host_slots], multi_host=multi_host)


def _choose_launcher(launcher, env, notes):
    if launcher == "auto":
        wanted = _SRUN_PLUGIN[env.mpi_flavor]
        plugin_ok = not env.srun_mpi_plugins or wanted in env.srun_mpi_plugins
        if env.in_slurm and env.srun and plugin_ok:
            notes.append(f"launcher srun: inside a Slurm allocation (srun --mpi={wanted})")
            return "srun"
        launcher = "mpirun"
        notes.append("launcher mpirun" + (": srun or its MPI plugin missing" if env.in_slurm else
                                          ": not inside a Slurm allocation"))
    if launcher == "srun":
        if not env.in_slurm:
            raise ConfigError("--launcher srun needs a Slurm allocation (run it inside sbatch or "
                              "salloc), or use --launcher mpirun")
        if not env.srun:
            raise ConfigError("--launcher srun: srun is not on PATH; use --launcher mpirun")
    if launcher == "mpirun" and not env.mpirun:
        raise ConfigError("mpirun (or mpiexec) is not on PATH: load or install an MPI "
                          "(`module load openmpi`, or `make setup`)")
    if launcher == "horovodrun":
        if not env.horovodrun:
            raise ConfigError("horovodrun not found next to this python or on PATH: install "
                              "horovod (`make setup`), or use --launcher mpirun")
        if not env.mpirun:
            raise ConfigError("horovodrun needs mpirun on PATH (this Horovod is built with MPI, "
                              "without Gloo)")
    return launcher


def _binding_words(bind, threads, dash="--"):
    if bind == "core":
        return [f"{dash}bind-to", "core", f"{dash}map-by", f"slot:PE={threads}"]
    return [f"{dash}bind-to", "none", f"{dash}map-by", "slot"]


def _openmpi_argv(env, num_ranks, host_slots, bind, threads, oversubscribed, exported, environ,
                  hostfile=None):
    argv = [env.mpirun, "-np", str(num_ranks)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    elif host_slots:
        argv += ["--host", ",".join(f"{h}:{s}" for h, s in host_slots)]
    if oversubscribed:
        argv.append("--oversubscribe")
    argv += _binding_words(bind, threads)
    if env.is_root:
        argv.append("--allow-run-as-root")
    names = list(exported)
    if host_slots:   # remote ranks start with a fresh environment: carry the software stack
        names += [n for n in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV") if n in environ]
        # and hybridps' own settings (the signing key file, the watchdog directory, ...)
        names += sorted(n for n in environ if n.startswith("HYBRIDPS_") and n not in names)
    for name in names:
        argv += ["-x", name]
    return argv


def _hydra_argv(env, num_ranks, host_slots, bind, env_vars, hostfile=None):
    argv = [env.mpirun, "-n", str(num_ranks)]
    if hostfile:
        argv += ["-f", hostfile]
    elif host_slots:
        argv += ["-hosts", ",".join(f"{h}:{s}" for h, s in host_slots)]
    argv += ["-bind-to", "core" if bind == "core" else "none"]
    for name, value in sorted(env_vars.items()):
        argv += ["-genv", name, value]
    return argv


def _horovodrun_argv(env, num_ranks, host_slots, bind, threads, oversubscribed):
    hosts = ",".join(f"{h}:{s}" for h, s in host_slots) if host_slots else f"localhost:{num_ranks}"
    argv = [env.horovodrun, "-np", str(num_ranks), "-H", hosts, "--mpi"]
    if bind == "core":
        argv += ["--binding-args", " ".join(_binding_words(bind, threads, dash="-"))]
    if oversubscribed and env.mpi_flavor == "openmpi" and host_slots:
        argv += ["--mpi-args", "--oversubscribe"]
    return argv


def _srun_argv(env, num_ranks, host_slots, bind, threads, notes):
    plugin = _SRUN_PLUGIN[env.mpi_flavor]
    argv = [env.srun, f"--mpi={plugin}", "-n", str(num_ranks), "--kill-on-bad-exit=1",
            "--cpu-bind=" + ("cores" if bind == "core" else "none")]
    if host_slots:
        argv += ["--nodelist", ",".join(h for h, _ in host_slots)]
    if env.slurm_ntasks and num_ranks > env.slurm_ntasks:
        argv.append("--overcommit")
        notes.append(f"{counted(num_ranks, 'rank')} in an allocation of {counted(env.slurm_ntasks, 'task')}: --overcommit")
    return argv


def hybridps_program(args, python=None):
    """argv of one rank: a hybridps subcommand through this python, or a program as given."""
    if args and args[0] in HYBRIDPS_COMMANDS:
        return [python or sys.executable, "-m", "hybridps.cli"] + list(args)
    return list(args)


# ------------------------------------------------------------------ impure edges
def detect_environment(environ=None):
    """Probe this node: cores, root, which MPI is on PATH, launchers, the Slurm allocation."""
    environ = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    mpirun = shutil.which("mpirun", path=environ.get("PATH")) or shutil.which("mpiexec", path=environ.get("PATH"))
    sibling = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    horovodrun = sibling if os.access(sibling, os.X_OK) else shutil.which("horovodrun", path=environ.get("PATH"))
    srun = shutil.which("srun", path=environ.get("PATH"))
    in_slurm = bool(environ.get("SLURM_JOB_ID"))
    return Environment(
        cores=cores, is_root=os.geteuid() == 0, mpi_flavor=mpi_flavor(mpirun),
        in_slurm=in_slurm,
        slurm_ntasks=_int_or_none(environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")) if in_slurm else None,
        slurm_nodes=tuple(expand_nodelist(environ.get("SLURM_JOB_NODELIST", ""))) if in_slurm else (),
        slurm_tasks_per_node=slurm_tasks_on_node(environ) if in_slurm else None,
        srun_mpi_plugins=_srun_plugins(srun) if in_slurm and srun else (),
        mpirun=mpirun, horovodrun=horovodrun, srun=srun, python=sys.executable)


def mpi_flavor(mpirun):
    """"openmpi", "mpich", "intel" or "unknown", from ``mpirun --version``."""
    if not mpirun:
        return "unknown"
    text = _probe([mpirun, "--version"])
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "HYDRA" in text or "MPICH" in text.upper():
        return "mpich"
    return "unknown"


def _srun_plugins(srun):
    text = _probe([srun, "--mpi=list"])
    return tuple(sorted(set(re.findall(r"^\s*(?:srun:\s*)?(none|pmi2|pmix[\w.]*|cray_shasta)\s*$",
                                       text, re.MULTILINE))))


def _probe(argv):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


_FORWARDED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def print_plan(plan, stream=None):
    """The plan's notes, then its command line, each as a ``hybridps launch:`` line."""
    stream = stream or sys.stdout
    for note in plan.notes:
        stream.write(f"hybridps launch: {note}\n")
    stream.write(f"hybridps launch: {plan.command_line()}\n")
    stream.flush()


class RunningJob:
    """A started plan: the launcher's process and, when its stderr is scanned, the
    hybridps.postmortem scanner that reads it as it passes through unchanged."""

    def __init__(self, child, scanner=None):
        self.child, self.scanner = child, scanner
        self.copier = None
        if scanner is not None:
            self.copier = threading.Thread(target=_copy_stderr, args=(child.stderr, scanner), daemon=True)
            self.copier.start()

    def exit_code(self, code):
        """The launcher's exit code as a shell gives it (128 + the signal that killed it)."""
        return 128 - code if code < 0 else code

    def drain(self):
        """After the launcher exited: wait for the rest of its stderr to be scanned."""
        if self.copier is not None:
            self.copier.join(timeout=10)


def start_plan(plan, scan=None):
    """Start the plan's command; its stderr passes through a scanner (hybridps.postmortem)
    when ``scan`` is true (default: on several hosts). Returns a :class:`RunningJob`.

    Raises:
        ConfigError: the launcher could not be started.
    """
    scan = plan.multi_host if scan is None else scan
    try:
        if scan:
            from hybridps.postmortem import FailureScanner
            child = subprocess.Popen(plan.argv, env=dict(os.environ, **plan.env), stderr=subprocess.PIPE)
            return RunningJob(child, FailureScanner())
        return RunningJob(subprocess.Popen(plan.argv, env=dict(os.environ, **plan.env)))
    except OSError as exc:
        raise ConfigError(f"could not start {plan.argv[0]}: {exc}") from None


def run_plan(plan, stream=None, dry_run=False):
    """Print the plan (notes, then the command line) and run it; returns its exit code.

    SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to this process are passed on to the launcher
    (mpirun forwards SIGUSR1/2 to every rank: ``kill -USR1`` prints each rank's Python stack).
    Ctrl-C reaches the launcher through the terminal's process group. A launcher killed by a
    signal gives 128 + the signal number.

    On several hosts the launcher's stderr passes through a pipe, unchanged, into
    hybridps.postmortem's scanner: when the job fails because a host was lost, a last line
    names the host and the ranks that ran there.
    """
    print_plan(plan, stream)
    if dry_run:
        return 0
    job = start_plan(plan)
    previous = {}

    def forward(signum, _frame):
        job.child.send_signal(signum)

    for name in _FORWARDED_SIGNALS:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, forward)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = job.exit_code(job.child.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if job.scanner is not None:
        job.drain()
        for line in job.scanner.summary(code):
            sys.stderr.write(f"hybridps launch: {line}\n")
        sys.stderr.flush()
    return code


def _copy_stderr(pipe, scanner):
    """Pass the launcher's stderr through unchanged (as it arrives) and scan it."""
    out = getattr(sys.stderr, "buffer", None)
    fd = pipe.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode("utf-8", "replace"))
            sys.stderr.flush()
        scanner.feed(data.decode("utf-8", "replace"))
    pipe.close()


def add_arguments(parser):
    """The flags of ``hybridps launch``."""
    parser.add_argument("-np", "-n", "--np", dest="num_ranks", type=int,
                        help="number of ranks (default inside Slurm: all tasks of the allocation)")
    parser.add_argument("--hosts", "-H", help="host list, e.g. node1:4,node2:4 (default: this node "
                                              "or the Slurm allocation)")
    parser.add_argument("--hostfile", help="MPI hostfile ('host slots=N' lines); -np defaults to "
                                           "its slots")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                        help="auto: srun inside a Slurm allocation, else mpirun")
    parser.add_argument("--bind", choices=BINDINGS, default="none",
                        help="none (default) or core: a block of threads-per-rank cores per rank")
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="OMP_NUM_THREADS and TF threads per rank (default cores / ranks per node)")
    parser.add_argument("--watchdog-timeout", type=float,
                        help="seconds before Horovod's stall check shuts a stuck allreduce down "
                             "(default: train's --watchdog-timeout, else HYBRIDPS_WATCHDOG_TIMEOUT, "
                             "else 300)")
    parser.add_argument("--launcher-arg", dest="launcher_args", action="append", default=[],
                        metavar="ARG", help="extra argument for the launcher (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("command_args", nargs="...",
                        help="-- then a hybridps command (train ARGS, doctor, bench ...) or a program")


def main(args):
    """``hybridps launch``: detect, build, print and run; returns the job's exit code."""
    program_args = list(args.command_args)
    if program_args and program_args[0] == "--":
        program_args = program_args[1:]
    from hybridps.config import env_watchdog_timeout
    environment = detect_environment()
    timeout = args.watchdog_timeout or train_watchdog_timeout(program_args) or env_watchdog_timeout()
    plan = build_plan(hybridps_program(program_args), environment, num_ranks=args.num_ranks,
                      launcher=args.launcher, hosts=args.hosts, hostfile=args.hostfile, bind=args.bind,
                      threads_per_rank=args.threads_per_rank, extra_args=args.launcher_args,
                      environ=os.environ, watchdog_timeout=timeout)
    return run_plan(plan, dry_run=args.dry_run)


def train_watchdog_timeout(program_args):
    """The value of ``--watchdog-timeout`` in the launched train flags, or None."""
    for i, arg in enumerate(program_args):
        value = None
        if arg == "--watchdog-timeout" and i + 1 < len(program_args):
            value = program_args[i + 1]
        elif arg.startswith("--watchdog-timeout="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return None          # train itself reports the bad value
    return None
