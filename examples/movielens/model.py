"""A user-defined model for hybridps: ``--model examples/movielens/model.py:build``.

hybridps calls ``build(schema, config)`` once, after seeding TensorFlow and Keras from the run's
seed, and then calls the model on a first batch before rank 0's weights go to every rank. The
model gets a dict (docs/model.md): ``inputs["dense"]`` float32 (B, D); a single-valued
or pooled feature ``inputs[name]`` float32 (B, dim); a sequence ``inputs[name]`` float32
(B, max_len, dim), zeros at padding, with ``inputs[name + "_length"]`` int32 (B,). It returns
logits of shape (B,) or (B, 1). It knows nothing of ranks or tables.
"""
import tensorflow as tf


class TwoTower(tf.keras.Model):
    """A user tower (user, genres, the watched movies) and an item tower (movie), their dot
    product plus a small MLP over everything: layers are created in ``__init__`` and built on
    the first call, with Keras' default initializers (hybridps seeds them)."""

    def __init__(self, schema):
        super().__init__()
        self.sequences = [f.name for f in schema.sparse if f.is_sequence]
        self.others = [f.name for f in schema.sparse if not f.is_sequence]
        self.user_tower = tf.keras.layers.Dense(16, activation="relu")
        self.item_tower = tf.keras.layers.Dense(16, activation="relu")
        self.mlp = tf.keras.Sequential([tf.keras.layers.Dense(32, activation="relu"),
                                        tf.keras.layers.Dense(1)])

    def call(self, inputs, training=False):
        pooled = []
        for name in self.sequences:                 # mean over each sequence's real positions
            total = tf.reduce_sum(inputs[name], axis=1)
            count = tf.cast(tf.maximum(inputs[name + "_length"], 1), tf.float32)[:, None]
            pooled.append(total / count)
        user = self.user_tower(tf.concat([inputs["user"], inputs["genres"]] + pooled, axis=1))
        item = self.item_tower(inputs["movie"])
        everything = tf.concat([inputs[n] for n in self.others] + pooled + [inputs["dense"]], axis=1)
        return tf.reduce_sum(user * item, axis=1) + tf.squeeze(self.mlp(everything), axis=1)


def build(schema, config):
    return TwoTower(schema)
