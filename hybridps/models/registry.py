"""The one list of built-in model names, and how a ``model`` setting becomes a Keras model.

``model`` is a built-in name (``deepfm``, ``wide_deep``, ``dcn``, ``din``, and for several
tasks ``esmm``, ``mmoe``) or the user's own
build function: ``path/to/file.py:build`` or ``package.module:build``. A build function is
called as ``build(schema, config)`` and returns a ``tf.keras.Model`` on the input contract of
hybridps.models (docs/model.md). This module imports no TensorFlow itself, so the
config can check names without loading it.

A checkpoint or export records the ``model`` it was trained with, but a file received from
elsewhere is data: it never chooses code to run. :func:`model_to_build` decides what rebuilds
a recorded model: a built-in name runs only hybridps's own code; a user build function runs
only when the operator names it (``--model``) and it is the one recorded.
"""
import importlib
import importlib.util
import os
import sys

from hybridps.errors import ConfigError

BUILTIN_MODELS = {"deepfm": "hybridps.models.deepfm:build",
                  "wide_deep": "hybridps.models.wide_deep:build",
                  "dcn": "hybridps.models.dcn:build",
                  "din": "hybridps.models.din:build",
                  "esmm": "hybridps.models.esmm:build",
                  "mmoe": "hybridps.models.mmoe:build"}
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


def model_spec_name(spec):
    """A model setting as a checkpoint records it for comparison: a built-in name, or
    ``file.py:function`` / ``module:function`` with the file's directory left out (a
    checkpoint moves between machines and working directories)."""
    where, sep, function = spec.rpartition(":")
    return f"{os.path.basename(where)}{sep}{function}" if sep else spec


def model_to_build(recorded, operator_model, where):
    """The model setting that rebuilds the model a checkpoint or export recorded.

    Args:
        recorded: the ``model`` setting the file records (never imported by this function).
        operator_model: the operator's ``--model`` (None: not given).
        where: the checkpoint or export directory, named in errors.
    Returns:
        ``recorded`` when it is a built-in and no ``--model`` was given, else ``operator_model``.
    Raises:
        ConfigError: the file names a user model and no ``--model`` was given, or ``--model``
            names another model than the one recorded.
    """
    if not isinstance(recorded, str) or not recorded:
        raise ConfigError(f"{where} records no model setting ({recorded!r}); it cannot be rebuilt")
    if operator_model is None:
        if not is_user_model(recorded):
            return recorded
        raise ConfigError(f"{where} was trained with the user model {recorded!r}; hybridps does not "
                          f"run code that a checkpoint or export names. If you trust that model, pass "
                          f"its build function yourself: --model path/to/"
                          f"{model_spec_name(recorded)} (or package.module:function)")
    check_model_spec(operator_model)
    if model_spec_name(operator_model) != model_spec_name(recorded):
        raise ConfigError(f"--model {operator_model!r} is not the model {where} was trained with "
                          f"({recorded!r}); pass --model naming that model's build function")
    return operator_model


def add_model_argument(parser):
    """``--model`` of the commands that rebuild a checkpoint's or export's model (evaluate,
    predict, export, serve): the only way a user build function gets run."""
    parser.add_argument("--model", metavar="FILE.py:FUNCTION|MODULE:FUNCTION",
                        help="the user model's build function, when the checkpoint or export was "
                             "trained with one: it must be the one recorded there (a checkpoint or "
                             "export never chooses code to run; built-in models need no --model)")


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
