"""Checkpoints on several hosts need one directory that every rank sees: checked at start-up.

A checkpoint is one directory: every rank writes its shard into a temporary directory that
rank 0 created, rank 0 writes the manifest and renames it (hybridps.checkpoint); a restore
onto any number of ranks reads the buckets each rank now owns from the same place. So every
rank must see the same directory, i.e. a shared file system (NFS, Lustre, GPFS, BeeGFS ...)
mounted at the same path on every node. hybridps does not gather node-local shards: a
checkpoint spread over local disks is lost with any one node, and a restore on other nodes
could not read it. Delta exports (``--delta-export-dir``) are written the same way.

What lives here: :func:`require_shared`, one collective round before training: rank 0
writes a probe file with a random token into each directory, every rank looks for it, and
if any rank does not see it every rank raises a :class:`CheckpointError` that names the
directory, the ranks and their hosts, before any step is wasted. What does not: writing or
reading checkpoints (hybridps.checkpoint).
"""
import os
import secrets
import socket
import time

from hybridps.errors import CheckpointError

PROBE_PREFIX = ".hybridps-shared-"
_LOOK_FOR_S = 2.0           # network file systems may show a new file a moment later


def require_shared(comm, directories):
    """Raise on every rank unless each directory is the same one on every rank.

    Args:
        comm: hybridps.comm.Comm (or any object with rank, size, bcast_object, allgather_object).
        directories: {flag name: path or None}; None / empty paths are skipped.
    Raises:
        CheckpointError: rank 0 cannot create a directory or its probe file, or some ranks do
            not see the probe file (the message says which ranks, on which hosts, and what to do).
    """
    wanted = [(flag, os.path.abspath(path)) for flag, path in directories.items() if path]
    if comm.size == 1 or not wanted:
        return
    token = comm.bcast_object(secrets.token_hex(8) if comm.rank == 0 else None, root=0)
    probes = [os.path.join(path, f"{PROBE_PREFIX}{token}") for _, path in wanted]
    error = None
    if comm.rank == 0:
        try:
            for probe in probes:
                os.makedirs(os.path.dirname(probe), exist_ok=True)
                with open(probe, "w") as fh:
                    fh.write(token)
        except OSError as exc:
            error = f"rank 0 cannot write into {os.path.dirname(probe)}: {exc.strerror or exc}"
    error = comm.bcast_object(error, root=0)
    if error:
        raise CheckpointError(error)
    seen = [_sees(probe, token) for probe in probes]
    everyone = comm.allgather_object((socket.gethostname(), seen))
    if comm.rank == 0:
        for probe in probes:
            try:
                os.unlink(probe)
            except OSError:
                pass
    for index, (flag, path) in enumerate(wanted):
        blind = [rank for rank, (_, rank_seen) in enumerate(everyone) if not rank_seen[index]]
        if not blind:
            continue
        hosts = sorted({everyone[rank][0] for rank in blind})
        from hybridps.postmortem import rank_ranges
        raise CheckpointError(
            f"{flag} {path} is not the same directory on every rank: rank(s) {rank_ranges(blind)} "
            f"(on {', '.join(hosts)}) do not see the file rank 0 (on {everyone[0][0]}) wrote "
            f"there. hybridps writes a checkpoint as one directory that all ranks write into, "
            f"so it needs a directory every rank sees: a shared file system (NFS, Lustre, GPFS, "
            f"BeeGFS ...) mounted at the same path on every node. Use such a directory for "
            f"{flag}; node-local directories are not gathered.")


def _sees(probe, token):
    deadline = time.monotonic() + _LOOK_FOR_S
    while True:
        try:
            with open(probe) as fh:
                if fh.read() == token:
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
