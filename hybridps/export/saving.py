"""Saving a serving module as a SavedModel, atomically (a temporary directory, then a rename).

Shared by hybridps.export.saved_model (full exports) and hybridps.export.delta (a new
SavedModel version with a delta applied). TF Serving and ``tf.saved_model.load`` run the
``serving_default`` signature (raw values); ``ids`` is the same model from int64 ids (Criteo
preset: keys). A SavedModel loaded from disk keeps the signatures it was written with, so a
delta applied to an export of earlier hybridps (``serving_default`` on ids) saves that form.
"""
import os
import shutil

from hybridps.checkpoint.files import fsync_dir
from hybridps.errors import CheckpointError


def serving_signatures(module):
    """The signatures to save: a loaded SavedModel's own, a ServingModule's
    ``serving_default`` (``serve_values``) and ``ids`` (``serve``)."""
    signatures = getattr(module, "signatures", None)
    if signatures:
        return dict(signatures)
    return {"serving_default": module.serve_values.get_concrete_function(),
            "ids": module.serve.get_concrete_function()}


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
    tf.saved_model.save(module, tmp, signatures=serving_signatures(module))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    fsync_dir(parent)
    return out_dir
