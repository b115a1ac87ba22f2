"""Collective watchdog: a collective that does not complete within a timeout aborts the job.

What lives here: :func:`collective`, the tiny context manager hybridps.comm puts around each
of its collectives (it records name and start time of the calling thread's current
collective: two dict operations, no lock, no thread wake-up); :func:`set_step`, which the
training loop and the communication threads call with the step they work on; the watchdog
thread, one per rank, which polls every ``POLL_INTERVAL_S``; :func:`configure` (the timeout,
from ``TrainConfig.watchdog_timeout`` or ``HYBRIDPS_WATCHDOG_TIMEOUT``); the cross-rank dump
and :class:`Peers`, the watchdogs' messages to each other. What does not: MPI initialisation
and the abort itself (hybridps.process_control hands :func:`start` the communicator's abort
function and a :class:`Peers` on it), the benchmarks' exchange traces (hybridps.exchange_trace,
which :func:`collective` reports to when tracing is on) and any training logic.

Which ranks are stuck where, without relying on the stuck collective: the rank that trips
asks every other rank for its state (collective or "not in a collective", step, Python stack)
over a point-to-point channel of the watchdogs' own (:class:`Peers`: MPI
messages on a duplicate communicator, which each rank's watchdog thread answers when it
polls), waits up to ``ASK_TIMEOUT_S`` for the answers, prints them once and calls MPI_Abort.
So the report needs no shared directory: ranks on other hosts answer over the network, and a
rank that does not answer is named with its host (down, unreachable, or stuck outside Python).
Only one rank reports: the first to trip; a rank that was asked for its state before it
tripped, or by a lower rank while it was asking, leaves the report to the asker.

State files, as well: each rank's watchdog thread writes its state to ``rank<R>.json`` in a
state directory once a state has lasted a quarter of the timeout (0.5 to 10 s; at most twice
a second, never per call), and refreshes the file at least that often whatever it is doing
(normal training included: one small write every 0.5-10 s), so a file that has not been
refreshed for much longer belongs to a rank whose watchdog thread does not run: a stopped rank
(SIGSTOP, a debugger) or one hung outside Python (a C call holding the GIL). The report uses a
rank's file when the rank did not answer, a stale one marked as such (with the process state
when it runs on this node). The directory is ``HYBRIDPS_WATCHDOG_DIR`` when set, else
``<tmp>/hybridps-watchdog-<job key>`` on each node. A rank's file is removed when it exits
normally. That default name is predictable in a directory every user can write, so it is used
only as a directory of this user that nobody else can write (created with mode 0700); when it
is a symlink, not a directory, another user's, or writable by group or others (planted there),
the rank writes into a new private directory (tempfile.mkdtemp) instead and says so. A state
file is written to a new temporary file (tempfile.mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW) renamed
over ``rank<R>.json``, so a symlink planted at either name is never followed.

The step shown for a thread is the last one that thread gave :func:`set_step` (the training
loop gives every step, the SSP/ASP communication thread every step it exchanges), or else the
main thread's.
"""
import atexit
import json
import os
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback

from hybridps import exchange_trace

POLL_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 300.0
EXIT_CODE = 124                 # MPI_Abort error code of a watchdog abort (as timeout(1))
ASK_TIMEOUT_S = 2.0             # how long the tripping rank waits for the other ranks' states
_STACK_FRAMES = 6

_get_ident = threading.get_ident
_monotonic = time.monotonic

# thread ident -> (collective name, start monotonic) of the thread's innermost collective
_active = {}
# [name, end monotonic] of the last collective that completed on any thread
_last = [None, 0.0]
# thread ident -> the step that thread last said it works on (set_step)
_steps = {}
# While exchange tracing is on (benchmarks only): the deque of hybridps.exchange_trace that
# every collective appends (name, thread name, start, end) to; None when off.
_trace = exchange_trace.RECORDING


class collective:
    """``with collective("alltoallv"): ...`` marks the calling thread as inside a collective.

    Cheap enough for every call (an object, two dict operations); nesting is allowed.
    """
    __slots__ = ("name", "_tid", "_outer", "_start")

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        tid = self._tid = _get_ident()
        self._outer = _active.get(tid)
        self._start = _monotonic()
        _active[tid] = (self.name, self._start)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._outer is None:
            _active.pop(self._tid, None)
        else:
            _active[self._tid] = self._outer
        _last[0] = self.name
        end = _last[1] = _monotonic()
        if _trace[0] is not None:
            _trace[0].append((self.name, threading.current_thread().name, self._start, end))
        return False


def set_step(step):
    """Record the step the calling thread works on, for the watchdog's messages (one dict store)."""
    _steps[_get_ident()] = step


def clear_step():
    """Forget the calling thread's step (a thread that set one calls this before it ends, so a
    later thread that gets the same ident does not inherit it)."""
    _steps.pop(_get_ident(), None)


class _Watchdog:
    def __init__(self, rank, size, abort, state_dir, job_key, peers=None, hosts=None):
        self.rank, self.size = rank, size
        self.peers = peers              # a Peers, or None
        self.hosts = hosts              # host name of every rank, or None
        self.asked_at = {}              # rank -> monotonic time it last asked for our state
        self.job_key = job_key
        self.owns_dir = False            # True for the default directory (removed when empty)
        self.abort = abort
        self.state_dir = state_dir
        self.timeout_s = None           # None: resolved from the environment at the first poll
        self.stop_event = threading.Event()
        self.prefix = f"[hybridps rank {rank}/{size}]"
        self.host = socket.gethostname()
        self.thread = threading.Thread(target=self._loop, name="hybridps-watchdog", daemon=True)

    @property
    def state_path(self):
        return os.path.join(self.state_dir, f"rank{self.rank}.json")

    # ---------------------------------------------------------------- the polling thread
    def _loop(self):
        previous_key, written_key, key_since, written_at = None, None, 0.0, _monotonic()
        while not self.stop_event.wait(POLL_INTERVAL_S):
            timeout_s = self.timeout()
            now = _monotonic()
            if self.peers is not None:
                for rank in self.peers.asks():
                    self._answer(rank)
            snapshot = list(_active.items())
            for tid, (name, started) in snapshot:
                if now - started > timeout_s:
                    self._trip(tid, name, started, now, timeout_s)
                    return
            # A state that lasted write_after_s is written: once while blocked in a collective
            # (nothing changes), at every poll while outside collectives for that long (the
            # stack moves: a long compute, I/O, a sleep, a hang outside MPI). Short states,
            # i.e. all of normal training, write nothing.
            key = tuple((tid, name, started) for tid, (name, started) in snapshot) or ("idle", _last[1])
            if key != previous_key:
                previous_key, key_since = key, now
            elif now - key_since >= _write_after(timeout_s) and (key != written_key or not snapshot):
                self._write_state(snapshot, now)
                written_key, written_at = key, now
                continue
            if now - written_at >= _write_after(timeout_s):     # the heartbeat of a live rank
                self._write_state(snapshot, now)
                written_key, written_at = key, now

    def timeout(self):
        if self.timeout_s is None:
            from hybridps.config import env_watchdog_timeout
            try:
                self.timeout_s = env_watchdog_timeout() or DEFAULT_TIMEOUT_S
            except ValueError as exc:     # ConfigError: report once, keep the default
                sys.stderr.write(f"{self.prefix} watchdog: {exc}; using {DEFAULT_TIMEOUT_S:.0f}s\n")
                self.timeout_s = DEFAULT_TIMEOUT_S
        return self.timeout_s

    # ---------------------------------------------------------------- state files
    def _state(self, snapshot, now):
        wall_now = time.time()
        frames = sys._current_frames()
        main_tid = threading.main_thread().ident
        state = {"rank": self.rank, "size": self.size, "job": self.job_key,
                 "host": self.host, "pid": os.getpid(), "refresh_s": _write_after(self.timeout()),
                 "written": wall_now, "collectives": [], "last": None}
        for tid, (name, started) in snapshot:
            frame = frames.get(tid)
            state["collectives"].append({
                "name": name, "thread": _thread_name(tid), "seconds": now - started,
                "since": wall_now - (now - started), "step": _step_of(tid, main_tid),
                "where": _where(frame)})
        if _last[0] is not None:
            state["last"] = {"name": _last[0], "ended": wall_now - (now - _last[1]),
                             "seconds_ago": now - _last[1]}
        if not snapshot:
            frame = frames.get(main_tid)
            state["main"] = {"step": _step_of(main_tid, main_tid), "where": _where(frame)}
        return state

    def _safe_state(self, snapshot, now):
        try:
            return self._state(snapshot, now)
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
            # a frame that vanished while being read; never let the watchdog take a rank down
            return {"rank": self.rank, "size": self.size, "job": self.job_key, "host": self.host,
                    "pid": os.getpid(), "written": time.time(), "collectives": [], "last": None}

    def _write_state(self, snapshot, now):
        state = self._safe_state(snapshot, now)
        tmp = None
        try:
            self._ensure_dir()
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f"rank{self.rank}.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(state, fh)
            os.replace(tmp, self.state_path)
        except OSError:
            # a full or read-only disk must not take the training down
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
        return state

    def _ensure_dir(self):
        """Create the state directory; the default one only as a private directory (module doc)."""
        if not self.owns_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            return
        if _private_dir(self.state_dir):
            return
        refused = self.state_dir
        self.state_dir = tempfile.mkdtemp(prefix=f"hybridps-watchdog-{self.job_key}-")
        sys.stderr.write(f"{self.prefix} watchdog: {refused} is a symlink, not a directory, another "
                         f"user's, or writable by others: not using it; this rank's state files "
                         f"go to {self.state_dir}\n")

    def remove_state(self):
        if self.owns_dir and not _private_dir(self.state_dir):
            return                        # not ours (module doc): delete nothing in it
        leftovers = []
        try:
            leftovers = [os.path.join(self.state_dir, n) for n in os.listdir(self.state_dir)
                         if n.startswith(f"rank{self.rank}.") and n.endswith(".tmp")]
        except OSError:
            pass
        for path in [self.state_path] + leftovers:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.owns_dir:
            try:
                os.rmdir(self.state_dir)      # succeeds for the last rank of this node only
            except OSError:
                pass

    def _answer(self, rank):
        self.asked_at[rank] = _monotonic()
        self.peers.answer(rank, self._safe_state(list(_active.items()), _monotonic()))

    # ---------------------------------------------------------------- tripping
    def _trip(self, tid, name, started, now, timeout_s):
        started_wall = time.time() - (now - started)
        mine = self._write_state(list(_active.items()), now)
        stuck = next((c for c in mine["collectives"] if c["name"] == name), {"step": None})
        step = f" (step {stuck['step']})" if stuck.get("step") is not None else ""
        states = {self.rank: mine}
        if self.peers is not None:
            # Asked before tripping: the asker reports. Else ask; of two ranks asking at once,
            # the lower one reports.
            first = not any(now - t < timeout_s for t in self.asked_at.values())
            lower_asked = []

            def on_ask(rank):
                self._answer(rank)
                if rank < self.rank:
                    lower_asked.append(rank)

            if first:
                states.update(self.peers.ask_all(ASK_TIMEOUT_S, on_ask))
                first = not lower_asked
            source = f"answers over MPI; files in {self.state_dir} for ranks that did not answer"
        else:
            first = self._claim_report()
            source = f"from {self.state_dir}"
        if first:
            lines = [f"{self.prefix} watchdog: stuck for {now - started:.1f}s in {name}{step} "
                     f"started at {_clock(started_wall)} (timeout {timeout_s:g}s: "
                     f"watchdog_timeout / HYBRIDPS_WATCHDOG_TIMEOUT); aborting the whole job.",
                     f"{self.prefix} watchdog: state of every rank ({source}):"]
            lines += self._describe_all_ranks(states)
            lines.append(f"{self.prefix} watchdog: a rank 'not in a collective' while the others "
                         f"wait is the one to look at (slow data, a hang, or code paths that "
                         f"differ between ranks); raise watchdog_timeout if the wait is legitimate.")
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        else:
            # Another rank reports and is aborting the job; give it time.
            self.stop_event.wait(5.0)
        try:
            self.abort(EXIT_CODE)
        finally:
            os._exit(EXIT_CODE)

    def _claim_report(self):
        try:
            fd = os.open(os.path.join(self.state_dir, f"reported-{self.job_key}"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False
        except OSError:
            return True
        os.write(fd, str(self.rank).encode())
        os.close(fd)
        return True

    def _describe_all_ranks(self, states):
        lines = []
        for rank in range(self.size):
            path = os.path.join(self.state_dir, f"rank{rank}.json")
            state = states.get(rank)
            if state is None:
                try:
                    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as fh:
                        state = json.load(fh)
                except (OSError, ValueError):
                    state = None
            if state is None or state.get("job") != self.job_key:
                host = f" ({self.hosts[rank]})" if self.hosts else ""
                if self.peers is not None:
                    lines.append(f"  rank {rank}{host}: no answer within {ASK_TIMEOUT_S:g}s and no "
                                 f"state file: its host{host} is down or unreachable, or the "
                                 f"process exited or is stuck outside Python")
                else:
                    lines.append(f"  rank {rank}: no state (on another node without a shared "
                                 f"HYBRIDPS_WATCHDOG_DIR, or exited, or no state lasted "
                                 f"{_write_after(self.timeout()):g}s)")
                continue
            try:
                lines.append(describe_state(state))
            except (KeyError, TypeError, ValueError):
                lines.append(f"  rank {rank}: unreadable state file {path}")
        return lines


def _private_dir(path):
    """True when ``path`` is (or is now created as) a directory of this user that nobody else
    can write; False for a symlink, a non-directory, another user's or a group/world-writable
    one (module doc)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _write_after(timeout_s):
    """Seconds a state must last before it is written: a quarter of the timeout, 0.5-10 s."""
    return min(max(timeout_s / 4.0, POLL_INTERVAL_S), 10.0)


def _stale_after(refresh_s):
    """Seconds after which a state file a live rank refreshes every ``refresh_s`` is stale."""
    return 2.0 * refresh_s + 2.0 * POLL_INTERVAL_S


def _process_state(host, pid):
    """'stopped', 'a zombie', 'gone' ... of a process on this host (from /proc), else None."""
    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            code = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone (no such process)"
    return {"T": "stopped (SIGSTOP/SIGTSTP)", "t": "stopped by a debugger", "Z": "a zombie (exited)",
            "D": "in uninterruptible I/O", "R": "running", "S": "sleeping"}.get(code, f"in state {code}")


def describe_state(state, now=None):
    """One or more lines saying where the rank of a state file is (used in the dump)."""
    now = time.time() if now is None else now
    age = now - state["written"]
    head = (f"  rank {state['rank']} ({state['host']}, pid {state['pid']}, "
            f"state written {age:.1f}s ago):")
    lines = []
    refresh_s = state.get("refresh_s")
    if refresh_s is not None and age > _stale_after(refresh_s):
        process = _process_state(state["host"], state["pid"])
        lines.append(f"  rank {state['rank']} ({state['host']}, pid {state['pid']}): NO UPDATE for "
                     f"{age:.1f}s although a running rank refreshes its state every {refresh_s:g}s: "
                     f"the rank is stopped (SIGSTOP, a debugger) or hung outside Python (a C call "
                     f"holding the GIL)" + (f"; the process is {process}" if process else "")
                     + f". Its last state, {age:.1f}s old:")
    for c in state["collectives"]:
        step = f" (step {c['step']})" if c.get("step") is not None else ""
        lines.append(f"{head} in {c['name']}{step} for {c['seconds'] + age:.1f}s since "
                     f"{_clock(c['since'])} [{c['thread']}] at {' <- '.join(c['where']) or '?'}")
    if not state["collectives"]:
        last = state.get("last")
        since = (f"; last collective {last['name']} ended {_clock(last['ended'])}"
                 if last else "; no collective completed yet")
        main = state.get("main") or {}
        step = f" (step {main['step']})" if main.get("step") is not None else ""
        lines.append(f"{head} not in a collective{step}{since}; main thread at "
                     f"{' <- '.join(main.get('where') or []) or '?'}")
    return "\n".join(lines)


def _clock(wall):
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def _thread_name(tid):
    for thread in threading.enumerate():
        if thread.ident == tid:
            return thread.name
    return str(tid)


def _where(frame):
    if frame is None:
        return []
    summary = traceback.extract_stack(frame, limit=_STACK_FRAMES)
    return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(summary)]


def _step_of(tid, main_tid):
    step = _steps.get(tid)
    return step if step is not None else _steps.get(main_tid)


_STATE = {"watchdog": None}


def start(rank, size, abort, job_key, peers=None, hosts=None):
    """Start this rank's watchdog thread (hybridps.process_control starts it once, with size > 1).

    Args:
        rank, size: this process' rank and the world size.
        abort: callable(error_code) that aborts the whole job (MPI_Abort).
        job_key: a string equal on every rank of the job (names the default state directory).
        peers: the channel to ask other ranks for their state (Peers:
            ``asks()``, ``answer(rank, state)``, ``ask_all(timeout_s, on_ask)``), or None to
            rely on state files only.
        hosts: host name of every rank (named for ranks that do not answer), or None.
    Returns:
        the watchdog (an internal object); :func:`configure` sets its timeout.
    """
    if _STATE["watchdog"] is not None:
        return _STATE["watchdog"]
    from hybridps.config import env_watchdog_dir
    user_dir = env_watchdog_dir()
    state_dir = user_dir or os.path.join(tempfile.gettempdir(), f"hybridps-watchdog-{job_key}")
    watchdog = _Watchdog(rank, size, abort, state_dir, job_key, peers=peers, hosts=hosts)
    watchdog.owns_dir = not user_dir
    watchdog.timeout_s = _STATE.get("timeout_s")
    watchdog.remove_state()             # a stale file of an earlier job in a reused directory
    _STATE["watchdog"] = watchdog
    watchdog.thread.start()
    atexit.register(stop)
    return watchdog


def configure(timeout_s=None):
    """Set the watchdog timeout in seconds: a collective running longer aborts the job.

    Call it any time, before or after :func:`start` (the trainer calls it with
    ``config.watchdog_timeout``). ``None`` means ``HYBRIDPS_WATCHDOG_TIMEOUT`` when set, else
    300 s.

    Args:
        timeout_s: seconds (> 0) or None.
    Raises:
        ConfigError: timeout_s is not a positive number.
    """
    from hybridps.errors import ConfigError
    if timeout_s is not None:
        try:
            timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            raise ConfigError(f"watchdog timeout must be seconds > 0, got {timeout_s!r}") from None
        if not timeout_s > 0:
            raise ConfigError(f"watchdog timeout must be seconds > 0, got {timeout_s!r}")
    _STATE["timeout_s"] = timeout_s
    if _STATE["watchdog"] is not None:
        _STATE["watchdog"].timeout_s = timeout_s


def current_timeout():
    """The timeout in seconds the watchdog applies (or would apply once started)."""
    if _STATE["watchdog"] is not None:
        return _STATE["watchdog"].timeout()
    if _STATE.get("timeout_s") is not None:
        return _STATE["timeout_s"]
    from hybridps.config import env_watchdog_timeout
    return env_watchdog_timeout() or DEFAULT_TIMEOUT_S


def state_dir():
    """This rank's state directory, or None before :func:`start`."""
    return _STATE["watchdog"].state_dir if _STATE["watchdog"] is not None else None


def discard_state():
    """Remove this rank's state file (before an abort for another reason than the watchdog)."""
    if _STATE["watchdog"] is not None:
        _STATE["watchdog"].remove_state()


def stop():
    """Stop the watchdog thread and remove this rank's state file (normal exit)."""
    watchdog = _STATE["watchdog"]
    if watchdog is None:
        return
    watchdog.stop_event.set()
    if watchdog.thread is not threading.current_thread():
        watchdog.thread.join(timeout=2 * POLL_INTERVAL_S)
    watchdog.remove_state()
    _STATE["watchdog"] = None


class Peers:
    """The watchdogs' own wire protocol: point-to-point messages on a duplicate of COMM_WORLD.

    A rank whose collective is stuck asks every other rank for its state and gets the answers
    over MPI, so the watchdog's report needs no shared directory; each rank's watchdog thread
    answers asks when it polls (hybridps.watchdog). Small pickled control messages only,
    received by probing (nothing stays posted, so MPI_Finalize finds no pending receive).
    Errors return instead of aborting: a peer on a dead host must not abort the report.
    """

    ASK, ANSWER = 901, 902

    def __init__(self, comm):
        """``comm``: the hybridps.comm.Comm of this process (its MPI module and world)."""
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
