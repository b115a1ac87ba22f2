"""A Keras optimizer's variables, in their creation order, across Keras versions.

Checkpoints save and restore the dense optimizer by this list (hybridps.checkpoint), and PS
mode converts it to and from the servers' numpy state (hybridps.backends.ps.dense_state). No
TensorFlow import here: the optimizer object is passed in.
"""


def optimizer_variables(optimizer):
    """A Keras optimizer's variables: a property (Keras 2.11+ / 3) or a method (legacy)."""
    variables = optimizer.variables
    return list(variables() if callable(variables) and not isinstance(variables, list) else variables)


def build_optimizer(optimizer, variables):
    """Create the optimizer's slot variables for ``variables`` (before assigning saved ones)."""
    if hasattr(optimizer, "build"):                     # Keras >= 2.11 and Keras 3
        optimizer.build(variables)
    elif hasattr(optimizer, "_create_all_weights"):     # tf.keras.optimizers.legacy
        optimizer._create_all_weights(variables)
