"""The one owner of MPI_COMM_WORLD and of Horovod initialization.

What lives here: MPI init (mpi4py, thread level MULTIPLE, because Horovod's background thread
and, for SSP/ASP, hybridps' communication thread call MPI beside the main thread), Horovod init
on the same communicator, rank / size / local rank, alltoallv helpers over numpy buffers
(counts first, then payload; empty sends and receives are normal), and the excepthook that
turns an uncaught exception on any rank into an MPI_Abort of the whole job, so that no rank
is left hanging in a collective. Every collective runs inside ``watchdog.collective(name)``:
one that does not complete within the watchdog timeout aborts the job with a dump of where
each rank is (hybridps.watchdog). What does not: keys, tables, hashing (hybridps.sparse),
launch commands (hybridps.launch).

Signals: a rank killed by a signal (SIGKILL, the OOM killer) is noticed by mpirun (or by srun
with ``--kill-on-bad-exit``), which ends the others. SIGTERM (Slurm before a time limit,
scancel, mpirun forwarding its own) prints one line saying which rank got it and exits with
code 143 (128 + 15) at once, also while the main thread is blocked in MPI: a Python handler
alone would only run after the blocking call returns, so the signal's wake-up byte
(``signal.set_wakeup_fd``) is read by a small thread that reports and exits. Runs that agree
before every step (``--steps 0``, stream data, wall-clock deltas: hybridps.step_control) stop
gracefully instead: the first SIGTERM asks every rank to stop after its current step, write a
checkpoint and exit 0; a second SIGTERM exits at once as above. ``faulthandler`` prints the Python stack of a rank that
crashes (SIGSEGV, SIGBUS, SIGFPE, SIGABRT), and ``kill -USR1`` on mpirun prints every rank's
stack.

mpi4py's upper-case buffer methods are used for every payload: they release the GIL and move
raw memory; lower-case (pickling) methods only carry small control messages.
"""
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from hybridps.errors import CommError
from hybridps.watchdog import collective as _watch

_STATE = {"comm": None}

_MPI_DTYPES = {np.dtype(np.int64): "INT64_T", np.dtype(np.int32): "INT32_T",
               np.dtype(np.float32): "FLOAT", np.dtype(np.float64): "DOUBLE",
               np.dtype(np.uint64): "UINT64_T"}


def _local_rank_and_size(rank, size):
    """Local rank/size from whichever launcher set them: Open MPI, PMI (MPICH/Hydra), Slurm."""
    from hybridps.hosts import local_rank_and_size
    local_rank, local_size, _source = local_rank_and_size(os.environ, rank, size)
    return local_rank, local_size


class Comm:
    """Rank, size and the buffer collectives of hybridps' sparse exchange.

    Use :func:`init` to get the process-wide instance; it is created once.
    """

    def __init__(self, mpi, world, with_horovod):
        self.MPI = mpi
        self.world = world
        # A duplicate keeps hybridps' own exchanges apart from Horovod's traffic on WORLD.
        self.exchange = world.Dup()
        self.rank = world.Get_rank()
        self.size = world.Get_size()
        self.local_rank, self.local_size = _local_rank_and_size(self.rank, self.size)
        self.with_horovod = with_horovod
        self.thread_level = mpi.Query_thread()
        self.hosts = None               # host name of every rank (learnt at init when size > 1)

    # ---------------------------------------------------------------- buffer collectives
    def _mpi_type(self, array):
        try:
            return getattr(self.MPI, _MPI_DTYPES[array.dtype])
        except KeyError:
            raise CommError(f"no MPI datatype for numpy dtype {array.dtype}") from None

    def _wait(self, request, poll_interval):
        """Wait for a non-blocking collective, sleeping between tests instead of spinning."""
        while not request.Test():
            time.sleep(poll_interval)

    def alltoall_counts(self, send_counts, poll_interval=None):
        """Exchange per-destination counts: ``recv[r]`` is what rank r sends to this rank.

        Args:
            send_counts: int64 array (size, k): k counts per destination rank.
            poll_interval: None for a blocking call; seconds to sleep between tests of a
                non-blocking one (see :meth:`alltoallv`).
        Returns:
            int64 array (size, k).
        """
        send = np.ascontiguousarray(send_counts, dtype=np.int64)
        recv = np.empty_like(send)
        with _watch("alltoall_counts"):
            if poll_interval is None:
                self.exchange.Alltoall(send, recv)
            else:
                self._wait(self.exchange.Ialltoall(send, recv), poll_interval)
        return recv

    def alltoallv(self, send, send_counts, recv_counts, recv=None, poll_interval=None):
        """Alltoallv of a numpy buffer whose first axis is split per destination rank.

        Counts are in rows of ``send`` (its trailing axes travel with each row).

        Args:
            send: C-contiguous array; rows grouped by destination rank.
            send_counts: rows to each rank, int (size,).
            recv_counts: rows from each rank, int (size,).
            recv: optional output array with sum(recv_counts) rows.
            poll_interval: None for a blocking MPI_Alltoallv. A background thread that shares
                its core with TF compute passes seconds here: the exchange then runs as
                MPI_Ialltoallv, tested every ``poll_interval`` seconds, because Open MPI's
                blocking calls busy-poll and would steal the core from the compute thread.
        Returns:
            the receive array, rows grouped by source rank.
        """
        send = np.ascontiguousarray(send)
        row_elems = int(np.prod(send.shape[1:], dtype=np.int64)) if send.ndim > 1 else 1
        n_recv = int(np.sum(recv_counts))
        if recv is None:
            recv = np.empty((n_recv,) + send.shape[1:], dtype=send.dtype)
        scounts = np.asarray(send_counts, dtype=np.int64) * row_elems
        rcounts = np.asarray(recv_counts, dtype=np.int64) * row_elems
        if scounts.max(initial=0) >= 2**31 or rcounts.max(initial=0) >= 2**31:
            raise CommError("one alltoallv message exceeds 2**31 elements; use smaller batches")
        sdispl = np.zeros(self.size, dtype=np.int64)
        rdispl = np.zeros(self.size, dtype=np.int64)
        np.cumsum(scounts[:-1], out=sdispl[1:])
        np.cumsum(rcounts[:-1], out=rdispl[1:])
        mpi_type = self._mpi_type(send)
        send_spec = [send, (scounts.astype(np.int32), sdispl.astype(np.int32)), mpi_type]
        recv_spec = [recv, (rcounts.astype(np.int32), rdispl.astype(np.int32)), mpi_type]
        with _watch("alltoallv"):
            if poll_interval is None:
                self.exchange.Alltoallv(send_spec, recv_spec)
            else:
                self._wait(self.exchange.Ialltoallv(send_spec, recv_spec), poll_interval)
        return recv

    def _allreduce(self, array, op, name):
        send = np.ascontiguousarray(array)
        recv = np.empty_like(send)
        with _watch(name):
            self.exchange.Allreduce(send, recv, op=op)
        return recv

    def allreduce_sum(self, array):
        """Elementwise sum over ranks of a numpy array (float64 or int64 recommended)."""
        return self._allreduce(array, self.MPI.SUM, "allreduce_sum")

    def allreduce_max(self, array):
        """Elementwise maximum over ranks of a numpy array."""
        return self._allreduce(array, self.MPI.MAX, "allreduce_max")

    def allgather_object(self, obj):
        """Small control objects only (pickled)."""
        with _watch("allgather_object"):
            return self.exchange.allgather(obj)

    def gather_object(self, obj, root=0):
        """Objects of every rank, in rank order, on ``root`` (None elsewhere); pickled."""
        with _watch("gather_object"):
            return self.exchange.gather(obj, root=root)

    def bcast_object(self, obj, root=0):
        with _watch("bcast_object"):
            return self.exchange.bcast(obj, root=root)

    def barrier(self):
        with _watch("barrier"):
            self.exchange.Barrier()

    def abort(self, code=1):
        self.world.Abort(code)

    # ---------------------------------------------------------------- point to point (PS mode)
    @property
    def ANY_SOURCE(self):
        return self.MPI.ANY_SOURCE

    def send(self, array, dest, tag):
        """Blocking send of a contiguous numpy buffer on the exchange communicator."""
        self.exchange.Send(array, dest=dest, tag=tag)

    def isend(self, array, dest, tag):
        """Non-blocking send; keep ``array`` alive until the request completes."""
        return self.exchange.Isend(array, dest=dest, tag=tag)

    def irecv(self, array, source, tag):
        """Non-blocking receive into ``array``."""
        return self.exchange.Irecv(array, source=source, tag=tag)

    def recv(self, array, source, tag):
        """Blocking receive into ``array`` (``source`` may be ANY_SOURCE); returns the source."""
        status = self.MPI.Status()
        self.exchange.Recv(array, source=source, tag=tag, status=status)
        return status.Get_source()

    @staticmethod
    def test(request):
        """Whether a non-blocking request has completed (never waits)."""
        return request.Test()

    def waitall(self, requests):
        self.MPI.Request.Waitall(list(requests))


class SingleProcessComm:
    """The comm of a job of one process without MPI (tests, export, inspect): rank 0 of 1.

    A stand-in beside the real communicator for the collectives that checkpoints, exports and
    metrics use; anything they gather or reduce is this process's own value.
    """
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def barrier(self):
        pass

    def allgather_object(self, obj):
        return [obj]

    def gather_object(self, obj, root=0):
        return [obj]

    def bcast_object(self, obj, root=0):
        return obj

    def allreduce_sum(self, array):
        return np.array(array, copy=True)

    def allreduce_max(self, array):
        return np.array(array, copy=True)


def initialized_rank_and_size():
    """(rank, size) of COMM_WORLD if MPI is initialised in this process, else (0, 1)."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI
        if MPI.Is_initialized():
            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return 0, 1


def init(with_horovod=True, horovod_cycle_time_ms=None):
    """Initialise MPI (thread level MULTIPLE) and, optionally, Horovod on COMM_WORLD, once.

    Args:
        with_horovod: initialise Horovod too (the collective mode's dense path needs it).
        horovod_cycle_time_ms: Horovod's negotiation cycle (``HOROVOD_CYCLE_TIME``) to use when
            the environment does not set one; None keeps Horovod's default (1 ms). Horovod
            reads it once, at its initialisation.
    Returns:
        the process-wide :class:`Comm`.
    Raises:
        CommError: mpi4py or Horovod missing, or MPI without THREAD_MULTIPLE support.
    """
    if _STATE["comm"] is not None:
        if with_horovod and not _STATE["comm"].with_horovod:
            _init_horovod(_STATE["comm"], horovod_cycle_time_ms)
        return _STATE["comm"]
    try:
        import mpi4py
    except ImportError as exc:
        raise CommError("mpi4py is not installed; run `make setup` or pip install mpi4py "
                        "against the MPI on PATH (MPICC=$(which mpicc))") from exc
    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise CommError("MPI was initialised without THREAD_MULTIPLE (another module imported "
                        "mpi4py first?). Import hybridps.comm before anything that imports mpi4py, "
                        "and use an MPI built with thread support.")
    comm = Comm(MPI, MPI.COMM_WORLD, with_horovod=False)
    _STATE["comm"] = comm
    install_abort_on_error(comm)
    _start_watchdog(comm)
    if with_horovod:
        _init_horovod(comm, horovod_cycle_time_ms)
    return comm


def _init_horovod(comm, cycle_time_ms=None):
    try:
        import horovod.tensorflow as hvd
    except ImportError as exc:
        raise CommError("Horovod with TensorFlow support is not installed; run `make setup` "
                        "(it builds horovod 0.28.1 against this MPI)") from exc
    if cycle_time_ms is not None:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", f"{cycle_time_ms:g}")
    hvd.init(comm=comm.MPI.COMM_WORLD)
    if hvd.size() != comm.size or hvd.rank() != comm.rank:
        raise CommError(f"Horovod sees rank {hvd.rank()}/{hvd.size()} but MPI rank "
                        f"{comm.rank}/{comm.size}: Horovod was built against another MPI; "
                        f"rebuild it (`make setup` after removing its cached wheel)")
    comm.with_horovod = True


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
        from hybridps import watchdog
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
        from hybridps import step_control
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
    import socket
    from hybridps import watchdog
    from hybridps.postmortem import format_rank_map
    # One key per job, equal on every rank: names the default directory of watchdog state files.
    job_key = comm.world.bcast(f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
                               if comm.rank == 0 else None, root=0)
    comm.hosts = comm.world.allgather(socket.gethostname())
    if comm.rank == 0 and len(set(comm.hosts)) > 1:
        sys.stderr.write(format_rank_map(comm.hosts) + "\n")
        sys.stderr.flush()
    watchdog.start(comm.rank, comm.size, comm.abort, job_key, peers=WatchdogPeers(comm),
                   hosts=comm.hosts)


class WatchdogPeers:
    """The watchdogs' own channel: point-to-point messages on a duplicate of COMM_WORLD.

    A rank whose collective is stuck asks every other rank for its state and gets the answers
    over MPI, so the watchdog's report needs no shared directory; each rank's watchdog thread
    answers asks when it polls (hybridps.watchdog). Small pickled control messages only,
    received by probing (nothing stays posted, so MPI_Finalize finds no pending receive).
    Errors return instead of aborting: a peer on a dead host must not abort the report.
    """

    ASK, ANSWER = 901, 902

    def __init__(self, comm):
        self.MPI = comm.MPI
        self.channel = comm.world.Dup()
        self.channel.Set_errhandler(comm.MPI.ERRORS_RETURN)
        self.rank, self.size = comm.rank, comm.size
        self.sends = []

    def asks(self):
        """Ranks that asked for this rank's state since the last call."""
        asking = []
        status = self.MPI.Status()
        try:
            while self.channel.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.ASK, status=status):
                source = status.Get_source()
                self.channel.recv(source=source, tag=self.ASK)
                asking.append(source)
        except self.MPI.Exception:
            pass
        return asking

    def answer(self, rank, state):
        try:
            self.sends.append(self.channel.isend(state, dest=rank, tag=self.ANSWER))
        except self.MPI.Exception:
            pass

    def ask_all(self, timeout_s, on_ask):
        """Ask every other rank for its state; wait up to ``timeout_s`` for the answers while
        still answering asks (``on_ask(rank)`` is called for each). Returns {rank: state}."""
        for rank in range(self.size):
            if rank != self.rank:
                try:
                    self.sends.append(self.channel.isend(self.rank, dest=rank, tag=self.ASK))
                except self.MPI.Exception:
                    pass
        answers = {}
        status = self.MPI.Status()
        deadline = time.monotonic() + timeout_s
        while len(answers) < self.size - 1 and time.monotonic() < deadline:
            for rank in self.asks():
                on_ask(rank)
            try:
                while self.channel.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.ANSWER, status=status):
                    source = status.Get_source()
                    answers[source] = self.channel.recv(source=source, tag=self.ANSWER)
            except self.MPI.Exception:
                break
            time.sleep(0.01)
        return answers
