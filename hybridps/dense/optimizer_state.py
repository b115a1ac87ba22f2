"""The dense optimizer's state in the checkpoint layout, the same on Keras 2 and Keras 3.

Checkpoints save and restore the dense optimizer as this list of arrays (hybridps.checkpoint),
and PS mode converts it to and from the servers' numpy state (hybridps.backends.ps.dense_state).
The layout: the update counter ("iteration", int64), then for each trainable model variable k,
in order, its slots in ``SLOTS[kind]`` order, named ``"{slot}_{k:04d}"`` (sgd: "m", all zeros;
adagrad: "accumulator"; adam: "m", "v"). It is the variable list of a Keras 2 optimizer; Keras 3
differences are bridged by hybridps.tf_compat. No TensorFlow import here: the optimizer object
is passed in.
"""
import numpy as np

from hybridps.backends.ps.dense_optimizer import KERAS_SLOTS as SLOTS
from hybridps.tf_compat import optimizer_training_variables


def optimizer_kind(optimizer):
    """"sgd", "adagrad" or "adam" for a Keras optimizer of that class."""
    kind = type(optimizer).__name__.lower()
    if kind not in SLOTS:
        raise ValueError(f"dense optimizer {type(optimizer).__name__} is not one of {sorted(SLOTS)}")
    return kind


def state_names(kind, num_variables):
    """The names of the layout's entries for ``num_variables`` trainable variables."""
    return ["iteration"] + [f"{slot}_{k:04d}" for k in range(num_variables) for slot in SLOTS[kind]]


def _slot_variables(optimizer, variables):
    """The optimizer's variables and whether it holds the layout's slots (else: none, Keras 3
    SGD without momentum, whose layout slots are zeros)."""
    held = optimizer_training_variables(optimizer)
    expected = len(state_names(optimizer_kind(optimizer), len(variables)))
    if len(held) == expected:
        return held, True
    if len(held) == 1 and optimizer_kind(optimizer) == "sgd":
        return held, False
    raise ValueError(f"the dense optimizer holds {len(held)} variables for {len(variables)} "
                     f"model variables; the checkpoint layout has {expected}")


def optimizer_state(optimizer, variables):
    """A built optimizer's state as numpy arrays in the checkpoint layout.

    Args:
        variables: the model's trainable variables, in order.
    """
    optimizer.build(variables)               # creates the slots; a no-op once built
    held, with_slots = _slot_variables(optimizer, variables)
    arrays = [np.asarray(v.numpy()) for v in held]
    arrays[0] = arrays[0].astype(np.int64)
    if not with_slots:
        kind = optimizer_kind(optimizer)
        arrays += [np.zeros(tuple(v.shape), np.float32) for v in variables for _ in SLOTS[kind]]
    return arrays


def assign_optimizer_state(optimizer, variables, arrays, where="the checkpoint"):
    """Build the optimizer for ``variables`` and assign ``arrays`` (checkpoint layout) to it.

    Raises:
        ValueError: the arrays do not fit this optimizer and these variables (the message says
            which entry, with its shape, and names ``where`` they came from).
    """
    optimizer.build(variables)
    kind = optimizer_kind(optimizer)
    names = state_names(kind, len(variables))
    if len(arrays) != len(names):
        raise ValueError(f"the dense optimizer ({kind}) has {len(names)} state entries for "
                         f"{len(variables)} model variables, {where} {len(arrays)}: another "
                         f"optimizer or another model")
    held, with_slots = _slot_variables(optimizer, variables)
    expected_shapes = [()] + [tuple(v.shape) for v in variables for _ in SLOTS[kind]]
    for name, shape, value in zip(names, expected_shapes, arrays):
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"dense optimizer state {name}: shape {shape} expected, {where} "
                             f"holds {tuple(np.shape(value))}")
    for variable, value in zip(held, arrays if with_slots else arrays[:1]):
        variable.assign(value)
