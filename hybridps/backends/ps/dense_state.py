"""The dense parameters and dense optimizer state of PS mode, for checkpoints and resume.

In PS mode the servers own the dense parameters (one contiguous chunk each) and the dense
optimizer state, as numpy arrays (hybridps.ps.protocol.NumpyDenseOptimizer). Checkpoints of
both modes store the dense state alike, as a Keras model and a Keras optimizer (dense.npz,
written by rank 0), so a checkpoint saved in one mode restores in the other:

* save: every server sends its chunk and optimizer slots to rank 0 (worker 0), which writes
  them into its model's variables and into a Keras optimizer of the same kind
  (:func:`gather_dense_state`); the checkpoint writer then saves those.
* resume: rank 0 restores the model and a Keras optimizer from the checkpoint as collective
  mode does, and :func:`worker_optimizer_from_keras` turns the optimizer into the numpy state
  worker 0 hands to the servers when training starts.
"""
import numpy as np

from hybridps.backends.ps.dense_optimizer import NumpyDenseOptimizer
from hybridps.dense.optimizer_state import assign_optimizer_state, optimizer_state


def _variables_and_shapes(model):
    variables = list(model.trainable_variables)
    return variables, [tuple(v.shape) for v in variables]


def gather_dense_state(comm, config, server_part, model):
    """Collective over all ranks: the servers' dense state into rank 0's model and a Keras optimizer.

    Args:
        server_part: a server's ``dense_state()``; None on workers.
        model: rank 0's Keras model (None elsewhere).
    Returns:
        on rank 0 the Keras optimizer holding the servers' optimizer state (the model's
        variables now hold the servers' dense parameters); None on every other rank.
    """
    from hybridps.dense.sync import make_dense_optimizer
    c = config
    parts = comm.gather_object(server_part)
    if comm.rank != 0:
        return None
    variables, shapes = _variables_and_shapes(model)
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    state = NumpyDenseOptimizer(c.effective_dense_optimizer, c.effective_dense_learning_rate, total)
    flat = np.empty(total, dtype=np.float32)
    slots = state.slot_matrix()
    steps = set()
    for part in parts:
        if part is None:
            continue
        start, stop, dense, t, slot_matrix = part
        flat[start:stop] = dense
        slots[:, start:stop] = slot_matrix
        steps.add(int(t))
    # servers apply the same pushes, so they count the same number of updates
    assert len(steps) == 1, f"the servers' dense optimizers counted different updates: {steps}"
    state.load(steps.pop(), slots)
    start = 0
    for variable, shape in zip(variables, shapes):
        size = int(np.prod(shape, dtype=np.int64))
        variable.assign(flat[start:start + size].reshape(shape))
        start += size
    optimizer = make_dense_optimizer(c.effective_dense_optimizer, c.effective_dense_learning_rate)
    assign_optimizer_state(optimizer, variables, state.to_keras_arrays(shapes), "the servers")
    return optimizer


def worker_optimizer_from_keras(config, model, optimizer):
    """The numpy dense optimizer state equal to a restored Keras optimizer (for worker 0)."""
    variables, shapes = _variables_and_shapes(model)
    arrays = optimizer_state(optimizer, variables)
    return NumpyDenseOptimizer.from_keras_arrays(config.effective_dense_optimizer,
                                                 config.effective_dense_learning_rate, arrays, shapes)
