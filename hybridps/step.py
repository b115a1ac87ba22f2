"""The TF step: from a step's unique rows to the model's inputs, the loss and the gradients.

What lives here: :func:`make_train_step` and :func:`make_predict_step` (one tf.function per
run, traced once: a fixed input signature with ``None`` for the batch and the number of unique
rows; each takes a step's PulledBatch as ``Backend.pull``/``read`` returns it),
:func:`model_inputs` (the pooling: unique rows -> the model's input dict),
:func:`step_signature` and :func:`unconverted` (the step's helpers, left as they are by
AutoGraph). What does not: the exchange that brings the rows (hybridps.sparse), the models' math
(hybridps.models), the loss formula (hybridps.models.loss).

Inputs of the tf.function, in order, all read from the PulledBatch (hybridps.sparse.plan):
dense (B, D), labels (B, T) (NaN: missing), row weights (B,), each task's count of present
labels over every rank (T,) (the global batch size for one label), the unique rows as one flat float32 buffer in
TF order (hybridps.sparse.layout: dim group, table, owner), the rows of each dim group (G,),
then per dim group with single-valued features its (B, k) index matrix, then per list feature
its ids (N,) and lengths (B,) (``feature_inputs``).

Pooling happens here, inside the tape, so gradients reach the unique rows by TF's own autodiff
and a key's gradients are summed once per step (the gather's gradient):

* single-valued: ``inputs[name] = gather(rows_g, index[:, j])``, float32 (B, dim);
* sum / mean / sqrtn: segment sum of the list's rows, divided by ``max(length, 1)`` (mean) or
  ``sqrt(max(length, 1))`` (sqrtn); an empty list pools to zeros;
* sequence (pooling none): float32 (B, max_len, dim), zeros at padding, and
  ``inputs[name + "_length"]`` int32 (B,).
"""
import numpy as np

from hybridps.errors import ConfigError
from hybridps.models.loss import task_loss_sums
from hybridps.tasks import Task

ONE_LABEL = (Task(name="label", column="label"),)


def step_signature(tf, layout, num_dense, num_tasks=1):
    """The tf.TensorSpec list of a step's inputs (see the module docstring)."""
    specs = [tf.TensorSpec([None, num_dense], tf.float32, name="dense"),
             tf.TensorSpec([None, num_tasks], tf.float32, name="labels"),
             tf.TensorSpec([None], tf.float32, name="weights"),
             tf.TensorSpec(None, tf.float32, name="label_counts"),
             tf.TensorSpec([None], tf.float32, name="rows"),
             tf.TensorSpec([len(layout.groups)], tf.int32, name="group_rows")]
    for g, columns in enumerate(layout.group_columns):
        if columns:
            specs.append(tf.TensorSpec([None, len(columns)], tf.int32, name=f"group{g}_index"))
    for name, _, _, _ in layout.list_specs:
        specs.append(tf.TensorSpec([None], tf.int32, name=f"{name}_ids"))
        specs.append(tf.TensorSpec([None], tf.int32, name=f"{name}_lengths"))
    return specs


def model_inputs(tf, layout, dense, rows, group_rows, feature_inputs):
    """The model's input dict from a step's rows and index arrays (inside the tape)."""
    groups = layout.groups
    if len(groups) == 1:
        group_tensors = [tf.reshape(rows, (-1, groups[0][0]))]
    else:
        sizes = group_rows * tf.constant([dim for dim, _ in groups], tf.int32)
        parts = tf.split(rows, sizes, num=len(groups))
        group_tensors = [tf.reshape(part, (-1, dim)) for part, (dim, _) in zip(parts, groups)]
    inputs = {"dense": dense}
    feature_inputs = list(feature_inputs)
    for g, columns in enumerate(layout.group_columns):
        if not columns:
            continue
        index = feature_inputs.pop(0)
        for j, column in enumerate(columns):
            inputs[layout.single_names[column]] = tf.gather(group_tensors[g], index[:, j])
    batch = tf.shape(dense)[0]
    for name, table, pooling, max_len in layout.list_specs:
        ids, lengths = feature_inputs.pop(0), feature_inputs.pop(0)
        values = tf.gather(group_tensors[layout.group_of_table[table]], ids)
        segments = tf.repeat(tf.range(batch), lengths)
        if pooling == "none":
            starts = tf.cumsum(lengths, exclusive=True)
            position = tf.range(tf.shape(ids)[0]) - tf.gather(starts, segments)
            slots = segments * max_len + position
            dim = layout.dims[table]
            flat = tf.scatter_nd(slots[:, None], values, tf.stack([batch * max_len, dim]))
            inputs[name] = tf.reshape(flat, (-1, max_len, dim))
            inputs[f"{name}_length"] = lengths
            continue
        pooled = tf.math.unsorted_segment_sum(values, segments, batch)
        if pooling != "sum":
            count = tf.cast(tf.maximum(lengths, 1), tf.float32)[:, None]
            pooled = pooled / (count if pooling == "mean" else tf.sqrt(count))
        inputs[name] = pooled
    return inputs


def sample_inputs(tf, schema, batch=1):
    """Zero inputs of the model contract for ``batch`` samples (sequences of length 0)."""
    inputs = {"dense": tf.zeros((batch, schema.num_dense), tf.float32)}
    for feature in schema.sparse:
        dim = schema.table_of(feature).dim
        if feature.is_sequence:
            inputs[feature.name] = tf.zeros((batch, feature.max_len, dim), tf.float32)
            inputs[f"{feature.name}_length"] = tf.zeros((batch,), tf.int32)
        else:
            inputs[feature.name] = tf.zeros((batch, dim), tf.float32)
    return inputs


def _missing_input(exc):
    """The input key a model read and did not find, from the KeyError its call raised.

    Keras re-raises an error from a layer's call as a new exception of the same type with its
    own message; Python keeps the original as ``__context__`` (or ``__cause__``), so the last
    KeyError down that chain is the one the dict lookup raised, naming the key.
    """
    seen, key = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyError) and exc.args:
            key = exc.args[0]
        exc = exc.__cause__ or exc.__context__
    return key


def build_on_sample(tf, model, schema):
    """Call the model once on zero inputs, so its weights exist, and check the contract: a
    model that reads an input the schema does not provide, returns another shape than (B,)
    or (B, 1), or (several tasks) does not return a dict naming every task, fails here with a
    message naming the input, the task or the shape.

    Raises:
        ConfigError: naming the missing input (and the inputs there are), the task or the shape.
    """
    inputs = sample_inputs(tf, schema, batch=2)
    try:
        outputs = model(inputs, training=False)
    except KeyError as exc:   # Keras rewrites the message; the original KeyError names the key
        name = _missing_input(exc)
        raise ConfigError(f"the model reads the input {name!r}, which the schema does not "
                          f"provide; its inputs are {sorted(inputs)} (dense features in "
                          f"inputs['dense'])") from None
    names = schema.task_names
    if isinstance(outputs, dict):
        missing = [name for name in names if name not in outputs]
        if missing:
            raise ConfigError(f"the model returns the outputs {sorted(outputs)}; the schema's "
                              f"task(s) {missing} are not among them: a model returns a dict "
                              f"naming every task of features.labels ({list(names)})")
        shaped = [(name, outputs[name]) for name in names]
    elif len(names) > 1:
        raise ConfigError(f"the model returns one tensor, but the schema has {len(names)} tasks "
                          f"{list(names)}: return a dict {{task name: (batch,) outputs}}")
    else:
        shaped = [(names[0], outputs)]
    for name, value in shaped:
        shape = tuple(getattr(value, "shape", ()))
        if shape not in ((2,), (2, 1)):
            what = "" if len(names) == 1 and not isinstance(outputs, dict) else f" for task {name!r}"
            raise ConfigError(f"the model returns shape {shape}{what} for a batch of 2; it must "
                              f"return logits (binary) or values (regression) of shape (batch,) "
                              f"or (batch, 1)")
    if not model.trainable_variables:
        raise ConfigError("the model has no trainable variables after its first call")
    return model


def logits_of(tf, outputs):
    """A model's output as (B,) logits: (B,) or (B, 1) accepted."""
    if outputs.shape.rank == 2 and outputs.shape[-1] == 1:
        return tf.squeeze(outputs, axis=-1)
    return outputs


def task_outputs(tf, outputs, task_names):
    """A model's outputs as (B, T), one column per task in ``task_names`` order: a dict
    {task: (B,) or (B, 1)}, or one tensor for one task."""
    if isinstance(outputs, dict):
        return tf.stack([logits_of(tf, outputs[name]) for name in task_names], axis=1)
    return logits_of(tf, outputs)[:, None]


def _label_inputs(batch, num_tasks, ones):
    """(labels (B, T), weights (B,)) of a batch for the step; ``ones`` caches the weights of
    a batch without a weight column, by size."""
    size = batch.size
    weights = batch.weights
    if weights is None:
        weights = ones.get(size)
        if weights is None:
            weights = ones[size] = np.ones(size, np.float32)
    return batch.labels.reshape(size, num_tasks), weights


def unconverted(tf, *functions):
    """``functions`` as AutoGraph leaves them: called as they are inside a step's tf.function.

    A tf.function converts (AutoGraph) every function its Python calls that is not
    TensorFlow's or Keras's, to turn control flow on tensors into graph ops; the step's own
    helpers branch and loop on Python values only (the layout, the tasks), so converting them
    changes nothing in the graph and cost about 1.3 s of CPU per traced step (model_inputs alone
    0.9 s). The step function itself is still converted, so a user's model is called as before
    (Keras 2 converts a layer's ``call`` when its caller is converted; Keras 3 never does).
    """
    return tuple(tf.autograph.experimental.do_not_convert(f) for f in functions)


def make_train_step(tf, model, layout, num_dense, tasks=ONE_LABEL):
    """The TF forward/backward of one step, traced once.

    Returns ``train(pulled, label_counts)``: a step's PulledBatch and each task's count of
    present labels over every rank (T,) (one label: the global batch size; a scalar is taken
    for every task) -> (loss_sums, outputs, dense_grads, row_grads): ``loss_sums`` (T,) this
    rank's sums of sample losses per task (hybridps.models.loss.task_loss_sums), ``outputs``
    (B, T) the model's outputs per task; with one task a scalar and (B,). Gradients are of the
    objective ``sum_t loss_weight_t * loss_sums_t / label_counts_t``; ``row_grads`` is flat, in
    the rows' (TF) order.
    """
    variables = model.trainable_variables
    tasks = tuple(tasks)
    names = [t.name for t in tasks]
    loss_weights = [float(t.loss_weight) for t in tasks]
    one = len(tasks) == 1
    inputs_of, outputs_of, loss_sums_of = unconverted(tf, model_inputs, task_outputs, task_loss_sums)

    @tf.function(input_signature=step_signature(tf, layout, num_dense, len(tasks)))
    def train_step(dense, labels, weights, label_counts, rows, group_rows, *feature_inputs):
        counts = tf.broadcast_to(tf.reshape(label_counts, [-1]), [len(tasks)])
        with tf.GradientTape() as tape:
            tape.watch(rows)
            inputs = inputs_of(tf, layout, dense, rows, group_rows, feature_inputs)
            outputs = outputs_of(tf, model(inputs, training=True), names)
            sums = loss_sums_of(labels, outputs, weights, tasks)
            per_task = sums / tf.maximum(counts, 1.0)
            loss = per_task[0] if one and loss_weights[0] == 1.0 else \
                tf.reduce_sum(per_task * tf.constant(loss_weights, per_task.dtype))
        grads = tape.gradient(loss, variables + [rows])
        if one:
            sums, outputs = sums[0], outputs[:, 0]
        return sums, outputs, grads[:-1], tf.convert_to_tensor(grads[-1])

    ones = {}

    def train(pulled, label_counts):
        batch = pulled.batch
        labels, weights = _label_inputs(batch, len(tasks), ones)
        return train_step(batch.dense, labels, weights, label_counts, pulled.rows,
                          pulled.group_rows, *pulled.feature_inputs)

    return train


def make_predict_step(tf, model, layout, num_dense, task_names=("label",)):
    """Inference on the same inputs as the train step (no labels, no tape): returns
    ``predict(pulled)`` -> the model's outputs of a step's PulledBatch: (B,) logits for one
    task, (B, T) (logits of binary tasks, values of regression ones) in ``task_names`` order
    for several."""
    specs = step_signature(tf, layout, num_dense)
    specs = [specs[0]] + specs[4:]
    names = list(task_names)
    inputs_of, outputs_of = unconverted(tf, model_inputs, task_outputs)

    @tf.function(input_signature=specs)
    def predict_step(dense, rows, group_rows, *feature_inputs):
        inputs = inputs_of(tf, layout, dense, rows, group_rows, feature_inputs)
        outputs = outputs_of(tf, model(inputs, training=False), names)
        return outputs[:, 0] if len(names) == 1 else outputs

    def predict(pulled):
        return predict_step(pulled.batch.dense, pulled.rows, pulled.group_rows, *pulled.feature_inputs)

    return predict
