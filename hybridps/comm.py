"""The one owner of MPI_COMM_WORLD and of Horovod initialization.

What lives here: MPI init (mpi4py, thread level MULTIPLE, because Horovod's background thread
and, for SSP/ASP, hybridps' communication thread call MPI beside the main thread), Horovod init
on the same communicator, rank / size / local rank, and alltoallv helpers over numpy buffers
(counts first, then payload; empty sends and receives are normal). Every collective runs inside
``watchdog.collective(name)``: one that does not complete within the watchdog timeout aborts
the job with a dump of where each rank is (hybridps.watchdog). What does not: what happens to
the process when something goes wrong (an uncaught exception, SIGTERM, a crash: the first
:func:`init` hands the communicator to hybridps.process_control, which installs all of it),
the watchdog's own messages between ranks (hybridps.watchdog), keys, tables, hashing
(hybridps.sparse), launch commands (hybridps.launch).

mpi4py's upper-case buffer methods are used for every payload: they release the GIL and move
raw memory; lower-case (pickling) methods only carry small control messages.
"""
import os
import sys
import time

import numpy as np

from hybridps import process_control
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
    process_control.install(comm)
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
