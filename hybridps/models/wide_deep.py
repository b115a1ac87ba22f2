"""Wide & Deep (Cheng et al. 2016) over looked-up embeddings.

The wide part is linear over the dense features and one scalar per feature. The tables hold
only vectors, so a feature's scalar is the projection <v, e_f> with one kernel v per dim, shared
by the features of that dim; the wide Dense(1) then weighs each feature. The deep part is an MLP
over every feature's vector and the dense features. Features may have different dims.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


@tf.keras.utils.register_keras_serializable(package="hybridps")
class WideDeep(CTRModel):
    """Wide & Deep: logit = Dense(1)(dense, feature scalars) + MLP over (vectors, dense).

    Example:
        model = WideDeep(schema, hidden=(256, 128), seed=0)
        logits = model(inputs, training=True)
    """

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        self.dims = sorted(set(self.feature_dims), key=self.feature_dims.index)
        # one projection per dim; the first keeps the name (and seed) of the one-dim model
        self.field_projection = seeded_dense(1, derive_seed(seed, 0), use_bias=False,
                                             name="field_projection")
        self.wide = seeded_dense(1, derive_seed(seed, 1), name="wide")
        self.mlp = MLP(self.hidden, derive_seed(seed, 2), name="mlp")
        self.deep_head = seeded_dense(1, derive_seed(seed, 3), name="deep_head")
        self.other_projections = [seeded_dense(1, derive_seed(seed, 4 + i), use_bias=False,
                                               name=f"field_projection_{dim}")
                                  for i, dim in enumerate(self.dims[1:])]

    def call(self, inputs, training=None):
        dense = self.dense_input(inputs)
        vectors = self.feature_vectors(inputs)
        flat = tf.concat(vectors, axis=1)
        if len(self.dims) == 1:
            stacked = tf.reshape(flat, (-1, len(vectors), self.dims[0]))
            scalars = tf.squeeze(self.field_projection(stacked), axis=-1)           # (B, F)
        else:
            projections = dict(zip(self.dims, [self.field_projection] + self.other_projections))
            scalars = tf.concat([projections[d](v) for v, d in zip(vectors, self.feature_dims)], 1)
        wide = self.wide(tf.concat([dense, scalars], axis=1))
        deep = self.deep_head(self.mlp(tf.concat([flat, dense], axis=1)))
        return tf.squeeze(wide + deep, axis=-1)


def build(schema, config):
    return WideDeep(schema, hidden=tuple(config.hidden), seed=config.seed)
