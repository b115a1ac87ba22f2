"""TensorFlow's process setup: its thread pools and log level, before the first TF op.

What lives here: :func:`configure_tensorflow` and :func:`default_tf_threads`, shared by the
trainer, evaluation and prediction, the server and the benchmark workers. What does not: any
model or step (hybridps.step, hybridps.models).
"""
import os

from hybridps import config as config_module


def configure_tensorflow(threads):
    """Thread pools of ``threads`` (intra and inter op) and quiet logs; call before any TF op."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already initialised in this process (tests); keep the first setting
    return tf


def default_tf_threads(config, local_size):
    """config.tf_threads, else HYBRIDPS_TF_THREADS, else the cores of this node per local rank."""
    if config.tf_threads:
        return config.tf_threads
    from_env = config_module.env_tf_threads()
    if from_env:
        return from_env
    return max(1, (os.cpu_count() or 1) // max(local_size, 1))
