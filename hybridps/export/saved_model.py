"""Export for serving: a TensorFlow SavedModel with its embeddings, run from raw feature values.

What lives here: :class:`ServingModule` (built by :func:`build_serving_module` from a
checkpoint), :func:`export_saved_model` and the ``hybridps export`` command. What does not: the
checkpoint format and its verification (hybridps.checkpoint), deltas (hybridps.export.delta),
the models' math (hybridps.models).

The module
----------
* One ``tf.lookup.experimental.MutableHashTable`` per embedding table, int64 key -> float32 row
  of the table's dim (the value only; optimizer slots are not needed to serve). A mutable table
  so a delta can be applied in place (``apply_rows_<t>``, ``remove_rows_<t>`` per table). Its
  default is a row of zeros: a key the training never admitted (min_count), never saw, or
  evicted reads zeros. (Training gives a never-seen key its key-seeded initial row, noise of
  scale init_std; zeros are the neutral choice for serving.)
* The model's variables (the model rebuilt from the manifest, loaded from dense.npz).
* ``serve_values`` (the ``serving_default`` signature) and ``serve`` (the ``ids`` signature),
  no custom ops, no ``py_function`` (TF Serving runs them):

  - a ``features:`` schema, ``serving_default``: ``dense`` float32 [None, num_dense], the raw
    values in schema order (the module applies the schema's transforms, log1p(max(x, 0)); a
    missing value is the feature's ``fill``, which the caller passes) and, per sparse feature,
    its raw values as the schema's ``dtype`` says: ``string`` (text; integers as their decimal
    text) or ``int64`` (integer ids), [None] for a single-valued feature, [None, None] for a
    list (valid values first, padded with "" or -1; "" and -1 are also a missing single value).
    The module computes each value's id and key in TensorFlow ops exactly as the readers do
    (hybridps.export.tf_hashing: BLAKE2b of text, then the key space's mix). Pooling is
    training's: sum, mean, sqrtn over the valid ids (an empty list pools to zeros); a
    sequence takes its first max_len ids, zero-padded, with its length. ``ids`` takes int64
    ids in place of the values (text turned into ids by the caller with
    ``hybridps.data.hashing.text_ids``; -1 padded), the ``serving_default`` of earlier hybridps.
  - the Criteo preset, ``serving_default``: ``dense`` float32 [None, 13], the raw counts, and
    ``C1`` .. ``C26`` string [None], the Criteo file's texts ("" missing), hashed with
    ``feature_keys`` in the graph; ``ids``: ``dense`` (log1p already applied) and ``keys``
    int64 [None, 26], the keys as hybridps.data.criteo computes them.

  Both return, for a schema of one ``label``, ``probability`` and ``logit`` (float32 [None]);
  for a schema of ``labels:``, one output per task of the schema named by the task: a binary
  task's probability, a regression task's value (``task_names`` lists them).
"""
import os
import time

from hybridps.checkpoint.format import model_config_of, schema_of
from hybridps.checkpoint.reader import load_manifest, read_dense, read_table_rows, resolve_checkpoint, verify_checkpoint
from hybridps.data.hashing import MISSING_ID
from hybridps.errors import CheckpointError
from hybridps.export import tf_hashing
from hybridps.export.saving import save_atomically
from hybridps.models.registry import add_model_argument
from hybridps.tf_compat import model_weights


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


def build_model_from_manifest(manifest, model=None, where="the checkpoint"):
    """The Keras model the checkpoint was trained with (fresh weights, built on a sample).

    A recorded built-in model is rebuilt from hybridps's own code; a recorded user model only
    from the operator's ``model`` (``--model``), which must be the recorded one
    (hybridps.checkpoint.format.model_config_of; ConfigError otherwise, naming ``where``)."""
    from hybridps.models import build_model
    from hybridps.step import build_on_sample
    schema = schema_of(manifest)
    config = model_config_of(manifest, model, where)
    keras_model = build_model(config.model, schema, config)
    build_on_sample(_tf(), keras_model, schema)
    return keras_model, schema


def _make_serving_module_class(tf):
    class ServingModule(tf.Module):
        """A CTR model with its embedding tables, served from raw feature ids (module doc)."""

        def __init__(self, model, schema, tables_rows, step, model_hash):
            super().__init__(name="hybridps_serving")
            self.dense_variables = model_weights(model)
            self.tables = []
            for t, (table_config, (keys, values)) in enumerate(zip(schema.tables, tables_rows)):
                table = tf.lookup.experimental.MutableHashTable(
                    tf.int64, tf.float32, default_value=tf.zeros([table_config.dim], tf.float32),
                    name=f"table_{t}")
                if len(keys):
                    table.insert(tf.constant(keys, tf.int64), tf.constant(values, tf.float32))
                self.tables.append(table)
            self.step = tf.Variable(int(step), dtype=tf.int64, trainable=False, name="step")
            self.model_hash = tf.Variable(model_hash, dtype=tf.string, trainable=False, name="model_hash")
            self.serve, self.serve_values = _serve_functions(tf, model, schema, self.tables)
            self.task_names = task_names_of(schema)
            for t, (table, table_config) in enumerate(zip(self.tables, schema.tables)):
                setattr(self, f"apply_rows_{t}", _apply_rows_function(tf, table, table_config.dim))
                setattr(self, f"remove_rows_{t}", _remove_rows_function(tf, table))
            variables = self.dense_variables

            @tf.function(input_signature=[[tf.TensorSpec(v.shape, v.dtype) for v in variables]])
            def assign_dense(values):
                for variable, value in zip(variables, values):
                    variable.assign(value)
                return tf.constant(len(variables))

            self.assign_dense = assign_dense

    return ServingModule


def _apply_rows_function(tf, table, dim):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="keys"),
                                  tf.TensorSpec([None, dim], tf.float32, name="values")])
    def apply_rows(keys, values):
        table.insert(keys, values)
        return tf.size(keys)
    return apply_rows


def _remove_rows_function(tf, table):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="keys")])
    def remove_rows(keys):
        table.remove(keys)
        return tf.size(keys)
    return remove_rows


def _task_predictions(tf, outputs, schema):
    """The signature's outputs of a model's outputs, by the schema's tasks: a schema of one
    ``label`` -> ``logit`` and ``probability`` (B,) (the model returns one tensor, or a dict
    holding ``label``); a ``labels:`` schema -> {task: (B,)} per task of the schema, the
    sigmoid of a binary task's logit, a regression task's value as the model returns it (a
    model's other outputs are not served)."""
    from hybridps.step import logits_of

    def output(name):
        return logits_of(tf, outputs[name] if isinstance(outputs, dict) else outputs)

    if not schema.labels:
        logit = output(schema.task_names[0])
        return {"logit": logit, "probability": tf.sigmoid(logit)}
    return {task.name: output(task.name) if task.kind == "regression" else tf.sigmoid(output(task.name))
            for task in schema.labels}


def task_names_of(schema):
    """The outputs of the serving signatures named by task (a ``labels:`` schema's task
    names), None for a schema of one ``label`` (answered as ``logit`` and ``probability``)."""
    return schema.task_names if schema.labels else None


def value_input_spec(tf, feature):
    """The raw-value input of a sparse feature in ``serving_default``: its schema ``dtype``
    (string: text, hashed in the graph; int64: integer ids), [None] or [None, None] for a list."""
    dtype = tf.string if feature.dtype == "string" else tf.int64
    return tf.TensorSpec([None] if not feature.is_list else [None, None], dtype, name=feature.name)


def _ids_of_values(tf, features, values):
    """int64 ids of each feature's raw values: text through tf_hashing.text_ids (all text
    features hashed in one batch), integer ids as they are."""
    ids = list(values)
    texts = [i for i, feature in enumerate(features) if feature.dtype == "string"]
    if texts:
        flat = tf.concat([tf.reshape(values[i], [-1]) for i in texts], 0)
        parts = tf.split(tf_hashing.text_ids(tf, flat), [tf.size(values[i]) for i in texts])
        for i, part in zip(texts, parts):
            ids[i] = tf.reshape(part, tf.shape(values[i]))
    return ids


def _serve_functions(tf, model, schema, tables):
    """(``serve``: the model from int64 ids or keys, ``serve_values``: from raw values; the
    module docstring gives both signatures)."""
    table_of = {t.name: tables[i] for i, t in enumerate(schema.tables)}
    dims = {t.name: t.dim for t in schema.tables}
    dense_spec = tf.TensorSpec([None, schema.num_dense], tf.float32, name="dense")
    from hybridps.step import unconverted      # the hashing in the graph branches on Python values only
    criteo_keys, space_keys, ids_of_values = unconverted(
        tf, tf_hashing.criteo_keys, tf_hashing.space_keys, _ids_of_values)
    log1p_columns = [j for j, f in enumerate(schema.dense) if f.transform == "log1p"]

    def predictions(inputs):
        return _task_predictions(tf, model(inputs, training=False), schema)

    def transformed(dense):           # the schema's transforms, as the readers apply them
        if not log1p_columns:
            return dense
        mask = tf.constant([j in log1p_columns for j in range(schema.num_dense)])
        return tf.where(mask, tf.math.log1p(tf.maximum(dense, 0.0)), dense)

    if schema.preset == "criteo":
        singles = schema.single_features

        def from_keys(dense, keys):
            inputs = {"dense": dense}
            for j, feature in enumerate(singles):
                rows = table_of[feature.table].lookup(keys[:, j])
                inputs[feature.name] = tf.ensure_shape(rows, [None, dims[feature.table]])
            return predictions(inputs)

        def from_criteo_values(dense, *texts):
            return from_keys(transformed(dense), criteo_keys(tf, list(texts)))

        serve = tf.function(from_keys, input_signature=[
            dense_spec, tf.TensorSpec([None, len(singles)], tf.int64, name="keys")])
        serve_values = tf.function(from_criteo_values, input_signature=[dense_spec] + [
            tf.TensorSpec([None], tf.string, name=f.name) for f in singles])
        return serve, serve_values

    def from_ids(dense, *ids):
        inputs = {"dense": transformed(dense)}
        for feature, raw in zip(schema.sparse, ids):
            table, dim = table_of[feature.table], dims[feature.table]
            if not feature.is_list:
                rows = table.lookup(space_keys(tf, raw, feature.key_space))
                inputs[feature.name] = tf.ensure_shape(rows, [None, dim])
                continue
            if feature.max_len is not None:
                raw = raw[:, :feature.max_len]
            valid = tf.not_equal(raw, MISSING_ID)
            rows = tf.ensure_shape(table.lookup(space_keys(tf, raw, feature.key_space)),
                                   [None, None, dim])                               # (B, L, dim)
            rows = rows * tf.cast(valid, tf.float32)[:, :, None]
            lengths = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
            if feature.is_sequence:
                pad = feature.max_len - tf.shape(rows)[1]
                rows = tf.pad(rows, [[0, 0], [0, pad], [0, 0]])
                inputs[feature.name] = tf.ensure_shape(rows, [None, feature.max_len, dim])
                inputs[f"{feature.name}_length"] = lengths
                continue
            pooled = tf.reduce_sum(rows, axis=1)
            if feature.pooling != "sum":
                count = tf.cast(tf.maximum(lengths, 1), tf.float32)[:, None]
                pooled = pooled / (count if feature.pooling == "mean" else tf.sqrt(count))
            inputs[feature.name] = tf.ensure_shape(pooled, [None, dim])
        return predictions(inputs)

    def from_values(dense, *values):
        return from_ids(dense, *ids_of_values(tf, schema.sparse, values))

    serve = tf.function(from_ids, input_signature=[dense_spec] + [
        tf.TensorSpec([None] if not f.is_list else [None, None], tf.int64, name=f.name)
        for f in schema.sparse])
    serve_values = tf.function(from_values, input_signature=[dense_spec] + [
        value_input_spec(tf, f) for f in schema.sparse])
    return serve, serve_values


def build_serving_module(checkpoint, model=None):
    """The ServingModule of a checkpoint (directory or root), not yet saved.

    Reads every table's rows (CRC-checked per bucket) and the dense state (sha256-checked).
    ``model``: the operator's ``--model`` (see :func:`build_model_from_manifest`).
    Returns:
        (module, manifest).
    """
    ckpt_dir = resolve_checkpoint(checkpoint)
    problems = verify_checkpoint(ckpt_dir, level="quick")
    if problems:
        raise CheckpointError(f"cannot export the damaged checkpoint {ckpt_dir}: " + "; ".join(problems))
    manifest = load_manifest(ckpt_dir)
    model_config_of(manifest, model, ckpt_dir)          # refuse an unnamed user model before reading
    model_values, _ = read_dense(ckpt_dir, manifest)
    tables_rows = []
    for t in range(len(manifest["tables"])):
        rows = read_table_rows(ckpt_dir, manifest, t)
        tables_rows.append((rows["keys"], rows["values"]))
    module = serving_module_of(manifest, model_values, tables_rows, manifest["step"], ckpt_dir, model)
    return module, manifest


def serving_module_of(manifest, dense_values, tables_rows, step, where, model=None):
    """A ServingModule of the model a manifest describes (a checkpoint's, or a full export's:
    ``config``, ``schema``, ``model``), with these dense values and (keys, values) per table.
    ``model``: the operator's ``--model`` (see :func:`build_model_from_manifest`).

    Raises:
        CheckpointError: the dense values do not fit the rebuilt model (``where`` is named).
        ConfigError: a user model recorded and ``model`` does not name it.
    """
    tf = _tf()
    keras_model, schema = build_model_from_manifest(manifest, model, where)
    variables = model_weights(keras_model)
    if len(dense_values) != len(variables):
        raise CheckpointError(f"{where}: {len(dense_values)} dense variables saved, the rebuilt "
                              f"model has {len(variables)}")
    for variable, value in zip(variables, dense_values):
        variable.assign(value)
    return _make_serving_module_class(tf)(keras_model, schema, tables_rows, step,
                                          manifest.get("model_hash") or "")


def export_saved_model(checkpoint, out_dir, *, overwrite=False, deltas=(), model=None):
    """Write a SavedModel that serves the checkpoint's model from raw feature ids.

    Args:
        checkpoint: a checkpoint directory or a checkpoint root (its ``latest``).
        out_dir: the SavedModel directory (for TF Serving: ``BASE/<version>``).
        overwrite: replace an existing ``out_dir``.
        deltas: delta directories to apply, in order, before saving.
        model: the operator's ``--model`` (see :func:`build_model_from_manifest`).
    Returns:
        dict: ``path``, ``step``, ``rows`` per table, ``seconds``.
    Raises:
        CheckpointError: damaged checkpoint, no model description, ``out_dir`` exists.
        ConfigError: a user model recorded and ``model`` does not name it.
    """
    from hybridps.export.delta import apply_delta
    started = time.perf_counter()
    tf = _tf()
    module, manifest = build_serving_module(checkpoint, model)
    for delta_dir in deltas:
        apply_delta(module, delta_dir)
    path = save_atomically(tf, module, out_dir, overwrite)
    return {"path": path, "step": int(module.step.numpy()), "tasks": module.task_names,
            "rows": [int(t.size().numpy()) for t in module.tables],
            "seconds": time.perf_counter() - started, "schema": schema_of(manifest)}


def add_export_arguments(parser):
    """Arguments of ``hybridps export``; sets ``func`` to :func:`export_main`."""
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a checkpoint root (its latest)")
    parser.add_argument("--out", required=True,
                        help="SavedModel directory to write (for TF Serving: BASE/<version>)")
    parser.add_argument("--delta", action="append", default=[],
                        help="a delta directory to apply before saving (repeat, in order)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_model_argument(parser)
    parser.set_defaults(func=export_main)


def export_main(args):
    """``hybridps export --checkpoint DIR --out SAVEDMODEL``: print what was written."""
    result = export_saved_model(args.checkpoint, args.out, overwrite=args.overwrite, deltas=args.delta,
                                model=args.model)
    schema = result["schema"]
    dense = f"dense float32 [None, {schema.num_dense}] (raw values)"
    if schema.preset == "criteo":
        inputs = ", ".join([dense] + [f"{f.name} string [None]" for f in schema.sparse])
    else:
        padding = {"string": '""', "int64": "-1"}
        inputs = ", ".join([dense] + [
            f"{f.name} {f.dtype} " + (f"[None, None] (padded with {padding[f.dtype]})" if f.is_list
                                      else "[None]")
            for f in schema.sparse])
    outputs = ", ".join(result["tasks"] or ("probability", "logit"))
    print(f"exported step {result['step']} ({', '.join(map(str, result['rows']))} rows per table) "
          f"to {result['path']} in {result['seconds']:.1f}s; serving signature 'serving_default': "
          f"serve({inputs}) -> {{{outputs}}}; signature 'ids' takes int64 ids (the Criteo "
          f"preset: keys) instead of values")
    return 0
