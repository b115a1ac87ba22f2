"""What differs between the two supported TensorFlow stacks, in one place.

hybridps runs on TensorFlow 2.18 with Keras 3 (the default) and on TensorFlow 2.15 with Keras 2
(docs/getting-started.md, "Supported versions"). The Keras versions disagree on a few things
hybridps depends on; every such difference is handled here, through public Keras API, so the
rest of the code and every saved file (checkpoints, exports) are the same on both stacks:

* a model's weights: Keras 3's ``model.variables`` also holds the random-seed state of layers
  such as Dropout, Keras 2's does not; :func:`model_weights` is the list both agree on
  (trainable weights, then non-trainable ones, each in the order the layers track them), which
  is Keras 2's ``model.variables``.
* an optimizer's variables: Keras 3 adds its learning rate as a variable (hybridps sets the
  learning rate from the configuration, it is not training state), and Keras 3's SGD without
  momentum creates no slot, where Keras 2's creates an all-zero "m" per variable;
  :func:`optimizer_training_variables` leaves the learning rate out, and
  hybridps.dense.optimizer_state maps either slot list to the checkpoint layout.
* tf.Variable: Keras 3 variables are not tf.Variables (they hold one, their public ``value``),
  so TensorFlow and Horovod APIs that take tf.Variables get them from :func:`tf_variables`.

Variable names are not used in files: Keras 3 names variables differently ("kernel" where Keras
2 says "deep_fm/dense/kernel:0") and puts the model's generated name ("deep_fm_1") into
optimizer slot names, so checkpoints name variables by position (hybridps.checkpoint.format).
No TensorFlow import at module level.
"""


def model_weights(model):
    """A Keras model's weights in the order checkpoints and exports store them (see above)."""
    return list(model.trainable_weights) + list(model.non_trainable_weights)


def optimizer_training_variables(optimizer):
    """A built Keras optimizer's state variables: its update counter first, then its slots in
    creation order (per model variable, interleaved, on both Keras versions), without Keras 3's
    learning-rate variable."""
    learning_rate = optimizer.learning_rate
    return [v for v in optimizer.variables if v is not learning_rate]


def tf_variables(variables):
    """The tf.Variables of Keras variables: a Keras 2 variable is one, a Keras 3 variable holds
    one as its ``value`` (for APIs such as hvd.DistributedGradientTape that need tf.Variables)."""
    import tensorflow as tf
    return [v if isinstance(v, tf.Variable) else v.value for v in variables]
