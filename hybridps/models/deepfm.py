"""DeepFM (Guo et al. 2017) over already looked-up embeddings: first order + FM + deep MLP.

First-order term. The classic DeepFM gives every categorical feature a scalar weight w_i next
to its vector e_i. The hybridps tables hold only the dim-vector per key, so here the scalar of
field f is a learned projection <v, e_f> with one (dim, 1) kernel v shared by all fields (a
Dense(1, use_bias=False) applied per field). The dense features enter through Dense(1), whose
bias is the model's global bias.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


def fm_second_order(emb: tf.Tensor) -> tf.Tensor:
    """The FM pairwise term sum_{i<j} <e_i, e_j>, computed in O(fields * dim).

    Args:
        emb: float (B, num_fields, dim) embeddings.
    Returns:
        float (B,): 0.5 * sum_k ((sum_f e_fk)^2 - sum_f e_fk^2).
    """
    square_of_sum = tf.square(tf.reduce_sum(emb, axis=1))
    sum_of_squares = tf.reduce_sum(tf.square(emb), axis=1)
    return 0.5 * tf.reduce_sum(square_of_sum - sum_of_squares, axis=1)


@tf.keras.utils.register_keras_serializable(package="hybridps")
class DeepFM(CTRModel):
    """DeepFM: logit = first order + FM second order + MLP, over (dense, emb).

    Example:
        model = DeepFM(num_fields=26, num_dense=13, dim=16, hidden=(256, 128), seed=0)
        logits = model((dense, emb), training=True)   # dense (B, 13), emb (B, 26, 16)
        loss = mean_logloss(labels, logits)            # logits: (B,)
    """

    def __init__(self, num_fields: int, num_dense: int, dim: int,
                 hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(num_fields, num_dense, dim, hidden, seed, name=name)
        self.dense_linear = seeded_dense(1, derive_seed(seed, 0), name="dense_linear")
        self.field_projection = seeded_dense(1, derive_seed(seed, 1), use_bias=False,
                                             name="field_projection")
        self.mlp = MLP(self.hidden, derive_seed(seed, 2), name="mlp")
        self.deep_head = seeded_dense(1, derive_seed(seed, 3), name="deep_head")

    def call(self, inputs, training=None):
        dense, emb = self.split_inputs(inputs)
        field_scalars = tf.squeeze(self.field_projection(emb), axis=-1)       # (B, F)
        first_order = (tf.squeeze(self.dense_linear(dense), axis=-1)
                       + tf.reduce_sum(field_scalars, axis=1))
        deep = tf.squeeze(self.deep_head(self.mlp(self.deep_input(dense, emb))), axis=-1)
        return first_order + fm_second_order(emb) + deep
