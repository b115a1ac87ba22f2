"""hybridps.dense: the dense parameters of the collective path (Horovod), and Keras optimizer state.

* :mod:`sync`: DenseSync (broadcast, summing allreduce, the compiled update) and the Keras dense
  optimizers with the sparse tables' formulas (imports TensorFlow);
* :mod:`thread`: DenseAllreduceThread (the allreduces off the training thread);
* :mod:`optimizer_state`: a Keras optimizer's state in the checkpoint layout, as checkpoints and
  PS mode read and write it (no TensorFlow import).

Names are re-exported lazily, so importing this package does not load TensorFlow.
"""
_LAZY = {"DenseSync": "sync", "make_dense_optimizer": "sync", "DenseAllreduceThread": "thread",
         "optimizer_state": "optimizer_state",
         "assign_optimizer_state": "optimizer_state"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"hybridps.dense.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hybridps.dense' has no attribute {name!r}")
