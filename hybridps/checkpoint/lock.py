"""One training job per checkpoint directory: an exclusive lock on ``ROOT/.hybridps.lock``.

What lives here: :func:`lock_checkpoint_dir` (take the lock or refuse, naming the job that
holds it), :func:`unlock_checkpoint_dir` and :func:`read_holder`. What does not: when a job
takes it (hybridps.checkpoint.manager, rank 0, before training), the checkpoint files (writer,
reader).

Two jobs saving into one directory would delete each other's temporary directories, prune
each other's checkpoints and move ``latest`` back and forth. So the writer of the shared files
(rank 0) takes an exclusive, non-blocking POSIX record lock (``fcntl.lockf``) on
``ROOT/.hybridps.lock`` at start-up and holds it until the job ends, with the holder (host,
pid, start time, batch job id) written into the file; a second job finds it held and stops
before training with a ConfigError naming that holder.

The kernel releases the lock when the holding process ends, however it ends (exit, crash,
SIGKILL, a lost node on NFS once its lease expires), so there is no stale lock to remove by
hand: a file left behind by a killed job is only a note, and the next job takes it over. A job
that ends normally removes the file (while still holding the lock; a job that opened the old
file meanwhile sees that it is gone and locks the new one). On NFS (v4, or v3 with lockd) the
lock is taken on the server, so it holds across hosts; a file system that offers no locks
(some FUSE mounts, Lustre mounted without ``flock``/``localflock``) gets a warning and no lock.

A process holds one lock per directory: a second CheckpointManager of the same process (runs
one after another in one Python process) shares it, counted; POSIX locks belong to the process,
and a second open-and-close of the file would release it, so the file is opened once.
"""
import atexit
import datetime
import errno
import fcntl
import json
import os
import socket

from hybridps.errors import ConfigError

LOCK_FILE = ".hybridps.lock"
_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
_held = {}          # real path of a locked directory -> [descriptor of its lock file, users, path]


def _holder_info():
    job = next(((name, os.environ[name]) for name in _JOB_ID_VARIABLES if os.environ.get(name)), None)
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "job_id": f"{job[0]}={job[1]}" if job else None}


def read_holder(root):
    """The holder recorded in ``root``'s lock file (a dict), or None when unreadable."""
    try:
        with open(os.path.join(root, LOCK_FILE), "rb") as fh:
            holder = json.loads(fh.read(4096) or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder):
    if not holder:
        return "a job whose details are not written yet"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    return text + (f" (batch job {holder['job_id']})" if holder.get("job_id") else "")


def lock_checkpoint_dir(root):
    """Take the exclusive lock of checkpoint directory ``root`` (created if missing) until
    :func:`unlock_checkpoint_dir` or the end of this process.

    Returns:
        None, or a warning (str) when the file system offers no locks (no lock is held then).
    Raises:
        ConfigError: another process holds it (the message names it and says what to do), or
            the lock file cannot be created.
    """
    root = os.path.abspath(root)
    key = os.path.realpath(root)
    if key in _held:
        _held[key][1] += 1
        return None
    path = os.path.join(root, LOCK_FILE)
    while True:
        try:
            os.makedirs(root, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"--checkpoint-dir {root}: cannot create its lock file {path}: {exc}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(
                    f"--checkpoint-dir {root} is in use by another training job: "
                    f"{describe_holder(read_holder(root))} holds {path}. Two jobs saving into one "
                    f"directory destroy each other's checkpoints. Wait for that job to end (or stop "
                    f"it), or give this job another --checkpoint-dir. The lock goes away by itself "
                    f"when that process ends; there is nothing to delete.") from None
            return (f"--checkpoint-dir {root}: its file system offers no file locks ({exc}); "
                    f"nothing stops a second job from saving into it at the same time")
        if _same_file(fd, path):
            break
        os.close(fd)        # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode() + b"\n", 0)
    except OSError:
        pass        # the lock is what counts; the note only helps the next job's message
    _held[key] = [fd, 1, path]
    return None


def unlock_checkpoint_dir(root):
    """Give back one :func:`lock_checkpoint_dir` of ``root``; the last one removes the lock
    file and releases the lock (the end of a job)."""
    key = os.path.realpath(os.path.abspath(root))
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        _release(_held.pop(key))


def _release(held):
    fd, _, path = held
    try:
        os.unlink(path)     # while locked: a job that opened it before finds it gone, retries
    except OSError:
        pass
    os.close(fd)


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


@atexit.register
def _release_all():
    while _held:
        _release(_held.popitem()[1])
