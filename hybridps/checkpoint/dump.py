"""``--dump-state``: rank 0's dense weights and every rank's table shards as npz files.

A testing and debugging aid (the tests compare runs by these files): not a checkpoint, no
atomicity beyond one file at a time. Write failures raise OutputError and leave no partial file.
"""
import io
import os

import numpy as np

from hybridps.errors import OutputError


def dump_state(directory, comm, model, tables):
    """Write ``dense.npz`` (rank 0: the model's trainable variables) and
    ``table<t>.rank<r>.npz`` (keys, values, slots of every local table shard); collective.

    Raises:
        OutputError: a file could not be written (no partial file is left).
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the dump_state directory {directory}: "
                          f"{exc.strerror or exc}") from None
    if comm.rank == 0 and model is not None:
        save_npz(os.path.join(directory, "dense.npz"), *[v.numpy() for v in model.trainable_variables])
    for t, table in enumerate(tables):
        shard = table.export()
        save_npz(os.path.join(directory, f"table{t}.rank{comm.rank}.npz"),
                 keys=shard["keys"], values=shard["values"], slots=shard["slots"])
    comm.barrier()


def save_npz(path, *args, **arrays):
    """np.savez to ``path`` (built in memory, then written: a zip file that fails half-way
    would complain again when collected); on a write failure the partial file is removed and
    an OutputError names the path."""
    buffer = io.BytesIO()
    np.savez(buffer, *args, **arrays)
    try:
        with open(path, "wb") as fh:
            fh.write(buffer.getbuffer())
    except OSError as exc:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
