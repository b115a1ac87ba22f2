"""DIN (Zhou et al. 2018, "Deep Interest Network"): attention of the candidate over a behaviour
sequence, the standard e-commerce CTR model.

Pairs. Each sequence feature (``pooling: none``) is attended by the candidate item: the first
single-valued feature that reads the same table (``history`` and ``movie`` of table ``movie``:
the same movie is the same row, so the candidate and the clicked items live in one space).

Activation unit (the paper's local activation, without softmax): for a candidate q and each
position k of the sequence, ``a(q, k) = MLP([q, k, q - k, q * k])`` (ReLU layers of
``ATTENTION_UNITS``, then a linear output), masked to the sequence's length; the user's interest
for q is ``sum_k a(q, k) * k``. The deep part is an MLP over the interests, every other
feature's vector and the dense features; logit = Dense(1) of it. Features may have mixed dims
(a candidate and its sequence share a table, hence a dim).
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.errors import ConfigError
from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense

ATTENTION_UNITS = (64, 32)


def attention_pairs(schema):
    """[(sequence feature name, candidate feature name)] of a schema (see the module docstring)."""
    pairs = []
    for feature in schema.sparse:
        if not feature.is_sequence:
            continue
        candidate = next((f for f in schema.single_features if f.table == feature.table), None)
        if candidate is None:
            raise ConfigError(f"din attends over the sequence {feature.name!r} with the candidate "
                              f"item, a single-valued feature of the same table "
                              f"({feature.table!r}); the schema has none: add one (e.g. "
                              f"{{name: item, table: {feature.table}}})")
        pairs.append((feature.name, candidate.name))
    if not pairs:
        raise ConfigError("din needs a behaviour sequence: a sparse feature with pooling: none "
                          "(and max_len) sharing its table with the candidate item's feature")
    return pairs


class AttentionPooling(tf.keras.layers.Layer):
    """sum_k a(q, k) k over the first ``length`` positions of a (B, L, dim) sequence."""

    def __init__(self, units: Sequence[int], seed: int, name: Optional[str] = None):
        super().__init__(name=name)
        self.mlp = MLP(units, derive_seed(seed, 0), name="attention_mlp")
        self.score = seeded_dense(1, derive_seed(seed, 1), name="attention_score")

    def call(self, query, sequence, lengths):
        max_len = tf.shape(sequence)[1]
        q = tf.broadcast_to(query[:, None, :], tf.shape(sequence))
        features = tf.concat([q, sequence, q - sequence, q * sequence], axis=-1)
        weights = tf.squeeze(self.score(self.mlp(features)), axis=-1)              # (B, L)
        mask = tf.sequence_mask(lengths, max_len, dtype=weights.dtype)
        return tf.reduce_sum((weights * mask)[:, :, None] * sequence, axis=1)


@tf.keras.utils.register_keras_serializable(package="hybridps")
class DIN(CTRModel):
    """DIN: logit = Dense(1)(MLP(concat(interests, other vectors, dense))).

    Example:
        model = DIN(schema, hidden=(256, 128), seed=0)
        logits = model(inputs, training=True)
    """

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        self.pairs = attention_pairs(schema)
        self.attention = [AttentionPooling(ATTENTION_UNITS, derive_seed(seed, 10 + i),
                                           name=f"attention_{sequence}")
                          for i, (sequence, _) in enumerate(self.pairs)]
        self.mlp = MLP(self.hidden, derive_seed(seed, 0), name="mlp")
        self.head = seeded_dense(1, derive_seed(seed, 1), name="head")

    def call(self, inputs, training=None):
        dense = self.dense_input(inputs)
        others = [n for n in self.feature_names if n not in self.sequence_names]
        vectors = dict(zip(others, self.feature_vectors(inputs, names=set(others))))
        interests = []
        for (sequence, candidate), attention in zip(self.pairs, self.attention):
            interests.append(attention(vectors[candidate], tf.convert_to_tensor(inputs[sequence]),
                                       inputs[f"{sequence}_length"]))
        deep = self.mlp(tf.concat(interests + [vectors[n] for n in others] + [dense], axis=1))
        return tf.squeeze(self.head(deep), axis=-1)


def build(schema, config):
    return DIN(schema, hidden=tuple(config.hidden), seed=config.seed)
