"""DeepFM (Guo et al. 2017) over looked-up embeddings: first order + FM + deep MLP.

First-order term. The classic DeepFM gives every categorical feature a scalar weight w_i next
to its vector e_i. The hybridps tables hold only the dim-vector per key, so here the scalar of
feature f is a learned projection <v, e_f> with one (dim, 1) kernel v shared by all features (a
Dense(1, use_bias=False)); their sum is <v, sum_f e_f>. The dense features enter through
Dense(1), whose bias is the model's global bias. The FM term needs every feature at one dim.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.errors import ConfigError
from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


def fm_second_order(emb: tf.Tensor) -> tf.Tensor:
    """The FM pairwise term sum_{i<j} <e_i, e_j>, computed in O(fields * dim).

    Args:
        emb: float (B, num_fields, dim) embeddings, or a list of (B, dim) tensors.
    Returns:
        float (B,): 0.5 * sum_k ((sum_f e_fk)^2 - sum_f e_fk^2).
    """
    if isinstance(emb, (list, tuple)):
        total = tf.add_n(list(emb))
        squares = tf.add_n([tf.square(e) for e in emb])
    else:
        total = tf.reduce_sum(emb, axis=1)
        squares = tf.reduce_sum(tf.square(emb), axis=1)
    return 0.5 * tf.reduce_sum(tf.square(total) - squares, axis=1)


@tf.keras.utils.register_keras_serializable(package="hybridps")
class DeepFM(CTRModel):
    """DeepFM: logit = first order + FM second order + MLP over every feature's vector.

    Example:
        model = DeepFM(schema, hidden=(256, 128), seed=0)
        logits = model(inputs, training=True)     # inputs: the dict of hybridps.models
    """

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        if len(set(self.feature_dims)) > 1:
            dims = {n: d for n, d in zip(self.feature_names, self.feature_dims)}
            raise ConfigError(f"deepfm needs every sparse feature at one dim for its FM term, "
                              f"but the tables give {dims}; give the tables one dim, or use "
                              f"wide_deep, dcn or din, which take mixed dims")
        self.dense_linear = seeded_dense(1, derive_seed(seed, 0), name="dense_linear")
        self.field_projection = seeded_dense(1, derive_seed(seed, 1), use_bias=False,
                                             name="field_projection")
        self.mlp = MLP(self.hidden, derive_seed(seed, 2), name="mlp")
        self.deep_head = seeded_dense(1, derive_seed(seed, 3), name="deep_head")

    def call(self, inputs, training=None):
        dense = self.dense_input(inputs)
        vectors = self.feature_vectors(inputs)
        first_order = (tf.squeeze(self.dense_linear(dense), axis=-1)
                       + tf.squeeze(self.field_projection(tf.add_n(vectors)), axis=-1))
        deep = tf.squeeze(self.deep_head(self.mlp(tf.concat(vectors + [dense], axis=1))), axis=-1)
        return first_order + fm_second_order(vectors) + deep


def build(schema, config):
    return DeepFM(schema, hidden=tuple(config.hidden), seed=config.seed)
