"""Elastic restarts: ``hybridps launch --max-restarts N ... -- train ...`` keeps a job training
on the hosts it has, from its last checkpoint.

The supervisor is this process, outside the MPI job (it survives the job). It runs the job
(hybridps.launch); when the job fails it names the cause (the postmortem's lost host, else the
last error line, hybridps.postmortem), probes every host (hybridps.doctor.probe_hosts: a
host answers when the launcher starts one process there within ``--probe-timeout`` seconds),
relaunches ``train --resume`` on the hosts that answer, down to ``--min-ranks`` ranks, and
writes one line per restart (cause, hosts dropped, checkpoint step resumed, seconds lost, rows
trained again) to its log and a JSON history (``--history``). A host that answers again is
taken back at the next restart, or at a planned one: every ``--regrow-every`` seconds, when a
dropped host answers, the job gets SIGTERM (every rank finishes its step, checkpoints and exits
0) and is relaunched on every host that answers. ``--max-restarts`` failures in a row (no new
checkpoint between them: a bug, not a host) stop the supervisor with the last error.

What lives here: the decisions, pure (:func:`decide`, :func:`regrow_due`, :func:`regrow_hosts`,
:func:`rows_trained_again`, :func:`seconds_lost`), and :class:`Supervisor`, the thin process
handling around them. What does not: building launch commands (hybridps.launch), reading the
launcher's output (hybridps.postmortem), restoring onto another world size (the checkpoint
does that: any checkpoint restores on any number of ranks, the stream position with it).
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from hybridps.errors import ConfigError
from hybridps.wording import counted

POLL_S = 0.5                     # how often the supervisor looks at a running job
PROBE_EVERY_S = 10.0             # how often it probes the hosts while waiting for enough of them


@dataclass(frozen=True)
class Policy:
    """What the operator allows: restarts in a row, the smallest world, the regrow period."""
    max_restarts: int
    min_ranks: int = 1
    regrow_every: float = 0.0        # seconds; 0: only at restarts
    wait_for_hosts: float = 0.0      # seconds to keep probing when too few hosts answer


@dataclass(frozen=True)
class Outcome:
    """How one run of the job ended, as far as the decision needs it."""
    exit_code: int
    planned: bool = False            # ended by the supervisor's SIGTERM (a planned regrow)
    progressed: bool = False         # wrote a checkpoint newer than the one it started from
    stopped: bool = False            # the operator stopped the supervisor (SIGTERM / Ctrl-C)


@dataclass(frozen=True)
class Decision:
    """What to do next: "done", "relaunch" on ``hosts`` ((host, slots), ...) or "give up"."""
    action: str
    hosts: Tuple[Tuple[str, int], ...] = ()
    failures_in_row: int = 0
    reason: str = ""
    short_of_hosts: bool = False     # a "give up" because too few hosts answer (worth waiting)

    @property
    def ranks(self):
        return sum(slots for _, slots in self.hosts)


def choose_world(all_hosts, answering, policy):
    """The next world: the hosts that answer, in their given order, or a "give up" Decision
    when they hold fewer than ``policy.min_ranks`` ranks."""
    hosts = tuple((h, s) for h, s in all_hosts if h in answering)
    ranks = sum(s for _, s in hosts)
    if ranks < policy.min_ranks:
        silent = [h for h, _ in all_hosts if h not in answering]
        return Decision("give up", hosts, 0,
                        f"the hosts that answer hold {counted(ranks, 'rank')}, fewer than "
                        f"--min-ranks {policy.min_ranks} (not answering: {', '.join(silent) or 'none'})",
                        short_of_hosts=True)
    return Decision("relaunch", hosts)


def decide(all_hosts, outcome, answering, failures_in_row, policy, cause=""):
    """The next step after a run ended (pure: the table of tests/test_supervisor.py).

    Args:
        all_hosts: ((host, slots), ...) the job may use, in order.
        outcome: the run's :class:`Outcome`.
        answering: the hosts that answered the probe after it.
        failures_in_row: failed runs before this one since the last progress.
        policy: :class:`Policy`.
        cause: what the run failed of, for the give-up reason.
    Returns:
        Decision. A run that failed counts one more failure in a row, or the first one when
        it wrote a new checkpoint (it trained: a host was lost, not a bug); more than
        ``max_restarts`` in a row gives up. A run that finished (exit 0, not planned), or
        that the operator stopped, is done. Otherwise the world is the hosts that answer.
    """
    if outcome.stopped:
        return Decision("done", (), failures_in_row, "stopped by a signal to the supervisor")
    if outcome.exit_code == 0 and not outcome.planned:
        return Decision("done", (), 0, "the job finished")
    failures = 0
    if outcome.exit_code != 0:
        failures = 1 if outcome.progressed else failures_in_row + 1
        if failures > policy.max_restarts:
            loop = (": this looks like a bug or a bad setting, not a lost host" if failures > 1 else "")
            return Decision("give up", (), failures,
                            f"{counted(failures, 'failure')} in a row without a new checkpoint "
                            f"(--max-restarts {policy.max_restarts}){loop}; last error: "
                            f"{cause or 'unknown'}")
    world = choose_world(all_hosts, answering, policy)
    return Decision(world.action, world.hosts, failures, world.reason, world.short_of_hosts)


def keep_waiting(decision, waited_s, policy):
    """Whether to probe again instead of giving up: too few hosts answer and the
    ``--wait-for-hosts`` period has not run out (a rebooting node comes back)."""
    return decision.short_of_hosts and waited_s < policy.wait_for_hosts


def regrow_due(since_check_s, policy, dropped):
    """Whether to look for dropped hosts now: some are dropped and the regrow period passed
    since the last look."""
    return bool(policy.regrow_every and dropped and since_check_s >= policy.regrow_every)


def regrow_hosts(dropped, answering):
    """The dropped hosts a planned restart takes back: those that answer."""
    return [h for h in dropped if h in answering]


def training_ranks(ranks, mode, num_servers):
    """How many of ``ranks`` train: all of them, except the last ``num_servers`` in ps mode."""
    return max(ranks - num_servers, 0) if str(getattr(mode, "value", mode)) == "ps" else ranks


def rows_trained_again(last_step, checkpoint_step, rows_per_step):
    """Rows the lost run trained after the checkpoint it is resumed from (they are trained
    again from the checkpoint's model): the steps past it times the global batch; None when
    no step line was seen."""
    if last_step is None:
        return None
    return max(0, last_step - checkpoint_step) * rows_per_step


def seconds_lost(last_step_at, failed_at, first_step_at):
    """From the lost run's last sign of training (its last step line, else the moment its
    failure was seen) to the first step of the next run; None before that step."""
    if first_step_at is None:
        return None
    return max(0.0, first_step_at - (last_step_at if last_step_at is not None else failed_at))


def restart_line(record):
    """The one line the log gets per restart."""
    dropped = ", ".join(record["hosts_dropped"]) or "none"
    back = f"; taken back {', '.join(record['hosts_taken_back'])}" if record["hosts_taken_back"] else ""
    lost = "?" if record["seconds_lost"] is None else f"{record['seconds_lost']:.1f}"
    again = "?" if record["rows_trained_again"] is None else record["rows_trained_again"]
    return (f"restart {record['restart']}: {record['cause']}; hosts dropped: {dropped}{back}; "
            f"resumed from the checkpoint of step {record['checkpoint_step']} on "
            f"{counted(record['ranks'], 'rank')}; {lost} s lost; {again} rows trained again")


# ---------------------------------------------------------------------- the process handling
@dataclass
class _Run:
    job: object
    hosts: tuple
    started_from: int                # checkpoint step it resumed from
    planned: bool = False
    record: Optional[dict] = None    # the restart that started it, until its first step
    failed_at: float = 0.0


class Supervisor:
    """Runs the job and restarts it (module docstring). ``launch_args``: the parsed flags of
    ``hybridps launch``; ``program_args``: ``train ...``."""

    def __init__(self, launch_args, program_args, train_config, environment, out=None,
                 clock=time.monotonic, sleep=time.sleep):
        from hybridps.hosts import parse_hostfile, parse_hosts
        self.args, self.environment, self.clock, self.sleep = launch_args, environment, clock, sleep
        self.out = out or sys.stdout
        if not program_args or program_args[0] != "train":
            raise ConfigError("--max-restarts supervises a training job: hybridps launch "
                              "--max-restarts N ... -- train --checkpoint-dir DIR ...")
        self.config = train_config
        if not self.config.checkpoint_dir:
            raise ConfigError("--max-restarts needs train's --checkpoint-dir: a restart resumes "
                              "from the last checkpoint (add --checkpoint-every-seconds to bound "
                              "the work lost)")
        from hybridps.doctor import PROBE_TIMEOUT_S
        wait_for_hosts = getattr(launch_args, "wait_for_hosts", 0.0)
        self.probe_timeout = getattr(launch_args, "probe_timeout", PROBE_TIMEOUT_S)
        if (launch_args.max_restarts < 0 or launch_args.min_ranks < 1 or launch_args.regrow_every < 0
                or wait_for_hosts < 0 or not 0 < self.probe_timeout < math.inf):
            raise ConfigError("--max-restarts must be >= 0, --min-ranks >= 1, --regrow-every >= 0, "
                              "--wait-for-hosts >= 0, --probe-timeout > 0")
        self.program = list(program_args) + ([] if "--resume" in program_args else ["--resume"])
        self.policy = Policy(launch_args.max_restarts, launch_args.min_ranks, launch_args.regrow_every,
                             wait_for_hosts)
        pairs = (parse_hostfile(launch_args.hostfile) if launch_args.hostfile
                 else parse_hosts(launch_args.hosts) if launch_args.hosts
                 else [(h, environment.slurm_tasks_per_node) for h in environment.slurm_nodes])
        if pairs:
            even = math.ceil((launch_args.num_ranks or environment.slurm_ntasks or len(pairs)) / len(pairs))
            self.all_hosts = tuple((h, s or even) for h, s in pairs)
        else:          # this node only: nothing to probe or drop
            if not launch_args.num_ranks:
                raise ConfigError("give the number of ranks with -np N")
            self.all_hosts = ((None, launch_args.num_ranks),)
        self.history = []
        self.stop_requested = False
        self._current = None             # the run under way
        self.last_regrow_check = 0.0

    # ------------------------------------------------------------------ edges
    def say(self, text):
        self.out.write(f"hybridps supervisor: {text}\n")
        self.out.flush()

    def probe(self, hosts):
        if hosts == [None]:
            return {None}
        from hybridps.doctor import probe_hosts
        return probe_hosts(hosts, self.environment, launcher=self.args.launcher,
                           timeout=self.probe_timeout)

    def checkpoint_step(self):
        from hybridps.checkpoint.manager import find_resume_point
        return find_resume_point(self.config.checkpoint_dir).step

    def rows_per_step(self, ranks):
        """The global batch of a run on ``ranks`` ranks: every rank trains, except a ps-mode
        job's server ranks."""
        return self.config.batch_size * training_ranks(ranks, self.config.mode, self.config.num_servers)

    def write_history(self):
        if self.args.history:
            tmp = self.args.history + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"restarts": self.history}, fh, indent=2)
            os.replace(tmp, self.args.history)

    def start(self, hosts):
        from hybridps import launch
        named = [h for h, _ in hosts if h is not None]
        plan = launch.build_plan(
            launch.hybridps_program(self.program), self.environment,
            num_ranks=sum(s for _, s in hosts), launcher=self.args.launcher,
            hosts=",".join(f"{h}:{s}" for h, s in hosts) if named else None,
            bind=self.args.bind, threads_per_rank=self.args.threads_per_rank,
            extra_args=self.args.launcher_args, environ=os.environ,
            watchdog_timeout=self.args.watchdog_timeout or self.config.watchdog_timeout)
        launch.print_plan(plan, self.out)
        job = launch.start_plan(plan, scan=True)
        job.scanner.clock = self.clock
        return job

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Supervise until the job finishes, the operator stops it, or restarts give up;
        returns the exit code (the job's, or the last failure's)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum, _frame):
        self.stop_requested = True
        run = self._current
        if run is not None:
            stop_gracefully(run.job.child)       # the job checkpoints and ends

    def _wait_for_hosts(self, decide_now):
        """``decide_now(answering)`` until it relaunches, or gives up for another reason than
        too few hosts, or ``--wait-for-hosts`` runs out; probes every PROBE_EVERY_S meanwhile."""
        hosts = [h for h, _ in self.all_hosts]
        started = self.clock()
        decision = decide_now(self.probe(hosts))
        while keep_waiting(decision, self.clock() - started, self.policy) and not self.stop_requested:
            left = self.policy.wait_for_hosts - (self.clock() - started)
            self.say(f"waiting for hosts: {decision.reason}; probing again in {PROBE_EVERY_S:.0f} s "
                     f"({left:.0f} s of --wait-for-hosts left)")
            self.sleep(min(PROBE_EVERY_S, max(left, 0.0)))
            decision = decide_now(self.probe(hosts))
        return decision

    def _loop(self):
        world = self._wait_for_hosts(lambda answering: choose_world(self.all_hosts, answering, self.policy))
        if world.action != "relaunch":
            self.say(f"not starting: {world.reason}")
            return 1
        failures, restarts = 0, 0
        run = self._launch(world.hosts, record=None)
        while True:
            code = self._watch(run)
            cause = self._cause(run, code)
            step = self.checkpoint_step()
            outcome = Outcome(code, planned=run.planned, progressed=step > run.started_from,
                              stopped=self.stop_requested)
            decision = self._wait_for_hosts(lambda answering: decide(
                self.all_hosts, outcome, answering, failures, self.policy, cause))
            if decision.action == "done":
                self.write_history()
                self.say(f"{decision.reason} (exit code {code}); "
                         f"{counted(restarts, 'restart')}" + (f", history in {self.args.history}"
                                                              if self.args.history else ""))
                return code
            if decision.action == "give up":
                self.say(f"giving up: {decision.reason}")
                self.write_history()
                return code or 1
            failures, restarts = decision.failures_in_row, restarts + 1
            scanner = run.job.scanner
            before = {h for h, _ in run.hosts}
            after = {h for h, _ in decision.hosts}
            record = {
                "restart": restarts, "time_unix": time.time(), "planned": run.planned,
                "cause": cause, "exit_code": code,
                "hosts_dropped": sorted(h for h in before - after if h is not None),
                "hosts_taken_back": sorted(h for h in after - before if h is not None),
                "hosts": [h for h, _ in decision.hosts if h is not None], "ranks": decision.ranks,
                "checkpoint_step": step, "last_step_trained": scanner.last_step,
                "rows_trained_again": rows_trained_again(
                    scanner.last_step, step, self.rows_per_step(sum(s for _, s in run.hosts))),
                "failures_in_row": failures, "seconds_lost": None,
                "_last_step_at": scanner.last_step_at, "_failed_at": run.failed_at}
            run = self._launch(decision.hosts, record)

    def _launch(self, hosts, record):
        started_from = self.checkpoint_step()
        run = _Run(self.start(hosts), tuple(hosts), started_from, record=record)
        self._current = run
        self.last_regrow_check = self.clock()
        if self.stop_requested:
            stop_gracefully(run.job.child)
        return run

    def _watch(self, run):
        """Wait for the run to end: finish the restart record at its first step, and start a
        planned restart when a dropped host answers again."""
        while True:
            code = run.job.child.poll()
            if run.record is not None and run.job.scanner.first_step_at is not None:
                self._record_done(run)
            if code is not None:
                run.failed_at = self.clock()
                run.job.drain()
                if run.record is not None:
                    self._record_done(run)
                return run.job.exit_code(code)
            dropped = [h for h, _ in self.all_hosts if h not in {x for x, _ in run.hosts}]
            if not run.planned and regrow_due(self.clock() - self.last_regrow_check, self.policy, dropped):
                back = regrow_hosts(dropped, self.probe(dropped))
                self.last_regrow_check = self.clock()
                if back:
                    self.say(f"{', '.join(back)} answer(s) again: planned restart (SIGTERM: "
                             f"final checkpoint, then relaunch on every host that answers)")
                    run.planned = True
                    stop_gracefully(run.job.child)
            time.sleep(POLL_S)

    def _record_done(self, run):
        record = run.record
        record["seconds_lost"] = seconds_lost(record.pop("_last_step_at"), record.pop("_failed_at"),
                                              run.job.scanner.first_step_at)
        run.record = None
        self.history.append(record)
        self.say(restart_line(record))
        self.write_history()

    def _cause(self, run, code):
        if run.planned and code == 0:
            return "planned restart to take hosts back"
        if self.stop_requested:
            return "stopped by a signal"
        scanner = run.job.scanner
        lost = scanner.summary(code)
        if lost:
            for line in lost:
                sys.stderr.write(f"hybridps launch: {line}\n")
            return "; ".join(f"host {h} was lost" for h in scanner.lost_hosts)
        if code == 0:
            return "finished"
        return (scanner.last_error or "").rstrip(".") or f"the job exited with code {code}"


def stop_gracefully(launcher):
    """SIGTERM to the job's ranks on this node (one is enough: every rank of a run that agrees
    before each step then finishes its step, checkpoints and exits 0), else to the launcher.
    Not to mpirun when a rank is here: Open MPI 4.1's mpirun kills the ranks one second after
    forwarding a SIGTERM, which a final checkpoint may not fit in."""
    ranks = [pid for pid, argv in descendants(launcher.pid) if is_training_rank(argv)]
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not ranks:
        launcher.send_signal(signal.SIGTERM)


def is_training_rank(argv):
    """Whether ``argv`` is a rank of ``hybridps train`` (``python -m hybridps.cli train ...`` or
    ``.../hybridps train ...``), not a launcher or supervisor whose arguments name it."""
    for i, arg in enumerate(argv[:3]):
        if (arg == "hybridps.cli" or arg.endswith("/hybridps")) and argv[i + 1:i + 2] == ["train"]:
            return True
    return False


def descendants(pid):
    """[(pid, argv)] of the processes below ``pid`` on this node (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append((int(entry), argv))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def add_arguments(parser):
    """The supervisor's flags of ``hybridps launch``."""
    from hybridps.doctor import PROBE_TIMEOUT_S
    group = parser.add_argument_group("elastic restarts (a supervisor around the job)")
    group.add_argument("--max-restarts", type=int, default=None, metavar="N",
                       help="supervise the job: after a failure relaunch it with --resume on the "
                            "hosts that answer; stop after N failures in a row without a new "
                            "checkpoint")
    group.add_argument("--min-ranks", type=int, default=1, metavar="M",
                       help="with --max-restarts: give up when the hosts that answer hold fewer "
                            "ranks (1)")
    group.add_argument("--wait-for-hosts", type=float, default=0.0, metavar="SECONDS",
                       help="with --max-restarts: when the hosts that answer hold fewer than "
                            "--min-ranks ranks, keep probing them every 10 s for up to SECONDS "
                            "before giving up (a rebooting node comes back; 0: give up at once)")
    group.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT_S, metavar="SECONDS",
                       help="with --max-restarts: a host answers the probe after a failure (and "
                            "at --wait-for-hosts and --regrow-every) when the launcher starts one "
                            "process there within SECONDS (%(default)g); a host whose link is down costs "
                            "the whole period at every probe")
    group.add_argument("--regrow-every", type=float, default=0.0, metavar="SECONDS",
                       help="with --max-restarts: every SECONDS, if a dropped host answers again, "
                            "SIGTERM the job (final checkpoint) and relaunch it on every host (0: "
                            "hosts come back only at the next restart)")
    group.add_argument("--history", metavar="FILE",
                       help="with --max-restarts: the JSON history of the restarts")


def main(launch_args, program_args, train_config):
    """``hybridps launch --max-restarts N ... -- train ...``: supervise; returns the exit code.
    ``train_config``: the TrainConfig of the ``train`` flags (hybridps.cli makes it)."""
    from hybridps.launch import detect_environment
    return Supervisor(launch_args, program_args, train_config, detect_environment()).run()
