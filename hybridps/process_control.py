"""What happens to a rank's process when something goes wrong, installed once per process.

What lives here: :func:`install` (called by hybridps.comm.init with the communicator), which sets
up the excepthook that turns an uncaught exception on any rank (main or helper thread) into an
MPI_Abort of the whole job, so that no rank is left hanging in a collective; the fault handlers
(``faulthandler`` prints the Python stack of a rank that crashes: SIGSEGV, SIGBUS, SIGFPE,
SIGABRT; ``kill -USR1`` on mpirun prints every rank's stack); the SIGTERM handling; and the start
of the collective watchdog with its rank map. What does not: MPI itself (hybridps.comm), the
watchdog's polling and its messages between ranks (hybridps.watchdog), the agreement on when to
stop (hybridps.step_control, which this module only asks to stop).

Signals: a rank killed by a signal (SIGKILL, the OOM killer) is noticed by mpirun (or by srun
with ``--kill-on-bad-exit``), which ends the others. SIGTERM (Slurm before a time limit,
scancel, mpirun forwarding its own) prints one line saying which rank got it and exits with
code 143 (128 + 15) at once, also while the main thread is blocked in MPI: a Python handler
alone would only run after the blocking call returns, so the signal's wake-up byte
(``signal.set_wakeup_fd``) is read by a small thread that reports and exits. Runs that agree
before every step (``--steps 0``, stream data, wall-clock deltas: hybridps.step_control) stop
gracefully instead: the first SIGTERM asks every rank to stop after its current step, write a
checkpoint and exit 0; a second SIGTERM exits at once as above.
"""
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
import traceback

from hybridps import step_control, watchdog
from hybridps.postmortem import format_rank_map


def install(comm):
    """Install the abort-on-error hooks, the signal handling and the watchdog for ``comm``."""
    install_abort_on_error(comm)
    _start_watchdog(comm)


def install_abort_on_error(comm):
    """Make an uncaught exception on any rank (main or helper thread) abort the whole job.

    The failing rank prints its traceback once, prefixed with its rank, then calls
    MPI_Abort; the other ranks are killed by the MPI runtime instead of waiting forever in
    their next collective.
    """
    _install_fault_handlers()
    _install_termination_report(comm)
    if comm.size == 1:
        return

    def report_and_abort(exc_type, exc, tb, where="main thread"):
        watchdog.discard_state()
        if issubclass(exc_type, KeyboardInterrupt):   # Ctrl-C reaches every rank: no tracebacks
            sys.stderr.write(f"[hybridps rank {comm.rank}/{comm.size}] interrupted; aborting the job.\n")
            sys.stderr.flush()
            comm.abort(130)
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[hybridps rank {comm.rank}/{comm.size}] uncaught {exc_type.__name__} "
                         f"in {where}; aborting the whole job.\n{text}")
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = report_and_abort
    threading.excepthook = lambda args: report_and_abort(
        args.exc_type, args.exc_value, args.exc_traceback, where=f"thread {args.thread.name}")


def _install_fault_handlers():
    """Python stacks on a crash (faulthandler) and on SIGUSR1 (mpirun forwards it to every rank)."""
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        except (AttributeError, ValueError, OSError):   # no usable stderr file descriptor
            return
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
        except (AttributeError, ValueError, OSError, RuntimeError):
            pass


_TERMINATION = {"reported": False, "lock": threading.Lock()}


def _install_termination_report(comm):
    """SIGTERM: print which rank got which signal, then exit 128 + signal (see the module doc)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def report(signum):
        with _TERMINATION["lock"]:
            if _TERMINATION["reported"]:
                return
            _TERMINATION["reported"] = True
            # the watchdog state file stays: a job ended from outside may have been stuck, and
            # the file says where this rank was (hybridps.watchdog)
            who = f"[hybridps rank {comm.rank}/{comm.size}]" if comm.size > 1 else "[hybridps]"
            name = signal.Signals(signum).name
            try:
                sys.stderr.write(f"{who} terminated by {name} (signal {signum}: sent by Slurm at a time "
                                 f"limit, scancel or kill, or by mpirun ending the job); exiting with "
                                 f"code {128 + signum}, no checkpoint written since the last one.\n")
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)

    def graceful(signum):
        """The first SIGTERM of a run that can stop at a step boundary: ask, do not exit."""
        if not step_control.graceful_stop_enabled() or step_control.stop_requested():
            return False
        step_control.request_stop("SIGTERM")
        who = f"[hybridps rank {comm.rank}/{comm.size}]" if comm.size > 1 else "[hybridps]"
        sys.stderr.write(f"{who} got SIGTERM: every rank finishes its current step, writes a "
                         f"checkpoint and exits 0 (a second SIGTERM exits at once)\n")
        sys.stderr.flush()
        return True

    def watch(read_fd):
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for _ in range(data.count(signal.SIGTERM)):
                if not graceful(signal.SIGTERM):
                    report(signal.SIGTERM)

    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        # the wake-up byte reaches watch() in every case; this handler only runs where the
        # watcher thread cannot (it is the one that decides between graceful and at once)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (OSError, ValueError, RuntimeError):
        return
    if previous != -1:      # someone else (an event loop) reads the wake-up bytes: keep theirs
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGTERM, lambda signum, frame: graceful(signum) or report(signum))
        return
    threading.Thread(target=watch, args=(read_fd,), name="hybridps-signals", daemon=True).start()


def _start_watchdog(comm):
    """Start this rank's collective watchdog (hybridps.watchdog); nothing to watch on one rank.

    Also learns every rank's host: on more than one host rank 0 prints the rank map
    (hybridps.postmortem reads it back when a host is lost)."""
    if comm.size == 1:
        return
    # One key per job, equal on every rank: names the default directory of watchdog state files.
    job_key = comm.world.bcast(f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
                               if comm.rank == 0 else None, root=0)
    comm.hosts = comm.world.allgather(socket.gethostname())
    if comm.rank == 0 and len(set(comm.hosts)) > 1:
        sys.stderr.write(format_rank_map(comm.hosts) + "\n")
        sys.stderr.flush()
    watchdog.start(comm.rank, comm.size, comm.abort, job_key, peers=watchdog.Peers(comm),
                   hosts=comm.hosts)
