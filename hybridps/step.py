"""The TF step: from a step's unique rows to the model's inputs, the loss and the gradients.

What lives here: :func:`make_train_step` and :func:`make_predict_step` (one tf.function per
run, traced once: a fixed input signature with ``None`` for the batch and the number of unique
rows; each takes a step's PulledBatch as ``Backend.pull``/``read`` returns it),
:func:`model_inputs` (the pooling: unique rows -> the model's input dict) and
:func:`step_signature`. What does not: the exchange that brings the rows (hybridps.sparse), the
models' math (hybridps.models), the loss formula (hybridps.models.loss).

Inputs of the tf.function, in order, all read from the PulledBatch (hybridps.sparse.plan):
dense (B, D), labels (B,), the global batch size, the unique rows as one flat float32 buffer in
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
from hybridps.models.loss import logloss_sum


def step_signature(tf, layout, num_dense):
    """The tf.TensorSpec list of a step's inputs (see the module docstring)."""
    specs = [tf.TensorSpec([None, num_dense], tf.float32, name="dense"),
             tf.TensorSpec([None], tf.float32, name="labels"),
             tf.TensorSpec([], tf.float32, name="global_batch_size"),
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
    model that reads an input the schema does not provide, or returns another shape than (B,)
    or (B, 1), fails here with a message naming the input or the shape.

    Raises:
        ConfigError: naming the missing input (and the inputs there are) or the bad shape.
    """
    from hybridps.errors import ConfigError
    inputs = sample_inputs(tf, schema, batch=2)
    try:
        outputs = model(inputs, training=False)
    except KeyError as exc:   # Keras rewrites the message; the original KeyError names the key
        name = _missing_input(exc)
        raise ConfigError(f"the model reads the input {name!r}, which the schema does not "
                          f"provide; its inputs are {sorted(inputs)} (dense features in "
                          f"inputs['dense'])") from None
    shape = tuple(getattr(outputs, "shape", ()))
    if shape not in ((2,), (2, 1)):
        raise ConfigError(f"the model returns shape {shape} for a batch of 2; it must return "
                          f"logits of shape (batch,) or (batch, 1)")
    if not model.trainable_variables:
        raise ConfigError("the model has no trainable variables after its first call")
    return model


def logits_of(tf, outputs):
    """A model's output as (B,) logits: (B,) or (B, 1) accepted."""
    if outputs.shape.rank == 2 and outputs.shape[-1] == 1:
        return tf.squeeze(outputs, axis=-1)
    return outputs


def make_train_step(tf, model, layout, num_dense):
    """The TF forward/backward of one step, traced once.

    Returns ``train(pulled, global_batch_size)``: a step's PulledBatch and the global batch
    size (a float32 scalar tensor) -> (loss_sum, logits, dense_grads, row_grads): ``loss_sum``
    is this rank's sum of sample losses, gradients are of (loss_sum / global_batch_size);
    ``row_grads`` is flat, in the rows' (TF) order.
    """
    variables = model.trainable_variables

    @tf.function(input_signature=step_signature(tf, layout, num_dense))
    def train_step(dense, labels, global_batch_size, rows, group_rows, *feature_inputs):
        with tf.GradientTape() as tape:
            tape.watch(rows)
            inputs = model_inputs(tf, layout, dense, rows, group_rows, feature_inputs)
            logits = logits_of(tf, model(inputs, training=True))
            loss_sum = logloss_sum(labels, logits)
            loss = loss_sum / global_batch_size
        grads = tape.gradient(loss, variables + [rows])
        return loss_sum, logits, grads[:-1], tf.convert_to_tensor(grads[-1])

    def train(pulled, global_batch_size):
        batch = pulled.batch
        return train_step(batch.dense, batch.labels, global_batch_size, pulled.rows,
                          pulled.group_rows, *pulled.feature_inputs)

    return train


def make_predict_step(tf, model, layout, num_dense):
    """Inference on the same inputs as the train step (no labels, no tape): returns
    ``predict(pulled)`` -> (B,) logits of a step's PulledBatch."""
    specs = step_signature(tf, layout, num_dense)
    specs = [specs[0]] + specs[3:]

    @tf.function(input_signature=specs)
    def predict_step(dense, rows, group_rows, *feature_inputs):
        inputs = model_inputs(tf, layout, dense, rows, group_rows, feature_inputs)
        return logits_of(tf, model(inputs, training=False))

    def predict(pulled):
        return predict_step(pulled.batch.dense, pulled.rows, pulled.group_rows, *pulled.feature_inputs)

    return predict
