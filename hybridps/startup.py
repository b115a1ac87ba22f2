"""Start-up checks every rank runs before training, so a long job does not fail late.

What lives here: every rank runs the same effective config (the mismatch error names the
differing fields and each rank's value), every output path is writable and of the right kind,
and every rank read the same data (with rank 0's one-line report of skipped lines and the
warning about batches larger than a rank's share). Each check is collective and raises one
clear error on every rank. What does not: the config's own validation (hybridps.config).
"""
import os
import sys

from hybridps import config as config_module
from hybridps.data.stats import (combine_data_stats, data_file_differences, skipped_lines_summary,
                                 small_share_warning)
from hybridps.errors import ConfigError, DataError
from hybridps.shared_dir import require_shared


def check_same_config(comm, config):
    """Raise ConfigError on every rank if any rank's effective config differs from rank 0's."""
    mine = config_module.config_hash(config)
    hashes = comm.allgather_object(mine)
    differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differing:
        shared = comm.allgather_object(config_module.shared_config(config))
        fields = []
        for name in sorted(set().union(*shared)):
            values = [d.get(name) for d in shared]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values)
                                  if r == 0 or v != values[0])
                fields.append(f"{name} ({shown})")
        raise ConfigError(
            f"ranks {differing} run a different effective config than rank 0 (config hash "
            f"{hashes[0][:12]} on rank 0, {hashes[differing[0]][:12]} on rank {differing[0]}); "
            f"differing field(s): {'; '.join(fields)}. Give every rank the same --config file "
            f"and flags.")


def check_output_paths(comm, config):
    """Every rank checks the paths it will write before training (one ConfigError naming the
    field, the path and the ranks), so a long run does not fail at its end."""
    problems = comm.allgather_object(output_path_problems(config, comm.rank))
    by_message = {}
    for rank, messages in enumerate(problems):
        for message in messages:
            by_message.setdefault(message, []).append(rank)

    def where(ranks):
        if comm.size == 1:
            return ""
        return f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"

    if by_message:
        raise ConfigError("; ".join(m + where(r) for m, r in by_message.items()))
    # checkpoints and deltas are written by every rank into one directory: all must see it
    require_shared(comm, {"--checkpoint-dir": config.checkpoint_dir,
                          "--delta-export-dir": config.delta_export_dir})


def check_data(comm, config, dataset):
    """Collective, once the data is read (``dataset`` None on ranks that read none): every rank
    must have read the same file (size and content hash; a DataError otherwise); rank 0 prints
    one line about skipped lines (on_bad_line=skip), with a few examples from every rank, and
    warns when a batch is larger than a rank's share of the file."""
    gathered = comm.allgather_object(
        (dataset.stats(), dataset.fingerprint()) if dataset is not None else (None, None))
    different = data_file_differences([f for _, f in gathered])
    if different:
        raise DataError(different)
    combined = combine_data_stats([s for s, _ in gathered])
    messages = [skipped_lines_summary(combined),
                small_share_warning(combined, config.batch_size, config.steps)]
    if comm.rank == 0:
        for line in filter(None, messages):
            sys.stderr.write(f"[hybridps] {line}\n")
        sys.stderr.flush()


def output_path_problems(config, rank):
    """What is wrong with the output paths this rank will write (an empty list: nothing).

    metrics_out (rank 0 writes it) must be a file name in a writable directory (missing
    directories are created at the end); dump_state, checkpoint_dir, delta_export_dir and (rank 0)
    tensorboard_dir must be writable directories or creatable ones, and ``latest`` in checkpoint_dir, if present,
    a file. Checks kinds and permissions (os.access), not free space.
    """
    problems = []
    if config.metrics_out and rank == 0:
        path = config.metrics_out
        if os.path.isdir(path):
            problems.append(f"config field 'metrics_out': {path} is a directory; give a file name "
                            f"such as {os.path.join(path, 'metrics.json')}")
        else:
            problems += _creatable("metrics_out", os.path.dirname(os.path.abspath(path)), path)
    for name in ("dump_state", "checkpoint_dir", "delta_export_dir") + (("tensorboard_dir",) if rank == 0 else ()):
        path = getattr(config, name)
        if not path:
            continue
        if os.path.lexists(path) and not os.path.isdir(path):
            problems.append(f"config field '{name}': {path} exists and is not a directory")
            continue
        problems += _creatable(name, os.path.abspath(path), path)
        latest = os.path.join(path, "latest")
        if name == "checkpoint_dir" and os.path.lexists(latest) and not os.path.isfile(latest):
            problems.append(f"config field 'checkpoint_dir': {latest} is not a file (it must be "
                            f"the pointer to the newest checkpoint, or absent); move it away")
    return problems


def _creatable(name, directory, given):
    """Problems with writing into ``directory`` (created from its nearest existing ancestor)."""
    ancestor = directory
    while not os.path.lexists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        return [f"config field '{name}': cannot create {given}: {ancestor} is not a directory"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"config field '{name}': cannot write {given}: {ancestor} is not writable "
                f"(permissions or a read-only file system)"]
    return []
