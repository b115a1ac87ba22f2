"""Shared pieces of the CTR models: argument checks, seeded layers, the MLP and the base class.

Lives here: what DeepFM, Wide&Deep and DCN have in common (the (dense, emb) -> logits contract,
seeding, get_config). Not here: anything about embedding tables or distribution.
"""
import hashlib
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from hybridps.errors import ConfigError


def derive_seed(seed: int, index: int) -> int:
    """Seed of the index-th initializer under `seed`: stable across processes, in [0, 2**31).

    A hash rather than `seed + index`, so models built with seeds 0 and 1 do not share
    (shifted) initial values between their layers.
    """
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded_dense(units: int, seed: int, *, activation: Optional[str] = None,
                 use_bias: bool = True, name: Optional[str] = None) -> tf.keras.layers.Dense:
    """A Dense layer with a Glorot-uniform kernel drawn from `seed` and a zero bias."""
    return tf.keras.layers.Dense(
        units, activation=activation, use_bias=use_bias, name=name,
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=tf.keras.initializers.Zeros())


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model argument {name}={value!r} is invalid: "
                          f"expected an integer >= {minimum}")
    return value


def check_hidden(hidden: Sequence[int]) -> Tuple[int, ...]:
    """Validate MLP widths: a sequence (possibly empty) of positive integers, as a tuple."""
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise ConfigError(f"model argument hidden={hidden!r} is invalid: "
                          f"expected a sequence of positive integers such as (256, 128)")
    widths = tuple(hidden)
    for width in widths:
        _check_int("hidden[i]", width, 1)
    return widths


def _matches(shape, expected) -> bool:
    return all(size is None or size == want for size, want in zip(shape, expected))


class MLP(tf.keras.layers.Layer):
    """Dense + ReLU layers of the given widths; with no widths it returns its input."""

    def __init__(self, units: Sequence[int], seed: int, name: Optional[str] = None):
        super().__init__(name=name)
        self.units = check_hidden(units)
        self.seed = seed
        self.hidden_layers = [
            seeded_dense(width, derive_seed(seed, i), activation="relu", name=f"dense_{i}")
            for i, width in enumerate(self.units)]

    def call(self, x):
        for layer in self.hidden_layers:
            x = layer(x)
        return x

    def get_config(self):
        return {"units": list(self.units), "seed": self.seed, "name": self.name}


class CTRModel(tf.keras.Model):
    """Base of the CTR models: called as `model((dense, emb))`, returns logits of shape (B,).

    `dense` is float32 (B, num_dense), `emb` the already looked-up embeddings, float32
    (B, num_fields, dim). Subclasses create their layers in __init__, in a fixed order, so
    `trainable_variables` has the same order in every process.
    """

    def __init__(self, num_fields: int, num_dense: int, dim: int,
                 hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(name=name)
        self.num_fields = _check_int("num_fields", num_fields, 1)
        self.num_dense = _check_int("num_dense", num_dense, 0)
        self.dim = _check_int("dim", dim, 1)
        self.hidden = check_hidden(hidden)
        self.seed = _check_int("seed", seed, 0)

    def split_inputs(self, inputs):
        """(dense, emb) as float32 tensors, after checking their static shapes."""
        dense, emb = inputs
        dense = tf.convert_to_tensor(dense, tf.float32)
        emb = tf.convert_to_tensor(emb, tf.float32)
        if dense.shape.rank != 2 or not _matches(dense.shape[1:], (self.num_dense,)):
            raise ConfigError(f"{self.name} expects dense of shape (batch, {self.num_dense}), "
                              f"got {dense.shape}: check num_dense against the data")
        if emb.shape.rank != 3 or not _matches(emb.shape[1:], (self.num_fields, self.dim)):
            raise ConfigError(f"{self.name} expects emb of shape (batch, {self.num_fields}, "
                              f"{self.dim}), got {emb.shape}: check num_fields and dim")
        return dense, emb

    def deep_input(self, dense, emb):
        """concat(flatten(emb), dense): (B, num_fields * dim + num_dense)."""
        flat = tf.reshape(emb, (-1, self.num_fields * self.dim))
        return tf.concat([flat, dense], axis=1)

    def get_config(self):
        return {"num_fields": self.num_fields, "num_dense": self.num_dense, "dim": self.dim,
                "hidden": list(self.hidden), "seed": self.seed, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
