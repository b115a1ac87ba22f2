"""Saving a serving module as a SavedModel, atomically (a temporary directory, then a rename).

Shared by hybridps.export.saved_model (full exports) and hybridps.export.delta (a new
SavedModel version with a delta applied). TF Serving and ``tf.saved_model.load`` both run the
``serving_default`` signature.
"""
import os
import shutil

from hybridps.checkpoint.files import fsync_dir
from hybridps.errors import CheckpointError


def serving_signature(module):
    signatures = getattr(module, "signatures", None)
    if signatures and "serving_default" in signatures:
        return signatures["serving_default"]
    return module.serve.get_concrete_function()


def save_atomically(tf, module, out_dir, overwrite):
    """tf.saved_model.save into OUT.tmp-<pid>, then rename to OUT (replacing it if allowed)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass overwrite=True (--overwrite) or another path "
                              f"(for TF Serving: a new version directory)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures={"serving_default": serving_signature(module)})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    fsync_dir(parent)
    return out_dir
