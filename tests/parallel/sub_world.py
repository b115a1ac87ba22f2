"""Several world sizes in one MPI launch: scenarios of N ranks run on the first N ranks of the job.

A launch costs a TensorFlow and Horovod start per process, so a scenario script that needs 1,
2 and 4 ranks starts one job of 4 ranks and, for each smaller size, runs its scenarios inside
:func:`first_ranks`: a hybridps Comm over ranks 0..N-1 (an MPI split of the job's
communicator) with Horovod shut down and initialised again on it, exactly as a job of N ranks
initialises it on its world; meanwhile it is also the process-wide Comm that
``hybridps.comm.init()`` returns (to the commands and library calls of the scenarios). The other
ranks wait, sleeping, until the N ranks are done; then Horovod is initialised on the whole job
again.
"""
import contextlib
import os
import time

from hybridps import comm as comm_module


def _wait_for_everyone(mpi_comm):
    """A barrier that sleeps between tests (a blocking one would busy-poll a shared core)."""
    request = mpi_comm.Ibarrier()
    while not request.Test():
        time.sleep(0.02)


@contextlib.contextmanager
def first_ranks(size, with_horovod=True):
    """Yield a Comm over ranks 0..SIZE-1 of the job on those ranks, None on the others.

    With ``with_horovod`` False (scenarios without TensorFlow) Horovod is left alone."""
    job = comm_module.init(with_horovod=with_horovod)
    if size == job.size:
        yield job
        return
    if with_horovod:
        import horovod.tensorflow as hvd
        hvd.shutdown()
    mpi = job.MPI
    member = job.rank < size
    sub = job.world.Split(0 if member else mpi.UNDEFINED, job.rank)
    comm = None
    if member:
        comm = comm_module.Comm(mpi, sub, with_horovod=with_horovod)
        comm.hosts = job.hosts[:size] if job.hosts else None
        assert (comm.rank, comm.size) == (job.rank, size)
        if with_horovod:
            hvd.init(comm=sub)
            assert (hvd.rank(), hvd.size()) == (job.rank, size)
        comm_module._STATE["comm"] = comm
    try:
        yield comm
    finally:
        if member:
            comm_module._STATE["comm"] = job
            if with_horovod:
                hvd.shutdown()
            comm.exchange.Free()
            sub.Free()
        _wait_for_everyone(job.world)
        if with_horovod:
            hvd.init(comm=mpi.COMM_WORLD)


def parts_on_first_ranks(out_dir, parts):
    """For each (NAME, SIZE, *ARGS) of PARTS in turn: on the first SIZE ranks, yield
    (comm, OUT_DIR/NAME, ARGS) with that directory created; the other ranks wait meanwhile."""
    for name, size, *args in parts:
        with first_ranks(size) as comm:
            if comm is not None:
                part_dir = os.path.join(out_dir, name)
                if comm.rank == 0:
                    os.makedirs(part_dir, exist_ok=True)
                comm.barrier()
                yield comm, part_dir, args
