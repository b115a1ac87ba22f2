"""CheckpointManager: when a run saves and where it resumes from, on a backend's state.

What lives here: the resume point (``latest`` first, then older intact checkpoints), refused
checkpoints set aside as ``damaged-ckpt-<step>`` so no later save prunes or replaces them,
:class:`CheckpointManager` (one job per directory: rank 0 holds its lock, hybridps.checkpoint.lock;
``save`` a BackendState and the data position after a step;
``resume`` a BackendState from the newest intact checkpoint) and the check that restored rows
sit where the key routing sends them. It works on a backend's state (hybridps.backends.base),
never on a Trainer. What does not: the format (hybridps.checkpoint.format), reading and
writing (reader, writer).
"""
import os
import sys

import numpy as np

from hybridps.checkpoint.files import CheckpointMismatchError, fsync_dir
from hybridps.checkpoint.format import (CKPT_NAME, DAMAGED_PREFIX, LATEST, OWNER_FUNCTION, ResumePoint,
                                        list_checkpoints)
from hybridps.checkpoint.lock import lock_checkpoint_dir, unlock_checkpoint_dir
from hybridps.checkpoint.reader import NO_SHARD, restore_checkpoint, shard_of, verify_checkpoint
from hybridps.checkpoint.writer import remove_stale_temporaries, save_checkpoint
from hybridps.errors import CheckpointError, ConfigError
from hybridps.wording import counted


def recorded_config(root):
    """The config dict recorded by the checkpoint a resume from ``root`` would take (its
    manifest's ``config``), or None without one."""
    from hybridps.checkpoint.reader import load_manifest
    if not root or not os.path.isdir(root):
        return None
    point = find_resume_point(root)
    return load_manifest(point.path).get("config") if point.path else None


def find_resume_point(root, verify="quick"):
    """The checkpoint to resume from: the one ``latest`` names, or the newest older intact one.

    ``latest`` is the authority: it is replaced only after a checkpoint is complete. Older
    checkpoints are tried newest first when it is damaged; checkpoints newer than it (an
    abandoned run resumed from an older step, or a crash between a rename and the pointer
    update) are ignored with a warning. Without a readable ``latest`` every checkpoint is a
    candidate, newest first.

    Args:
        verify: "quick" or "full" (see :func:`verify_checkpoint`).
    Returns:
        ResumePoint(path or None, step (0 without a checkpoint), warnings list of str).
    """
    warnings = []
    candidates = list_checkpoints(root)
    latest_path = os.path.join(root, LATEST)
    latest_step = None
    if os.path.isfile(latest_path):
        with open(latest_path, errors="replace") as fh:
            match = CKPT_NAME.match(fh.read(200).strip())
        if match is None:
            warnings.append(f"{latest_path} does not name a checkpoint; trying every checkpoint")
        elif not os.path.isdir(os.path.join(root, match.group(0))):
            warnings.append(f"{latest_path} names {match.group(0)}, which does not exist")
            latest_step = int(match.group(1))
        else:
            latest_step = int(match.group(1))
    elif candidates:
        warnings.append(f"{latest_path} is missing; trying every checkpoint")
    if latest_step is not None:
        newer = [p for s, p in candidates if s > latest_step]
        if newer:
            warnings.append(f"ignoring {', '.join(os.path.basename(p) for p in newer)}: newer than "
                            f"{LATEST} (an abandoned run or a save that did not finish)")
        candidates = [(s, p) for s, p in candidates if s <= latest_step]
    damaged = []
    for step, path in reversed(candidates):
        problems = verify_checkpoint(path, level=verify)
        if not problems:
            if warnings and step != latest_step:
                warnings.append(f"falling back to {path} (step {step})")
            return ResumePoint(path, step, warnings, damaged)
        damaged.append((path, problems))
        warnings.append(f"checkpoint {path} is damaged, skipping it: {shown_problems(problems)}")
    if candidates:
        warnings.append(f"no intact checkpoint under {root}")
    return ResumePoint(None, 0, warnings, damaged)


def shown_problems(problems, limit=3):
    return "; ".join(problems[:limit]) + (f" (+{len(problems) - limit} more)" if len(problems) > limit else "")


def resume_candidates(root, verify="quick"):
    """(paths to try in order, warnings): the resume point, then every older checkpoint."""
    paths, warnings, _ = _resume_plan(root, verify)
    return paths, warnings


def _resume_plan(root, verify="quick"):
    """(paths to try in order, warnings, [(path, problems)] of the checkpoints refused)."""
    point = find_resume_point(root, verify)
    if point.path is None:
        return [], point.warnings, point.damaged
    older = [p for s, p in reversed(list_checkpoints(root)) if s < point.step]
    return [point.path] + older, point.warnings, point.damaged


def set_aside_damaged(root, paths):
    """Rename each refused checkpoint ``ckpt-<step>`` to ``damaged-ckpt-<step>`` (``.2``,
    ``.3``, ... when taken), so that no later save prunes or replaces it; remove ``latest`` if
    it names one of them. Returns the new paths.

    Raises:
        CheckpointError: a rename failed (nothing else is tried after it).
    """
    moved = []
    latest_path = os.path.join(root, LATEST)
    latest = None
    if os.path.isfile(latest_path):
        with open(latest_path, errors="replace") as fh:
            latest = fh.read(200).strip()
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        target = os.path.join(root, DAMAGED_PREFIX + name)
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(root, f"{DAMAGED_PREFIX}{name}.{n}")
        try:
            os.rename(path, target)
        except OSError as exc:
            raise CheckpointError(f"cannot set the damaged checkpoint {path} aside as {target}: {exc}") from None
        moved.append(target)
        if latest == name:
            try:
                os.unlink(latest_path)
            except OSError as exc:
                raise CheckpointError(f"cannot remove {latest_path} (it names the damaged {path}): {exc}") from None
    if moved:
        fsync_dir(root)
    return moved


def _set_aside_collectively(comm, root, refused, log):
    """rank 0 sets the refused checkpoints aside; every rank learns whether that worked."""
    result = None
    if comm.rank == 0:
        try:
            result = set_aside_damaged(root, [path for path, _ in refused])
        except CheckpointError as exc:
            result = exc
    result = comm.bcast_object(result if not isinstance(result, CheckpointError) else str(result))
    if isinstance(result, str):
        raise CheckpointError(result)
    if comm.rank == 0:
        for (path, _), target in zip(refused, result):
            log(f"kept the damaged {path} as {target} (no save prunes or replaces it; inspect it "
                f"with `hybridps inspect {target}`, delete it when done)")


class CheckpointManager:
    """Saves and resumes a run's checkpoints under ``config.checkpoint_dir``.

    Creating it is collective: rank 0 (the writer of the shared files) takes the directory's
    lock (hybridps.checkpoint.lock) until :meth:`close` or the end of the process, then deletes
    the temporary directories of saves that did not finish (no running job owns them: the lock
    is held).

    Args:
        config: TrainConfig (checkpoint_dir, keep_checkpoints, resume_fresh, num_buckets).
        schema: the run's FeatureSchema (recorded in every checkpoint; restores check it).
        comm: hybridps.comm.Comm (every method is collective over all ranks).
        log: where messages go (default: stderr on rank 0).
    Raises:
        ConfigError: another job holds the directory's lock (on every rank, naming it).
    """

    def __init__(self, config, schema, comm, log=None):
        self.config = config
        self.schema = schema
        self.comm = comm
        self.root = config.checkpoint_dir
        self.log = log or (lambda message: sys.stderr.write(f"[hybridps] checkpoint: {message}\n"))
        self._lock()

    def close(self):
        """The job is done with the directory: rank 0 releases its lock (not collective)."""
        if self.comm.rank == 0 and self._locked:
            self._locked = False
            unlock_checkpoint_dir(self.root)

    def _lock(self):
        outcome, self._locked = None, False
        if self.comm.rank == 0:
            try:
                no_lock = lock_checkpoint_dir(self.root)
                if no_lock:          # another job's save may be under way: leave its files
                    self.log(no_lock)
                else:
                    self._locked = True
                    remove_stale_temporaries(self.root)
            except ConfigError as exc:
                outcome = str(exc)
        outcome = self.comm.bcast_object(outcome)
        if outcome:
            raise ConfigError(outcome)

    def save(self, step, state, data_state):
        """Checkpoint a BackendState after ``step`` completed steps (collective). Call it when
        the tables hold exactly the updates of the steps < ``step`` (a consistent point);
        ``data_state`` is this rank's data position after those steps (None on ranks that read
        no data). In PS mode the servers write the table shards (workers' shards are empty).

        Raises:
            CheckpointError: a failed write.
        """
        return save_checkpoint(self.root, step, tables=state.tables, comm=self.comm,
                               config=self.config, schema=self.schema, model=state.model,
                               optimizer=state.dense_optimizer, data_state=data_state,
                               keep=self.config.keep_checkpoints)

    def resume(self, state):
        """Restore a BackendState from the newest intact checkpoint (collective).

        Damaged checkpoints are skipped (newest first) with a warning, and once an older one is
        restored they are set aside as ``damaged-ckpt-<step>`` (:func:`set_aside_damaged`), so
        the resumed run never prunes or replaces them. With no checkpoint at all under the root
        (a first run: no ``ckpt-*`` directory, no ``latest``) training starts at step 0 with a
        message. With checkpoints but none intact the resume is refused (CheckpointError naming
        every damaged file; nothing is changed on disk) unless ``config.resume_fresh``: then the
        damaged ones are set aside and training starts at step 0.

        Args:
            state: the backend's ``restore_target()``: empty tables, the model, the optimizer.
        Returns:
            (the step to start at, this rank's data position or None, messages for the summary).
        Raises:
            CheckpointError: no intact checkpoint among existing ones (without resume_fresh), a
                damaged checkpoint could not be set aside, the routing of keys to ranks
                disagrees with the checkpoint's owner function, or a checkpoint of another model.
                The job ends: the directory's lock is released (:meth:`close`).
        """
        try:
            return self._resume(state)
        except CheckpointError:
            self.close()
            raise

    def _resume(self, state):
        comm, root, messages = self.comm, self.root, []

        def log(message):
            messages.append(message)
            if comm.rank == 0:
                self.log(message)

        shard = state.shard if state.shard is not None else NO_SHARD
        plan = None
        if comm.rank == 0:
            candidates, warnings, refused = _resume_plan(root)
            plan = (candidates, warnings, refused, _latest_problem(root, candidates, refused))
        candidates, warnings, refused, latest_problem = comm.bcast_object(plan)
        report = None
        for path in candidates:
            try:
                report = restore_checkpoint(
                    path, tables=state.tables, comm=comm, config=self.config, schema=self.schema,
                    model=state.model, optimizer=state.dense_optimizer, restore_rng=True, shard=shard)
                break
            except CheckpointMismatchError:
                raise
            except CheckpointError as exc:
                warnings.append(f"cannot restore {path}, trying an older one: {exc}")
                refused.append((path, [str(exc)]))
        if report is None:
            if not refused and latest_problem is None:   # nothing was ever checkpointed here
                set_aside = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                                   if n.startswith(DAMAGED_PREFIX))
                warnings.append(f"no checkpoint to resume from under {root}; starting from step 0"
                                + (f" (set aside earlier: {', '.join(set_aside)})" if set_aside else ""))
                for message in warnings:
                    log(message)
                return 0, None, messages
            damage = "; ".join([f"{os.path.basename(p)}: {shown_problems(problems)}" for p, problems in refused]
                               + ([latest_problem] if latest_problem else []))
            if not self.config.resume_fresh:
                raise CheckpointError(
                    f"cannot resume: no intact checkpoint under {root} ({damage}). Nothing there was "
                    f"changed. Repair or move the damaged checkpoints away, or add --resume-fresh "
                    f"(config resume_fresh: true) to start from step 0 with them kept aside as "
                    f"{DAMAGED_PREFIX}ckpt-<step>")
            for message in warnings:
                log(message)
            log(f"resume_fresh: starting from step 0 (no intact checkpoint under {root})")
            _set_aside_collectively(comm, root, refused, log)
            return 0, None, messages
        check_routing(state.tables, report, comm, shard=shard)
        for message in warnings + report.warnings:
            log(message)
        if refused:   # newer than the one restored: the resumed run would prune or replace them
            _set_aside_collectively(comm, root, refused, log)
        where = (counted(comm.size, "rank") if state.shard is None or state.shard[1] == comm.size else
                 f"{comm.size} ranks, {state.shard[1]} of them owning keys (PS servers)")
        log(f"resumed from {report.path} (step {report.step}, saved on "
            f"{counted(report.saved_world_size, 'rank')}, restored on {where})")
        return report.step, report.data_state, messages


def _latest_problem(root, candidates, refused):
    """What is wrong with ``latest`` when no checkpoint it could name exists (None: nothing,
    or there are checkpoints to try or refuse)."""
    path = os.path.join(root, LATEST)
    if candidates or refused or not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        return f"{path} is not a file"
    with open(path, errors="replace") as fh:
        name = fh.read(200).strip()
    return f"{path} names {name[:60]!r}, which is not a checkpoint there"


def check_routing(tables, report, comm, owner_fn=None, shard=None):
    """Raise CheckpointError if the exchange routes restored keys to another rank.

    ``shard``: (index, count) this rank's place among the key owners (default (rank, size);
    PS servers: (server index, number of servers)), or NO_SHARD for a rank that holds no keys.

    ``owner_fn(keys, world_size, num_buckets)``; default the exchange's own routing,
    hybridps.sparse.routing.owner_ranks.
    """
    if owner_fn is None:
        from hybridps.sparse.routing import owner_ranks as owner_fn
    num_buckets = report.num_buckets
    index, count = shard_of(shard, comm)
    wrong = 0
    for table in tables:
        keys = table.export(values=False)["keys"]
        if len(keys):
            wrong += (len(keys) if index is None
                      else int((np.asarray(owner_fn(keys, count, num_buckets)) != index).sum()))
    total_wrong = comm.allgather_object(wrong)
    if sum(total_wrong):
        raise CheckpointError(
            f"{sum(total_wrong)} restored rows sit on a rank that the key routing does not send "
            f"them to: the routing must use owner(key) = {OWNER_FUNCTION} (num_buckets="
            f"{num_buckets}), which equals mix64(key) % world_size only when world_size divides "
            f"num_buckets; restore on {count} key owners needs the bucket-based routing")
