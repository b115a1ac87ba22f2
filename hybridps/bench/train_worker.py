"""The per-rank programs of ``hybridps bench train`` that are not ``hybridps train`` itself.

``python -m hybridps.bench.train_worker tf-baseline OUT.json ...`` (under mpirun): the plain
TensorFlow + Horovod baseline: a fixed-size ``tf.keras.layers.Embedding`` over hashed buckets
(key mod num_buckets, so colliding features share a row), the same DeepFM and data, gradients
through ``hvd.DistributedGradientTape`` (embedding gradients travel as IndexedSlices, i.e.
allgathered), Keras Adagrad (or, with ``--optimizer adam``, Keras Adam, which decays both
moment slots of the whole bucket table every step) on every variable. ``--data`` reads a file
through the same reader ``hybridps train`` uses (the bench's TSV, or the Parquet copy with its
``--config`` schema) instead of the synthetic generator. ``--eval-data`` scores held-out data
after the last step and adds its metrics (hybridps.evaluation: exact AUC, logloss) as ``eval``:
the plain-Keras side of an accuracy comparison with ``hybridps train --eval-data``.

``python -m hybridps.bench.train_worker bare-ceiling OUT.json ...``: the compute ceiling: the bare
TF step of the same DeepFM (plain Keras layers: Dense(1) on the dense features, Dense(1) without
bias on the sum of the field vectors, the FM term, the MLP over the flattened fields and the
dense features) on embeddings already in memory as (B, fields, dim) tensors, gradients of the
dense weights and of the embeddings, and the Keras dense optimizer applied in the same
tf.function. No hybridps code runs in the step: no gathers from unique rows, no segment sums,
no conversion of numpy inputs (the tensors are made before timing), no Horovod. Run on N ranks
at once, each on its own core, it bounds what any distribution scheme can reach on this machine.

``python -m hybridps.bench.train_worker hybridps-step OUT.json ...``: hybridps's own TF step
(hybridps.step.make_train_step) plus the local dense update, on unique rows and inverse indices
prepared before timing, with no exchange, no table work and no Horovod: the in-situ step,
which ``bench train`` reports next to the bare ceiling.
"""
import argparse
import json
import os
import time

import numpy as np

# the roles that start no Horovod (hybridps.bench.shared_job runs them before the others)
ROLES_WITHOUT_HOROVOD = ("bare-ceiling", "hybridps-step")


def _parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["tf-baseline", "bare-ceiling", "hybridps-step"])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--num-fields", type=int, default=26)
    p.add_argument("--num-dense", type=int, default=13)
    p.add_argument("--vocab-size", type=int, default=100_000)
    p.add_argument("--num-buckets", type=int, default=1 << 21)
    p.add_argument("--learning-rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="a YAML config (its 'features:' schema: the workload)")
    p.add_argument("--optimizer", choices=["adagrad", "adam"], default="adagrad",
                   help="the baseline's optimizer on every variable (Keras)")
    p.add_argument("--data", default="synthetic", help="synthetic, or a file hybridps train reads")
    p.add_argument("--model", default="deepfm", help="the built-in model (the tf-baseline: deepfm)")
    p.add_argument("--eval-data", help="tf-baseline: held-out data scored after the last step")
    return p.parse_args(argv)


def _setup(role):
    """The process's Comm (with Horovod unless ``role`` is one of ROLES_WITHOUT_HOROVOD) and TF."""
    from hybridps import comm as comm_module
    from hybridps.tf_runtime import configure_tensorflow
    comm = comm_module.init(with_horovod=role not in ROLES_WITHOUT_HOROVOD)
    tf = configure_tensorflow(int(os.environ.get("HYBRIDPS_TF_THREADS", "1") or 1))
    return comm, tf


def _finish(comm, args, role, elapsed, losses, auc_acc, model, evaluation=None):
    from hybridps.metrics import AUCAccumulator
    slowest = float(comm.allreduce_max(np.array([elapsed]))[0])
    loss_sums = comm.allreduce_sum(np.array(losses))
    pos, neg = comm.allreduce_sum(auc_acc.positives), comm.allreduce_sum(auc_acc.negatives)
    global_batch = args.batch_size * comm.size
    import resource
    rss = float(comm.allreduce_max(np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]))[0])
    dense_parameters = int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    result = {"name": role, "ranks": comm.size, "peak_rss_mb": rss, "dense_parameters": dense_parameters,
              "optimizer": args.optimizer, "data": args.data,
              "samples_per_s": (args.steps - args.warmup_steps) * global_batch / slowest,
              "final_loss": float(loss_sums[-1] / global_batch),
              "auc": AUCAccumulator.auc_from_histograms(pos, neg)}
    if evaluation is not None:
        result["eval"] = evaluation
    if comm.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh)


def _workload(args, comm):
    """The benchmark's data (this rank's share) and its model (``--model``, DeepFM by default),
    as hybridps train builds them: the Criteo layout on synthetic data, or the schema of
    ``--config`` (bench train --workload multihot, multitask)."""
    import tensorflow as tf
    from hybridps.config import make_config
    from hybridps.data import open_data, preset_shape
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    from hybridps.step import build_on_sample
    config = make_config(args.config, overrides={
        "data": args.data, "dim": args.dim, "num_fields": args.num_fields, "num_dense": args.num_dense,
        "vocab_size": args.vocab_size, "seed": args.seed})
    schema = build_schema(config, *preset_shape(config))
    data = open_data(config, schema, rank=comm.rank, world_size=comm.size)
    tf.keras.utils.set_random_seed(config.seed)
    model = build_model(args.model, schema, config)
    build_on_sample(tf, model, schema)
    return data, model, schema, config


def run_tf_baseline(args):
    comm, tf = _setup("tf-baseline")      # Horovod with its own defaults, as a user runs it
    from hybridps.trainer import freeze_python_heap
    import horovod.tensorflow as hvd
    from hybridps.dense.sync import broadcast_from_root, make_dense_optimizer
    from hybridps.metrics import AUCAccumulator
    from hybridps.tf_compat import tf_variables
    data, model, schema, config = _workload(args, comm)
    names = [f.name for f in schema.single_features]
    embedding = tf.keras.layers.Embedding(
        args.num_buckets, args.dim,
        embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.01, seed=args.seed))
    embedding.build((None, args.num_fields))
    variables = model.trainable_variables + embedding.trainable_variables
    optimizer = make_dense_optimizer(args.optimizer, args.learning_rate)   # hybridps's dense settings
    broadcast_from_root(variables)
    sources = tf_variables(variables)        # hvd.DistributedGradientTape needs tf.Variables
    global_batch = float(args.batch_size * comm.size)

    @tf.function(input_signature=[tf.TensorSpec([None, args.num_dense], tf.float32),
                                  tf.TensorSpec([None, args.num_fields], tf.int64),
                                  tf.TensorSpec([None], tf.float32)])
    def train_step(dense, buckets, labels):
        with tf.GradientTape() as tape:
            emb = embedding(buckets)
            inputs = {"dense": dense, **{name: emb[:, j] for j, name in enumerate(names)}}
            logits = model(inputs, training=True)
            loss_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            loss = loss_sum / global_batch
        tape = hvd.DistributedGradientTape(tape, op=hvd.Sum)
        grads = tape.gradient(loss, sources)
        optimizer.apply_gradients(zip(grads, variables))
        return loss_sum, logits

    def buckets_of(keys):
        return (keys.view(np.uint64) % np.uint64(args.num_buckets)).astype(np.int64)

    losses, auc_acc = [], AUCAccumulator()
    start = None
    for step, batch in enumerate(data.iter_batches(args.batch_size, args.steps)):
        if step == args.warmup_steps:
            freeze_python_heap()          # as hybridps train does after its warm-up
            start = time.perf_counter()
        loss_sum, logits = train_step(batch.dense, buckets_of(batch.keys), batch.labels)
        losses.append(float(loss_sum))
        if step >= args.steps // 2:
            auc_acc.update(batch.labels, 1 / (1 + np.exp(-logits.numpy().astype(np.float64))))
    elapsed = time.perf_counter() - start
    evaluation = None
    if args.eval_data:
        def predict(batch):
            emb = embedding(buckets_of(batch.keys))
            return model({"dense": batch.dense, **{name: emb[:, j] for j, name in enumerate(names)}},
                         training=False)
        evaluation = _evaluate(comm, config, schema, args, predict)
    _finish(comm, args, "tf-baseline", elapsed, losses, auc_acc, model, evaluation)


def _evaluate(comm, config, schema, args, predict):
    """The metrics of ``predict`` (batch -> logits) over ``args.eval_data``, all ranks."""
    import dataclasses
    from hybridps.evaluation import evaluation_metrics
    from hybridps.inference import HeldOut
    held_out = HeldOut(comm, dataclasses.replace(config, data=args.eval_data), schema, comm.rank,
                       comm.size, args.batch_size)
    scores, labels = [np.empty(0)], [np.empty(0, np.float32)]
    for batch in held_out.batches():
        logits = np.asarray(predict(batch), np.float64).reshape(-1)
        scores.append(1.0 / (1.0 + np.exp(-logits)))
        labels.append(batch.labels)
    return evaluation_metrics(comm, np.concatenate(scores), np.concatenate(labels))


def run_hybridps_step(args):
    comm, tf = _setup("hybridps-step")     # no communication at all, not even Horovod's idle cycle
    from hybridps.dense.sync import DenseSync
    from hybridps.metrics import AUCAccumulator
    from hybridps.sparse.layout import SparseLayout
    from hybridps.sparse.plan import pull_locally
    from hybridps.sparse.table import initial_rows
    from hybridps.step import make_train_step
    from hybridps.trainer import freeze_python_heap
    data, model, schema, _ = _workload(args, comm)
    dense = DenseSync(model.trainable_variables, "adagrad", args.learning_rate, world_size=1)
    layout = SparseLayout(schema)
    step_fn = make_train_step(tf, model, layout, schema.num_dense, schema.tasks)

    def rows_of_table(t, keys):
        return initial_rows(keys, schema.tables[t].dim, "normal", args.seed, t, 0.0, 0.01)
    prepared = [pull_locally(layout, batch, 4096, rows_of_table)
                for batch in data.iter_batches(args.batch_size, args.steps)]
    global_batch = tf.constant(float(args.batch_size * comm.size))
    # several tasks: each task's present labels times the ranks, counted before timing (as
    # hybridps train's estimate off BSP; BSP adds an allreduce of T numbers)
    counts = [global_batch if not schema.labels else
              (np.count_nonzero(~np.isnan(p.batch.label_matrix), axis=0) * comm.size).astype(np.float32)
              for p in prepared]
    losses, auc_acc = [], AUCAccumulator()
    comm.barrier()
    start = None
    for step, pulled in enumerate(prepared):
        if step == args.warmup_steps:
            freeze_python_heap()          # as hybridps train does after its warm-up
            start = time.perf_counter()
        loss_sum, logits, grads, row_grads = step_fn(pulled, counts[step])
        dense.apply_local(grads)
        row_grads.numpy()
        losses.append(float(np.sum(loss_sum)))
        if step >= args.steps // 2:
            first = logits.numpy().reshape(pulled.batch.size, -1)[:, 0].astype(np.float64)
            auc_acc.update(pulled.batch.label_matrix[:, 0], 1 / (1 + np.exp(-first)))
    elapsed = time.perf_counter() - start
    _finish(comm, args, "hybridps-step-no-exchange", elapsed, losses, auc_acc, model)


def bare_deepfm(tf, num_fields, dim, num_dense, hidden, seed):
    """DeepFM in plain Keras layers on (B, fields, dim) embeddings and (B, dense) features:
    first order (Dense(1) on the dense features plus Dense(1) without bias on the sum of the
    field vectors), the FM pairwise term and an MLP over the flattened fields and the dense
    features; the model returns (B, 1) logits."""
    init = tf.keras.initializers.GlorotUniform
    emb = tf.keras.Input((num_fields, dim), name="embeddings")
    dense = tf.keras.Input((num_dense,), name="dense")
    total = tf.keras.layers.Lambda(lambda e: tf.reduce_sum(e, axis=1))(emb)
    squares = tf.keras.layers.Lambda(lambda e: tf.reduce_sum(tf.square(e), axis=1))(emb)
    fm = tf.keras.layers.Lambda(lambda ts: 0.5 * tf.reduce_sum(tf.square(ts[0]) - ts[1], axis=1,
                                                                keepdims=True))([total, squares])
    first = (tf.keras.layers.Dense(1, kernel_initializer=init(seed), name="dense_linear")(dense)
             + tf.keras.layers.Dense(1, use_bias=False, kernel_initializer=init(seed + 1),
                                     name="field_projection")(total))
    x = tf.keras.layers.Concatenate()([tf.keras.layers.Flatten()(emb), dense])
    for i, width in enumerate(hidden):
        x = tf.keras.layers.Dense(width, activation="relu", kernel_initializer=init(seed + 2 + i),
                                  name=f"mlp_{i}")(x)
    deep = tf.keras.layers.Dense(1, kernel_initializer=init(seed + 2 + len(hidden)), name="deep_head")(x)
    return tf.keras.Model([emb, dense], first + fm + deep)


BARE_BATCHES = 8      # distinct in-memory batches the bare ceiling cycles through


def run_bare_ceiling(args):
    """The bare TF step (module docstring) on BARE_BATCHES batches of the workload whose
    embeddings are made before timing (each key's initial row, as a table would serve it)."""
    comm, tf = _setup("bare-ceiling")           # no Horovod
    from hybridps.dense.sync import make_dense_optimizer
    from hybridps.metrics import AUCAccumulator
    from hybridps.sparse.table import initial_rows
    from hybridps.trainer import freeze_python_heap
    data, hybridps_model, schema, _ = _workload(args, comm)
    fields = len(schema.single_features)
    if schema.list_features or len({schema.table_of(f).dim for f in schema.single_features}) != 1:
        raise SystemExit("bare-ceiling: the criteo workload only (single-valued fields of one dim)")
    dim = schema.table_of(schema.single_features[0]).dim
    tf.keras.utils.set_random_seed(args.seed)
    model = bare_deepfm(tf, fields, dim, schema.num_dense, list(hybridps_model.hidden), args.seed)
    variables = model.trainable_variables
    optimizer = make_dense_optimizer(args.optimizer, args.learning_rate)
    global_batch = tf.constant(float(args.batch_size * comm.size))
    prepared = []
    for batch in data.iter_batches(args.batch_size, min(args.steps, BARE_BATCHES)):
        keys = batch.keys.reshape(-1)
        rows = initial_rows(keys, dim, "normal", args.seed, 0, 0.0, 0.01)
        prepared.append((tf.constant(np.asarray(rows, np.float32).reshape(batch.size, fields, dim)),
                         tf.constant(batch.dense), tf.constant(batch.labels), batch.labels))

    @tf.function(input_signature=[tf.TensorSpec([None, fields, dim], tf.float32),
                                  tf.TensorSpec([None, schema.num_dense], tf.float32),
                                  tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32)])
    def train_step(emb, dense, labels, global_batch_size):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            logits = tf.reshape(model([emb, dense], training=True), [-1])
            loss_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            loss = loss_sum / global_batch_size
        grads = tape.gradient(loss, variables + [emb])
        optimizer.apply_gradients(zip(grads[:-1], variables))
        return loss_sum, logits, grads[-1]

    losses, auc_acc = [], AUCAccumulator()
    comm.barrier()
    start = None
    for step in range(args.steps):
        if step == args.warmup_steps:
            freeze_python_heap()          # as hybridps train does after its warm-up
            start = time.perf_counter()
        emb, dense, labels, labels_np = prepared[step % len(prepared)]
        loss_sum, logits, emb_grads = train_step(emb, dense, labels, global_batch)
        emb_grads.numpy()
        losses.append(float(loss_sum))
        if step >= args.steps // 2:
            auc_acc.update(labels_np, 1 / (1 + np.exp(-logits.numpy().astype(np.float64))))
    elapsed = time.perf_counter() - start
    _finish(comm, args, "bare-ceiling", elapsed, losses, auc_acc, model)


def main(argv=None):
    from hybridps.tf_runtime import skip_keras_optional_imports
    skip_keras_optional_imports()      # as hybridps.cli does
    args = _parse(argv)
    {"tf-baseline": run_tf_baseline, "bare-ceiling": run_bare_ceiling,
     "hybridps-step": run_hybridps_step}[args.role](args)


if __name__ == "__main__":
    main()
