"""hybridps.export: serving artifacts built on checkpoints.

* :mod:`saved_model`: a TensorFlow SavedModel that serves the model from raw feature ids
  (``hybridps export``);
* :mod:`delta`: rows changed since the previous delta, written while training runs, and their
  application to an exported model.

Both work on checkpoints and backend states through hybridps.checkpoint's public functions.
"""
from hybridps.export.delta import DeltaExporter, apply_delta, list_deltas, load_delta, write_delta
from hybridps.export.saved_model import add_export_arguments, build_serving_module, export_saved_model

__all__ = ["DeltaExporter", "add_export_arguments", "apply_delta", "build_serving_module",
           "export_saved_model", "list_deltas", "load_delta", "write_delta"]
