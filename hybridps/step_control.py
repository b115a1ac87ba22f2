"""What every rank agrees on before each step of an unbounded or streaming run.

What lives here: the graceful stop (:func:`request_stop`, :func:`stop_requested`; the SIGTERM
handler of hybridps.comm calls ``request_stop`` once :func:`enable_graceful_stop` was called),
and :class:`StepAgreement`, one small collective before each batch is drawn, in whichever
thread draws it (the main thread under BSP, the exchange thread under SSP/ASP):

* stop: any rank asked to stop (SIGTERM) -> every rank ends before this step;
* data: a stream source says whether it has the rows of this step ("ready") or whether its
  end marker says it never will ("ended"); every rank waits (polling, not a hang: each poll is
  a collective that completes) until all are ready, or ends when all have ended;
* source failure: a stream source that cannot go on (its Redis server unreachable for longer
  than ``stream_retry_seconds``, a stream file changed after it was read) says why; every rank
  ends before this step (:attr:`StepAgreement.failure`), the trainer writes the final checkpoint
  of the steps trained and then :meth:`StepAgreement.raise_failure` ends the job with the error;
* notes: what one rank's source found that every rank's source must apply the same way (the
  names of stream files that changed after they were read, under ``on_bad_line: skip``), the
  union of every rank's notes (:attr:`StepAgreement.notes`);
* wall-clock deltas: rank 0's clock says whether ``delta_every_seconds`` have passed since the
  last delta was written; if so, the completed-step count after this step becomes a consistent point
  (:attr:`StepAgreement.delta_points`) where the trainer writes a delta; and while every rank
  waits for data, :attr:`StepAgreement.on_idle_delta` (the trainer's) is called at that poll,
  so the rows trained before a stream went quiet reach serving without waiting for more;
* wall-clock checkpoints: likewise for ``checkpoint_every_seconds`` (rank 0's clock since the
  last checkpoint was written): the step count after this step joins
  :attr:`StepAgreement.checkpoint_points`, where the trainer writes a checkpoint (the work a
  restart loses is then bounded in time, not in steps).

All decisions come from one allgather, so every rank runs the same steps and stops at the same
one. What does not: the stream sources (hybridps.data.stream), the loop (hybridps.trainer).
"""
import threading
import time

from hybridps import watchdog
from hybridps.errors import DataError

_STOP = {"requested": False, "reason": None, "graceful": False}


def enable_graceful_stop():
    """From now on SIGTERM asks for a graceful stop instead of exiting at once (hybridps.comm)."""
    _STOP["graceful"] = True


def graceful_stop_enabled():
    return _STOP["graceful"]


def request_stop(reason):
    """Ask every rank to stop before its next step (signal-safe: sets a flag)."""
    if not _STOP["requested"]:
        _STOP["requested"], _STOP["reason"] = True, reason


def stop_requested():
    return _STOP["requested"]


def reset_stop():
    """Forget a stop request (tests that run several trainings in one process)."""
    _STOP.update(requested=False, reason=None)


class StepAgreement:
    """The per-step agreement (module docstring).

    Args:
        comm: hybridps.comm.Comm (every rank that draws batches calls :meth:`agree` once per
            poll, in step order).
        delta_every_seconds: 0 for none.
        checkpoint_every_seconds: 0 for none.
        poll_s: seconds between polls while a stream has no rows for the next step.
    """

    def __init__(self, comm, delta_every_seconds=0.0, poll_s=0.2, checkpoint_every_seconds=0.0):
        self.comm = comm
        self.delta_every_seconds = float(delta_every_seconds)
        self.checkpoint_every_seconds = float(checkpoint_every_seconds)
        self.poll_s = float(poll_s)
        self.delta_points = _PointSet()
        self.checkpoint_points = _PointSet()
        self.timed_points = _EitherSet(self.delta_points, self.checkpoint_points)
        self.last_delta = self.last_checkpoint = time.monotonic()
        self.stopped_by = None          # "signal", "end of stream" or "stream failure" at the end
        self.waited_s = 0.0             # seconds spent waiting for data
        self.failure = None             # (rank, what failed) of the lowest failing rank
        self.notes = ()                 # every rank's notes of the last poll, sorted
        self.on_idle_delta = None       # called with the step waited for when a delta is due

    def agree(self, step, ready=True, ended=False, failure=None, notes=()):
        """One poll for ``step``: "go", "wait" (sleep ``poll_s`` and poll again) or "end".

        ``failure``: why this rank's source cannot go on (None: it can); any rank's failure
        ends every rank here. ``notes``: this rank's notes for every rank (module docstring).
        """
        now = time.monotonic()
        due = (self.comm.rank == 0 and self.delta_every_seconds > 0
               and now - self.last_delta >= self.delta_every_seconds)
        checkpoint_due = (self.comm.rank == 0 and self.checkpoint_every_seconds > 0
                          and now - self.last_checkpoint >= self.checkpoint_every_seconds)
        with watchdog.collective("step agreement"):
            votes = self.comm.allgather_object((stop_requested(), bool(ready), bool(ended), due,
                                                failure, tuple(notes), checkpoint_due))
        self.notes = tuple(sorted({note for v in votes for note in v[5]}))
        failed = [(rank, v[4]) for rank, v in enumerate(votes) if v[4]]
        if failed:
            self.failure, self.stopped_by = failed[0], "stream failure"
            return "end"
        if any(v[0] for v in votes):
            self.stopped_by = "signal"
            return "end"
        if all(v[1] for v in votes):
            if votes[0][3]:
                self.delta_points.add(step + 1)
                self.last_delta = time.monotonic()
            if votes[0][6]:
                self.checkpoint_points.add(step + 1)
                self.last_checkpoint = time.monotonic()
            return "go"
        if all(v[2] for v in votes):
            self.stopped_by = "end of stream"
            return "end"
        self._due_while_waiting(step, votes[0][3])
        return "wait"

    def _due_while_waiting(self, step, due):
        """Rank 0's clock says a wall-clock delta is due while every rank waits for the rows
        of ``step``: ``on_idle_delta(step)`` (collective: every rank is at this same poll)."""
        if due and self.on_idle_delta is not None:
            self.on_idle_delta(step)

    def delta_written(self):
        """The clock of wall-clock deltas restarts when a delta is written (not when it was
        decided), so consecutive deltas are at least ``delta_every_seconds`` apart however
        long one takes to write. Called at the consistent point, while no batch is drawn."""
        self.last_delta = time.monotonic()

    def checkpoint_written(self, completed):
        """A checkpoint was written after ``completed`` steps: the clock of wall-clock
        checkpoints restarts (as :meth:`delta_written`'s) and the point is forgotten."""
        self.last_checkpoint = time.monotonic()
        self.checkpoint_points.discard(completed)

    def raise_failure(self, completed, checkpoint_dir=None):
        """After the final checkpoint of a run ended by a source failure: the lowest failing
        rank raises the DataError (hybridps.cli prints it once and ends the job with a non-zero
        exit); the other ranks wait in a last collective that rank never joins, ended with it.
        Nothing happens when no source failed."""
        if self.failure is None:
            return
        rank, what = self.failure
        if self.comm.rank == rank:
            saved = (f"the checkpoint of that step in {checkpoint_dir} holds its stream position: "
                     f"fix the cause, then restart with --resume" if checkpoint_dir else
                     "nothing was saved (no checkpoint_dir)")
            raise DataError(f"{what}; every rank stopped after step {completed}, {saved}")
        request_stop("stream failure")     # the SIGTERM that ends this rank is not a stop request
        with watchdog.collective(f"waiting for rank {rank} to report its stream failure"):
            self.comm.barrier()

    def wait(self):
        """Sleep one poll interval (idle waiting for data, counted in ``waited_s``)."""
        time.sleep(self.poll_s)
        self.waited_s += self.poll_s

    def batches(self, batches, start_step):
        """A non-streaming batch iterator, agreed before each batch (stop and deltas only)."""
        step, source = start_step, iter(batches)
        while self.agree(step) != "end":       # agreed before drawing: a stop draws nothing
            try:
                batch = next(source)
            except StopIteration:
                return
            yield batch
            step += 1


class _PointSet:
    """A set of step counts shared between the thread that draws batches and the main thread."""

    def __init__(self):
        self.points, self.lock = set(), threading.Lock()

    def add(self, k):
        with self.lock:
            self.points.add(k)

    def discard(self, k):
        """Forget ``k`` once its delta is written (a run of months adds a point every delta)."""
        with self.lock:
            self.points.discard(k)

    def __contains__(self, k):
        with self.lock:
            return k in self.points


class _EitherSet:
    """Membership in any of several point sets (the wall-clock deltas and checkpoints)."""

    def __init__(self, *sets):
        self.sets = sets

    def __contains__(self, k):
        return any(k in points for points in self.sets)
