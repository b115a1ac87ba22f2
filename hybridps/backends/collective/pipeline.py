"""SSP and ASP on the collective path: a communication thread overlaps the exchange with compute.

Why a thread with blocking collectives (and not MPI non-blocking collectives): an owner must
look rows up *between* receiving keys and sending rows, and apply gradients after receiving
them; with ``MPI_Ialltoallv`` someone would have to poll for progress and run those table steps
in the middle of the TF step. A dedicated thread that runs blocking ``Alltoallv`` calls on
hybridps' own communicator does both naturally, releases the GIL inside MPI and inside the
Cython table loops, and needs MPI_THREAD_MULTIPLE (hybridps.comm asks for it) because
Horovod's thread and the main thread use MPI at the same time.

Collectives must be issued in the same order on every rank, so the thread follows a schedule
that depends only on step numbers, never on timing:
  * SSP(s):  ... push(t - s - 1), pull(t), push(t - s), pull(t + 1) ...
    A pull for step t is served only after every rank's push of step t - s - 1 has been applied
    by its owner, so a read at step t sees every update from steps <= t - s - 1. With s = 0 this
    is exactly BSP's order (push(t - 1) before pull(t)), and the arithmetic is identical.
  * ASP(d):  ... pull(t), push(t - d), pull(t + 1), push(t - d + 1) ...  (d = max_inflight)
    Pulls never wait for gradients; pushes trail by at most d steps, which bounds the memory
    held in flight.
The dense allreduces run on a background thread (hybridps.dense.DenseAllreduceThread), in step
order; the main thread applies the reduced gradients right before its TF step. Under SSP the
dense path stays synchronous unless ``dense_staleness`` D > 0 is configured: the TF step of t
starts once the dense updates of every step <= t - D - 1 are applied (D = 0: the previous
step's too). Under ASP the main thread waits only when max_inflight dense updates are queued,
so dense gradients may be applied late. The dense lag each TF step actually had is measured
(``dense_staleness_max`` / ``_mean``).
The training thread only computes: it takes prefetched rows (``pull``) and hands gradients over
(``push``), blocking when ``max_inflight`` results are already waiting, so memory stays bounded.
Only the communication thread touches the tables while training runs. ``finish`` drains every
outstanding push and dense update, so nothing pushed is lost at the end of training.
"""
import itertools
import threading

from hybridps import watchdog
from hybridps.backends.collective.bsp import CollectiveBackend
from hybridps.config import Sync
from hybridps.dense.thread import DenseAllreduceThread
from hybridps.errors import HybridPSError

# the exchange thread tests its non-blocking collectives this often (the factory gives it to
# the CollectiveExchange of SSP and ASP)
POLL_INTERVAL_S = 0.001


def ssp_schedule(start, steps, staleness):
    """Operation order of SSP(staleness): ("push"|"pull", step) pairs, identical on every rank.

    A generator: ``steps`` None has no end (train until stopped), otherwise the last pushes
    drain after pull(steps - 1)."""
    for t in (range(start, steps) if steps is not None else itertools.count(start)):
        if t - staleness - 1 >= start:
            yield ("push", t - staleness - 1)
        yield ("pull", t)
    if steps is not None:
        for k in range(max(steps - staleness - 1, start), steps):
            yield ("push", k)


def asp_schedule(start, steps, lag):
    """Operation order of ASP: pulls first, pushes trailing by ``lag`` steps (``steps`` None:
    no end)."""
    for t in (range(start, steps) if steps is not None else itertools.count(start)):
        yield ("pull", t)
        if t - lag >= start:
            yield ("push", t - lag)
    if steps is not None:
        for k in range(max(steps - lag, start), steps):
            yield ("push", k)


def with_fences(schedule, fences):
    """Insert a fence before pull(k) for each k in ``fences``: every push of a step < k moves
    ahead of it, so at the fence the tables hold exactly the updates of steps < k (a
    consistent point for a checkpoint or a delta export). Depends only on step numbers.

    Lazy: a generator that holds no list of operations or fences, O(1) work per operation,
    so its start-up cost depends neither on the number of steps nor on that of fences, and it
    works on an unbounded schedule. ``schedule`` is one of :func:`ssp_schedule` /
    :func:`asp_schedule` (pulls of consecutive steps in order, every pulled step pushed once,
    pushes in step order); ``fences`` is anything that answers ``k in fences`` (a set, a range,
    or a predicate object such as the trainer's consistent points). A fence step that no pull
    matches (only possible for a finite, iterable ``fences``) comes at the end, in step order.
    """
    next_push = None          # the lowest step not pushed yet (pushes come in step order)
    first_pull = last_pull = None
    for op in schedule:
        kind, step = op
        if kind == "pull":
            if first_pull is None:
                first_pull = next_push = step
            last_pull = step
            if step in fences:
                # the pushes of steps < step that the schedule has further on move ahead
                for k in range(next_push, step):
                    yield ("push", k)
                next_push = max(next_push, step)
                yield ("fence", step)
            yield op
        else:
            if next_push is not None and step < next_push:
                continue          # already moved ahead of a fence
            next_push = step + 1
            yield op
    if hasattr(fences, "__iter__"):   # fences no pull matched (pulls are consecutive steps)
        unmatched = {k for k in fences if first_pull is None or not first_pull <= k <= last_pull}
        for k in sorted(unmatched):
            yield ("fence", k)


class _StepsBetween:
    """The steps k of ``steps`` with ``low < k < high`` (``high`` None: no bound), as a
    membership test only: nothing is listed, whatever the number of steps."""

    def __init__(self, steps, low, high):
        self.steps, self.low, self.high = steps, low, high

    def __contains__(self, k):
        return self.low < k and (self.high is None or k < self.high) and k in self.steps


class _Mailbox:
    """Step-indexed hand-over between two threads, with failure propagation."""

    def __init__(self, owner):
        self.items = {}
        self.cond = threading.Condition()
        self.owner = owner

    def put(self, step, item):
        with self.cond:
            self.items[step] = item
            self.cond.notify_all()

    def take(self, step):
        with self.cond:
            while step not in self.items:
                self.owner.raise_if_failed()
                self.cond.wait(0.1)
            return self.items.pop(step)

    def wait_below(self, limit):
        """Block while ``limit`` or more items are waiting (bounded prefetch)."""
        with self.cond:
            while len(self.items) >= limit:
                self.owner.raise_if_failed()
                self.cond.wait(0.1)

    def wake(self):
        with self.cond:
            self.cond.notify_all()


class PipelinedBackend(CollectiveBackend):
    """The collective backend for SSP and ASP (see the module docstring)."""

    def __init__(self, comm, exchange, dense, model, *, sync, steps, staleness, max_inflight,
                 dense_staleness):
        """``sync``: Sync.SSP or Sync.ASP; ``steps``: the last step + 1, None: until the batches
        end (a stream, a stop); ``staleness``: SSP's s; ``max_inflight``: steps pulled ahead
        and ASP's push lag; ``dense_staleness``: SSP's dense D (ignored under ASP). The
        exchange must poll its collectives (``poll_interval``): it runs on the exchange
        thread while Horovod's thread and the main thread use MPI too."""
        super().__init__(comm, exchange, dense, model)
        self.sync = sync
        self.steps = steps
        self.staleness = staleness
        self.max_inflight = max_inflight
        self.dense_staleness = dense_staleness if sync == Sync.SSP else None
        self.pulled = _Mailbox(self)
        self.fence_reached = _Mailbox(self)
        self.fence_released = _Mailbox(self)
        self.grads = _Mailbox(self)
        self.error = None
        self.comm_thread = None
        self.schedule = None           # the exchange thread's operations, from ``start``
        self.next_push = None          # the lowest step not pushed yet, from ``start``

    # ------------------------------------------------------------------ lifecycle
    def start(self, batches, start_step=0, fence_steps=()):
        """Start the exchange and the dense thread at ``start_step``; the tables are
        made consistent and handed to the main thread at every step in ``fence_steps``."""
        self.dense.broadcast_initial()
        self.batches = batches
        self.dense_thread = DenseAllreduceThread(
            self.dense, start_step,
            max_pending=self.max_inflight if self.sync == Sync.ASP else self.dense_staleness + 1)
        if self.sync == Sync.SSP:
            schedule = ssp_schedule(start_step, self.steps, self.staleness)
        else:
            schedule = asp_schedule(start_step, self.steps, self.max_inflight)
        self.schedule = with_fences(schedule, _StepsBetween(fence_steps, start_step, self.steps))
        self.next_push = start_step
        self.comm_thread = threading.Thread(target=self._run_guarded, args=(self._comm_loop,),
                                            name="hybridps-exchange", daemon=True)
        self.comm_thread.start()

    def _run_guarded(self, loop):
        try:
            loop()
        except BaseException as exc:   # noqa: B902 - handed to the main thread, which raises it
            self.error = exc
            self.pulled.wake()
            self.grads.wake()
        finally:
            watchdog.clear_step()

    def raise_if_failed(self):
        if self.error is not None:
            raise HybridPSError(f"the {self.sync.value} communication pipeline failed: "
                                f"{type(self.error).__name__}: {self.error}") from self.error

    # ------------------------------------------------------------------ communication thread
    def _comm_loop(self):
        for op, step in self.schedule:
            watchdog.set_step(step)
            if op == "pull":
                # Bounded prefetch: at most max_inflight pulled steps wait for the main thread.
                self.pulled.wait_below(self.max_inflight)
                try:
                    batch = next(self.batches)
                except StopIteration:   # every rank's batches end at this step (agreed)
                    for k in range(self.next_push, step):     # the pushes still owed
                        self._push(k)
                    self.pulled.put(step, None)
                    return
                self.pulled.put(step, self.exchange.pull(batch, step))
            elif op == "push":
                if step >= self.next_push:     # not pushed ahead at an idle point
                    self._push(step)
            else:   # fence: the main thread owns the tables until it releases the fence
                self.fence_reached.put(step, True)
                self.fence_released.take(step)

    def _push(self, step):
        pulled, row_grads = self.grads.take(step)
        self.exchange.push(pulled, row_grads, step)
        self.next_push = step + 1

    def at_consistent_point(self, step, action):
        """Run ``action()`` once every update of steps < ``step`` is applied and no later pull
        has been served (``step`` must be one of the fence steps given to ``start``)."""
        self.fence_reached.take(step)
        try:
            self.dense_thread.apply_ready(need=step)   # the dense state of the steps < step
            action()
        finally:
            self.fence_released.put(step, True)

    def at_idle_point(self, step, action):
        """Called in the exchange thread (it draws the batches) while it waits for the batch
        of ``step``: push every step < step now (all ranks do, at the same poll; the main
        thread has pulled them, so it hands their gradients over), apply the dense updates of
        the steps < step (the main thread waits for the rows of ``step`` meanwhile, so it
        applies none), run action. Pushing early only makes later reads fresher."""
        for k in range(self.next_push, step):
            self._push(k)
        self.dense_thread.apply_ready(need=step)
        action()

    # ------------------------------------------------------------------ main thread
    def pull(self, step):
        """This step's PulledBatch, or None when the batches ended before it."""
        pulled = self.pulled.take(step)
        if pulled is None:
            return None
        if self.sync == Sync.SSP:      # dense updates of steps <= step - dense_staleness - 1
            self.dense_thread.apply_ready(need=step - self.dense_staleness)
        else:                          # ASP: at most max_inflight steps behind
            self.dense_thread.apply_ready(need=step - self.max_inflight)
        self.dense_thread.record_lag(step)
        return pulled

    def push(self, pulled, row_grads, step):
        self.grads.put(step, (pulled, row_grads))

    def dense_step(self, grads, step):
        self.dense_thread.submit(grads)

    def finish(self):
        """Wait until every push and dense update has been applied."""
        while self.comm_thread is not None and self.comm_thread.is_alive():
            self.comm_thread.join(0.1)
            self.raise_if_failed()
        self.raise_if_failed()
        if self.dense_thread is not None:
            self.dense_thread.close()
