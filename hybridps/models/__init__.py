"""CTR models over (dense features, already looked-up embeddings): DeepFM, Wide&Deep, DCN.

Every model is called as `model((dense, emb), training=...)` with dense float32
(B, num_dense) and emb float32 (B, num_fields, dim), and returns logits of shape (B,).
Models own no embedding tables and know nothing of ranks: the trainer pulls the rows,
watches `emb` on its tape and sends the row gradients back.
"""
from typing import Sequence

import tensorflow as tf

from hybridps.errors import ConfigError
from hybridps.models.dcn import DCN, CrossNetwork, cross_step
from hybridps.models.deepfm import DeepFM, fm_second_order
from hybridps.models.loss import logloss_sum, mean_logloss
from hybridps.models.wide_deep import WideDeep

MODELS = {"deepfm": DeepFM, "wide_deep": WideDeep, "dcn": DCN}

__all__ = ["MODELS", "build_model", "DeepFM", "WideDeep", "DCN", "CrossNetwork", "cross_step",
           "fm_second_order", "mean_logloss", "logloss_sum"]


def build_model(name: str, num_fields: int, num_dense: int, dim: int, *,
                hidden: Sequence[int] = (256, 128), cross_layers: int = 3,
                seed: int = 0) -> tf.keras.Model:
    """Build a CTR model with its weights already created (deterministically from `seed`).

    Args:
        name: "deepfm", "wide_deep" or "dcn".
        num_fields: number of categorical fields (embeddings per sample), >= 1.
        num_dense: number of dense features, >= 0.
        dim: embedding dimension, >= 1.
        hidden: widths of the deep MLP's hidden layers (may be empty).
        cross_layers: number of cross layers (DCN only; ignored by the others), >= 0.
        seed: initialization seed, >= 0: same seed, same weights in every process.
    Returns:
        The model, called once on zeros so `trainable_variables` exists, in a fixed order.
    Raises:
        ConfigError: unknown name or invalid argument.
    """
    if name not in MODELS:
        raise ConfigError(f"model name {name!r} is unknown: expected one of {sorted(MODELS)}")
    kwargs = {"cross_layers": cross_layers} if name == "dcn" else {}
    model = MODELS[name](num_fields, num_dense, dim, hidden=hidden, seed=seed, **kwargs)
    model((tf.zeros((1, num_dense)), tf.zeros((1, num_fields, dim))), training=False)
    return model
