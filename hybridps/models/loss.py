"""Losses over logits: the mean logloss of one batch, and the sum the trainer turns into a
global mean (it divides the sum over all ranks by the global batch size).
"""
import tensorflow as tf


def mean_logloss(labels, logits) -> tf.Tensor:
    """Mean sigmoid cross-entropy of a batch.

    Args:
        labels: (B,) 0/1 labels, any real dtype (cast to the logits' dtype).
        logits: (B,) float logits, as returned by the models.
    Returns:
        Scalar: mean over the batch of sigmoid_cross_entropy_with_logits.
    Raises:
        ValueError: labels and logits have different shapes.
    """
    logits = tf.convert_to_tensor(logits)
    labels = tf.cast(labels, logits.dtype)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def logloss_sum(labels, logits) -> tf.Tensor:
    """Summed sigmoid cross-entropy of a batch, for a global mean across ranks.

    Args:
        labels: (B,) 0/1 labels, any real dtype (cast to the logits' dtype).
        logits: (B,) float logits.
    Returns:
        Scalar: sum over the batch; divide by the global batch size for the global mean.
    Raises:
        ValueError: labels and logits have different shapes.
    """
    logits = tf.convert_to_tensor(logits)
    labels = tf.cast(labels, logits.dtype)
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
