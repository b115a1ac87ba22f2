"""Wide & Deep (Cheng et al. 2016) over already looked-up embeddings.

The wide part is linear over the dense features and one scalar per field. The tables hold only
dim-vectors, so a field's scalar is the projection <v, e_f> with one (dim, 1) kernel v shared
by all fields (as in DeepFM's first-order term); the wide Dense(1) then weighs each field.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


@tf.keras.utils.register_keras_serializable(package="hybridps")
class WideDeep(CTRModel):
    """Wide & Deep: logit = Dense(1)(dense, field scalars) + MLP over (emb, dense).

    Example:
        model = WideDeep(num_fields=26, num_dense=13, dim=16, hidden=(256, 128), seed=0)
        logits = model((dense, emb), training=True)   # dense (B, 13), emb (B, 26, 16)
        loss = mean_logloss(labels, logits)            # logits: (B,)
    """

    def __init__(self, num_fields: int, num_dense: int, dim: int,
                 hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(num_fields, num_dense, dim, hidden, seed, name=name)
        self.field_projection = seeded_dense(1, derive_seed(seed, 0), use_bias=False,
                                             name="field_projection")
        self.wide = seeded_dense(1, derive_seed(seed, 1), name="wide")
        self.mlp = MLP(self.hidden, derive_seed(seed, 2), name="mlp")
        self.deep_head = seeded_dense(1, derive_seed(seed, 3), name="deep_head")

    def call(self, inputs, training=None):
        dense, emb = self.split_inputs(inputs)
        field_scalars = tf.squeeze(self.field_projection(emb), axis=-1)       # (B, F)
        wide = self.wide(tf.concat([dense, field_scalars], axis=1))
        deep = self.deep_head(self.mlp(self.deep_input(dense, emb)))
        return tf.squeeze(wide + deep, axis=-1)
