"""hybridps.export: serving artifacts built on checkpoints.

* :mod:`saved_model`: a TensorFlow SavedModel that serves the model from raw feature values
  (``hybridps export``), with :mod:`tf_hashing`, the readers' hashing in TensorFlow ops;
* :mod:`delta`: numbered delta exports (rows changed, keys evicted) and full exports (every
  row and the model description), written while training runs, and their application to an
  exported model (hybridps.serving follows such a directory).

Both work on checkpoints and backend states through hybridps.checkpoint's public functions.
"""
from hybridps.export.delta import (DeltaExporter, apply_delta, apply_export, list_deltas, list_exports,
                                   load_delta, load_export, model_description, write_delta,
                                   write_full_export)
from hybridps.export.saved_model import add_export_arguments, build_serving_module, export_saved_model

__all__ = ["DeltaExporter", "add_export_arguments", "apply_delta", "apply_export",
           "build_serving_module", "export_saved_model", "list_deltas", "list_exports", "load_delta",
           "load_export", "model_description", "write_delta", "write_full_export"]
