"""DCN (Wang et al. 2017, "Deep & Cross Network", the v1 cross network) over looked-up embeddings.

x0 = concat(every feature's vector, dense); each cross layer computes
x_{l+1} = x0 * (x_l . w_l) + b_l + x_l with a vector w_l; a deep MLP runs on x0 in parallel;
logit = Dense(1)(concat(cross, deep)). Features may have different dims.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.errors import ConfigError
from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


def cross_step(x0: tf.Tensor, xl: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """One cross layer: x0 * (xl . kernel) + bias + xl.

    Args:
        x0: (B, d) input of the cross network.
        xl: (B, d) output of the previous cross layer (x0 for the first).
        kernel: (d,) weight vector w_l.
        bias: (d,) bias b_l.
    Returns:
        (B, d) x_{l+1}.
    """
    projection = tf.reduce_sum(xl * kernel, axis=1, keepdims=True)           # (B, 1)
    return x0 * projection + bias + xl


class CrossNetwork(tf.keras.layers.Layer):
    """`num_layers` cross layers; layer l owns `kernel_l` (Glorot, seeded) and `bias_l` (zeros)."""

    def __init__(self, num_layers: int, seed: int, name: Optional[str] = None):
        super().__init__(name=name)
        self.num_layers = num_layers
        self.seed = seed
        self.kernels, self.biases = [], []

    def build(self, input_shape):
        width = int(input_shape[-1])
        for layer in range(self.num_layers):
            kernel_init = tf.keras.initializers.GlorotUniform(seed=derive_seed(self.seed, layer))
            self.kernels.append(self.add_weight(
                name=f"kernel_{layer}", shape=(width,), initializer=kernel_init))
            self.biases.append(self.add_weight(
                name=f"bias_{layer}", shape=(width,), initializer=tf.keras.initializers.Zeros()))
        super().build(input_shape)

    def call(self, x0):
        xl = x0
        for kernel, bias in zip(self.kernels, self.biases):
            xl = cross_step(x0, xl, kernel, bias)
        return xl

    def get_config(self):
        return {"num_layers": self.num_layers, "seed": self.seed, "name": self.name}


@tf.keras.utils.register_keras_serializable(package="hybridps")
class DCN(CTRModel):
    """DCN: logit = Dense(1)(concat(cross network(x0), MLP(x0))), x0 = concat(vectors, dense).

    Example:
        model = DCN(schema, hidden=(256, 128), cross_layers=3, seed=0)
        logits = model(inputs, training=True)
    """

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), cross_layers: int = 3,
                 seed: int = 0, name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        if isinstance(cross_layers, bool) or not isinstance(cross_layers, int) or cross_layers < 0:
            raise ConfigError(f"model argument cross_layers={cross_layers!r} is invalid: "
                              f"expected an integer >= 0")
        self.cross_layers = cross_layers
        self.cross = CrossNetwork(cross_layers, derive_seed(seed, 0), name="cross")
        self.mlp = MLP(self.hidden, derive_seed(seed, 1), name="mlp")
        self.head = seeded_dense(1, derive_seed(seed, 2), name="head")

    def call(self, inputs, training=None):
        dense = self.dense_input(inputs)
        x0 = tf.concat(self.feature_vectors(inputs) + [dense], axis=1)
        both = tf.concat([self.cross(x0), self.mlp(x0)], axis=1)
        return tf.squeeze(self.head(both), axis=-1)

    def get_config(self):
        return {**super().get_config(), "cross_layers": self.cross_layers}


def build(schema, config):
    return DCN(schema, hidden=tuple(config.hidden), cross_layers=config.cross_layers, seed=config.seed)
