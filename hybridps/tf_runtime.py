"""TensorFlow's process setup: its thread pools and log level, before the first TF op.

What lives here: :func:`configure_tensorflow` and :func:`default_tf_threads`, shared by the
trainer, evaluation and prediction, the server and the benchmark workers; and
:func:`skip_keras_optional_imports`, which hybridps's own programs (the command line, the
benchmark workers) call first. What does not: any model or step (hybridps.step, hybridps.models).
"""
import importlib.abc
import os
import sys

from hybridps import config as config_module


def configure_tensorflow(threads):
    """Thread pools of ``threads`` (intra and inter op) and quiet logs; call before any TF op."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already initialised in this process (tests); keep the first setting
    return tf


def default_tf_threads(config, local_size):
    """config.tf_threads, else HYBRIDPS_TF_THREADS, else the cores of this node per local rank."""
    if config.tf_threads:
        return config.tf_threads
    from_env = config_module.env_tf_threads()
    if from_env:
        return from_env
    return max(1, (os.cpu_count() or 1) // max(local_size, 1))


# Keras imports scikit-learn, pandas and matplotlib at its own import whenever they are
# installed, for its scikit-learn wrappers, pandas DataFrame inputs to fit/predict and its image
# plots. A hybridps process uses none of them through Keras, and they cost about 3 s of CPU at
# every start (of about 9.5 s for TensorFlow with Keras, on a 2-core machine): every rank of
# every job, every `hybridps serve`, `predict` and `evaluate` pays it.
KERAS_OPTIONAL_IMPORTS = frozenset({"sklearn", "pandas", "matplotlib"})


class _SkipKerasOptionalImports(importlib.abc.MetaPathFinder):
    """Answers Keras's own ``import pandas`` (and scikit-learn, matplotlib) as not installed;
    any other importer, and any of them already imported, is untouched."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in KERAS_OPTIONAL_IMPORTS and _importer_is_keras():
            raise ModuleNotFoundError(f"{name} is not loaded for Keras in a hybridps process "
                                      f"(hybridps.tf_runtime.skip_keras_optional_imports)", name=name)
        return None


def _importer_is_keras():
    """Whether the module running the import statement is part of Keras (the first frame
    outside the import machinery)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    importer = frame.f_globals.get("__name__", "") if frame is not None else ""
    return importer.partition(".")[0] in ("keras", "tf_keras")


def skip_keras_optional_imports():
    """From now on in this process, Keras starts without scikit-learn, pandas and matplotlib
    (the module comment above says why); hybridps's own programs call this first. Programs that
    import hybridps as a library keep Keras as it is. Calling it again does nothing."""
    if not any(isinstance(finder, _SkipKerasOptionalImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SkipKerasOptionalImports())
