"""Shared pieces of the built-in models: argument checks, seeded layers, the MLP, the base class.

Lives here: what DeepFM, Wide&Deep, DCN and DIN have in common: the input contract (a dict:
``inputs["dense"]`` float32 (B, D); per single-valued or pooled feature ``inputs[name]`` float32
(B, dim); per sequence ``inputs[name]`` float32 (B, max_len, dim), zeros at padding, and
``inputs[name + "_length"]`` int32 (B,)), seeding, get_config. Not here: anything about
embedding tables or distribution: the models only see looked-up, pooled vectors.
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


def check_int(name: str, value, minimum: int) -> int:
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
        check_int("hidden[i]", width, 1)
    return widths


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


def masked_mean(sequence, lengths):
    """Mean over the first ``lengths`` positions of a (B, L, dim) sequence (zeros if empty)."""
    total = tf.reduce_sum(sequence, axis=1)          # padding positions are zeros
    count = tf.cast(tf.maximum(lengths, 1), sequence.dtype)[:, None]
    return total / count


class CTRModel(tf.keras.Model):
    """Base of the built-in models: ``model(inputs)`` on the input contract (module docstring),
    logits of shape (B,).

    Args:
        schema: hybridps.schema.FeatureSchema (the features, their kinds and dims).
        hidden: widths of the deep MLP's hidden layers (may be empty).
        seed: initialization seed: same seed, same weights in every process.

    Subclasses create their layers in __init__, in a fixed order, so ``trainable_variables`` has
    the same order in every process.
    """

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(name=name)
        self.schema = schema
        self.hidden = check_hidden(hidden)
        self.seed = check_int("seed", seed, 0)
        self.num_dense = schema.num_dense
        self.feature_names = [f.name for f in schema.sparse]
        self.sequence_names = {f.name for f in schema.sparse if f.is_sequence}
        self.feature_dims = [schema.table_of(f).dim for f in schema.sparse]

    def dense_input(self, inputs):
        dense = tf.convert_to_tensor(inputs["dense"], tf.float32)
        if dense.shape.rank != 2 or dense.shape[1] not in (None, self.num_dense):
            raise ConfigError(f"{self.name} expects inputs['dense'] of shape (batch, "
                              f"{self.num_dense}), got {dense.shape}: check the schema's dense "
                              f"features against the data")
        return dense

    def feature_vectors(self, inputs, names=None):
        """One (B, dim) tensor per sparse feature, in schema order; a sequence is reduced to
        the mean of its positions (DIN attends over it instead)."""
        out = []
        for name, dim in zip(self.feature_names, self.feature_dims):
            if names is not None and name not in names:
                continue
            value = tf.convert_to_tensor(inputs[name], tf.float32)
            if name in self.sequence_names:
                if value.shape.rank != 3 or value.shape[-1] not in (None, dim):
                    raise ConfigError(f"{self.name} expects inputs[{name!r}] of shape (batch, "
                                      f"max_len, {dim}), got {value.shape}")
                value = masked_mean(value, inputs[f"{name}_length"])
            elif value.shape.rank != 2 or value.shape[-1] not in (None, dim):
                raise ConfigError(f"{self.name} expects inputs[{name!r}] of shape (batch, {dim}), "
                                  f"got {value.shape}: check the schema's dims")
            out.append(value)
        return out

    def get_config(self):
        return {"schema": self.schema.to_dict(), "hidden": list(self.hidden), "seed": self.seed,
                "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from hybridps.schema import schema_from_dict
        config = dict(config)
        config["schema"] = schema_from_dict(config["schema"])
        return cls(**config)
