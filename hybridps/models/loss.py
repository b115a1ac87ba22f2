"""Losses: the mean logloss of one batch, the sum the trainer turns into a global mean, and
the per-task sums of several objectives (:func:`task_loss_sums`).

Several tasks (hybridps.tasks.Task): the objective of a step is
``sum_t loss_weight_t * S_t / N_t`` with ``S_t = sum_i w_i * loss_t(y_it, f_it)`` over this
rank's rows whose label of task t is present and ``N_t`` the number of such rows over every
rank (the trainer counts them; so BSP on N ranks is the step of one rank on all rows). A
binary task's loss is the sigmoid cross-entropy of its logit; a regression task's is the
squared error (``mse``) or the Huber loss (``huber``: ``0.5 x^2`` for ``|x| <= delta``, else
``delta (|x| - 0.5 delta)``) of its value. ``w_i`` is the row's weight (1 without a weight
column). A task ``given`` another has its label present on the rows where the given task's
label is 1 only (the readers mask it: hybridps.tasks.mask_given); with ``ipw`` its sample loss
is divided by the given task's predicted probability ``clip(sigmoid(f_ig), IPW_CLIP, 1)``,
held constant (no gradient flows through it): the inverse-propensity-weighted post-click loss
of ESCM² (Wang et al. 2022).
"""
import tensorflow as tf

from hybridps.tasks import IPW_CLIP


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


def task_loss_sums(labels, outputs, weights, tasks) -> tf.Tensor:
    """Per-task sums of sample losses over the rows whose label is present.

    Args:
        labels: (B, T) float32, NaN where the row's label of that task is missing.
        outputs: (B, T) the model's outputs (logits of binary tasks, values of regression ones).
        weights: (B,) each row's loss weight.
        tasks: the T hybridps.tasks.Task (kind, loss, delta), in column order.
    Returns:
        (T,) sums ``S_t`` (see the module docstring).
    """
    outputs = tf.convert_to_tensor(outputs)
    labels = tf.cast(labels, outputs.dtype)
    present = tf.logical_not(tf.math.is_nan(labels))
    safe = tf.where(present, labels, tf.zeros_like(labels))
    columns, index = [], {task.name: t for t, task in enumerate(tasks)}
    for t, task in enumerate(tasks):
        y, f = safe[:, t], outputs[:, t]
        if task.kind == "binary":
            losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=f)
        elif task.loss == "huber":
            error = tf.abs(f - y)
            quadratic = tf.minimum(error, task.delta)
            losses = 0.5 * quadratic * quadratic + task.delta * (error - quadratic)
        else:
            losses = tf.square(f - y)
        if task.ipw:
            propensity = tf.sigmoid(tf.stop_gradient(outputs[:, index[task.given]]))
            losses = losses / tf.clip_by_value(propensity, IPW_CLIP, 1.0)
        columns.append(losses)
    per_sample = tf.stack(columns, axis=1) * tf.cast(present, outputs.dtype)
    return tf.reduce_sum(per_sample * tf.cast(weights, outputs.dtype)[:, None], axis=0)
