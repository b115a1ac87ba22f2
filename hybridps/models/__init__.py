"""The models: Keras models on hybridps' input contract, and the registry of built-ins.

Every model is called as ``model(inputs, training=...)`` with ``inputs`` a dict:
``inputs["dense"]`` float32 (B, D); per single-valued or pooled feature ``inputs[name]`` float32
(B, dim); per sequence ``inputs[name]`` float32 (B, max_len, dim), zeros at padding, and
``inputs[name + "_length"]`` int32 (B,). It returns logits (B,) or (B, 1), or for a schema of
several tasks (``labels:``) a dict {task name: (B,) or (B, 1)} (logits of binary tasks,
values of regression ones). Models own no
embedding tables and know nothing of ranks: the trainer pulls and pools the rows and sends
their gradients back. Built-ins: DeepFM, Wide&Deep, DCN, DIN, and ESMM and MMoE for several
tasks (``registry.MODEL_NAMES``); a
user's model is a function ``build(schema, config)`` named by ``--model file.py:build`` or
``--model package.module:build``.

TensorFlow is imported only when a model class or :func:`build_model` is used, so the registry
(model names, spec checks) costs nothing to import.
"""
from hybridps.models.registry import BUILTIN_MODELS, MODEL_NAMES, check_model_spec, load_build_function

_LAZY = {"DeepFM": "deepfm", "fm_second_order": "deepfm", "WideDeep": "wide_deep", "DCN": "dcn",
         "CrossNetwork": "dcn", "cross_step": "dcn", "DIN": "din", "AttentionPooling": "din",
         "attention_pairs": "din", "ESMM": "esmm", "MMoE": "mmoe", "mean_logloss": "loss",
         "logloss_sum": "loss", "task_loss_sums": "loss", "CTRModel": "_base", "MLP": "_base"}

__all__ = ["BUILTIN_MODELS", "MODEL_NAMES", "build_model", "check_model_spec",
           "load_build_function"] + sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"hybridps.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hybridps.models' has no attribute {name!r}")


def build_model(spec, schema, config):
    """The model ``spec`` names (a built-in or ``file.py:build`` / ``module:build``), built by
    ``build(schema, config)``: the built-ins create their layers here and their weights on the
    first call (hybridps.trainer builds every model on a first batch)."""
    return load_build_function(spec)(schema, config)
