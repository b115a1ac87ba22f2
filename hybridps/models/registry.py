"""The one list of built-in model names, and how a ``model`` setting becomes a Keras model.

``model`` is a built-in name (``deepfm``, ``wide_deep``, ``dcn``, ``din``) or the user's own
build function: ``path/to/file.py:build`` or ``package.module:build``. A build function is
called as ``build(schema, config)`` and returns a ``tf.keras.Model`` on the input contract of
hybridps.models (docs/model.md). This module imports no TensorFlow itself, so the
config can check names without loading it.
"""
import importlib
import importlib.util
import os
import sys

from hybridps.errors import ConfigError

BUILTIN_MODELS = {"deepfm": "hybridps.models.deepfm:build",
                  "wide_deep": "hybridps.models.wide_deep:build",
                  "dcn": "hybridps.models.dcn:build",
                  "din": "hybridps.models.din:build"}
MODEL_NAMES = tuple(BUILTIN_MODELS)


def is_user_model(spec):
    return spec not in BUILTIN_MODELS


def check_model_spec(spec):
    """Raise ConfigError unless ``spec`` is a built-in name or ``file.py:function`` /
    ``package.module:function`` (the function itself is loaded at start-up)."""
    if spec in BUILTIN_MODELS:
        return
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"config field 'model': {spec!r} is neither a built-in model "
                          f"({', '.join(MODEL_NAMES)}) nor a build function given as "
                          f"path/to/file.py:build or package.module:build")


def load_build_function(spec):
    """The build function a ``model`` setting names.

    Raises:
        ConfigError: unknown name, a file or module that does not exist or fails to import
            (the error says which), or no callable of that name in it.
    """
    check_model_spec(spec)
    where, _, name = BUILTIN_MODELS.get(spec, spec).rpartition(":")
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ConfigError(f"model {spec!r}: the file {path} does not exist")
        module_name = "hybridps_user_model_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"model {spec!r}: importing {path} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"model {spec!r}: cannot import module {where!r} ({exc}); is it "
                              f"on PYTHONPATH?") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"model {spec!r}: {where} has no function {name!r}"
                          + (f" (it has {sorted(n for n in vars(module) if not n.startswith('_'))})"
                             if function is None else " (not callable)"))
    return function
