"""``hybridps evaluate`` and ``hybridps predict``: a checkpoint on held-out data, on any ranks.

What lives here: :class:`HeldOut` (a data source read once, in order, in the same number of
batches on every rank: the read-only pulls are collective), :func:`load_for_inference` (a
checkpoint restored into a collective backend on this job's world size, whatever it was saved
on), :func:`evaluate_checkpoint`, :func:`predict_checkpoint` and the two commands. What does not:
the metric formulas and the prediction loop (hybridps.evaluation), training.

Evaluation never changes the model: rows are read with the backend's read-only pull (a key the
tables do not hold reads zeros, as the exported SavedModel reads it; nothing is inserted,
admitted or counted) and no checkpoint file is written.
"""
import dataclasses
import os
import sys

import numpy as np

from hybridps.errors import ConfigError
from hybridps.models.registry import add_model_argument


class HeldOut:
    """Batches of held-out data, the same number on every computing rank.

    Args:
        comm: hybridps.comm.Comm (the count of batches is agreed over all its ranks).
        config: TrainConfig whose ``data`` names the held-out data.
        schema: the model's FeatureSchema.
        rank, world_size: this rank's share among the ranks that read.
        batch_size: rows per batch.
        synthetic_batches: batches of an endless source (synthetic data).
    Raises:
        ConfigError: a stream (held-out data is read once, in order).
    """

    def __init__(self, comm, config, schema, rank, world_size, batch_size, synthetic_batches=20):
        from hybridps.data import open_data
        self.comm = comm
        self.batch_size = batch_size
        self.dataset = open_data(config, schema, rank=rank, world_size=world_size)
        if self.dataset.streaming:
            raise ConfigError(f"data {config.data!r} is a stream; held-out data (evaluation, "
                              f"prediction) is read once, in order: give a data file or synthetic")
        self.synthetic = not self.dataset.finite
        if self.synthetic:
            self.count = int(synthetic_batches)
        else:
            share = int(self.dataset.num_rows)
            self.count = int(comm.allreduce_max(np.array([-(-share // batch_size)], np.int64))[0])

    def batches(self):
        return self.dataset.epoch_batches(self.batch_size, self.count)


@dataclasses.dataclass
class Loaded:
    """A checkpoint restored for inference on this job."""
    config: object
    schema: object
    model: object
    backend: object
    predict_step: object
    step: int


def load_for_inference(comm, checkpoint, overrides=None, model=None):
    """Restore ``checkpoint`` (a directory or a root) into a collective backend of this job.

    Args:
        model: the operator's ``--model`` (a user build function is run only when given, and
            only if it is the one the checkpoint records; hybridps.models.registry).
    Raises:
        CheckpointError: damaged, missing or of another model.
        ConfigError: the checkpoint records a user model and ``model`` does not name it.
    """
    import tensorflow as tf
    from hybridps.backends.factory import make_backend
    from hybridps.checkpoint import resolve_checkpoint, restore_checkpoint
    from hybridps.checkpoint.format import model_config_of, schema_of
    from hybridps.checkpoint.reader import load_manifest
    from hybridps.models import build_model
    from hybridps.sparse.layout import SparseLayout
    from hybridps.step import build_on_sample, make_predict_step
    path = None
    if comm.rank == 0:
        path = resolve_checkpoint(os.fspath(checkpoint))
    path = comm.bcast_object(path)
    manifest = load_manifest(path)
    config = dataclasses.replace(model_config_of(manifest, model, where=path), **(overrides or {}))
    schema = schema_of(manifest)
    tf.keras.utils.set_random_seed(config.seed)
    keras_model = build_on_sample(tf, build_model(config.model, schema, config), schema)
    layout = SparseLayout(schema)
    backend = make_backend(config, comm, schema, keras_model, layout)
    target = backend.restore_target()
    report = restore_checkpoint(path, tables=target.tables, comm=comm, config=config, schema=schema,
                                model=target.model, optimizer=None, shard=target.shard)
    step = make_predict_step(tf, keras_model, layout, schema.num_dense, schema.task_names)
    return Loaded(config, schema, keras_model, backend, step, report.step)


def _held_out(comm, loaded, data, batch_size, synthetic_batches):
    config = dataclasses.replace(loaded.config, data=data)
    return HeldOut(comm, config, loaded.schema, comm.rank, comm.size, batch_size, synthetic_batches)


def evaluate_checkpoint(comm, checkpoint, data, batch_size=4096, synthetic_batches=20, model=None):
    """The evaluation metrics (hybridps.evaluation) of a checkpoint on ``data``, on every rank
    (``model``: the operator's ``--model``, see :func:`load_for_inference`)."""
    import tensorflow as tf
    from hybridps.evaluation import evaluation_metrics, predict_batches
    loaded = load_for_inference(comm, checkpoint, model=model)
    held_out = _held_out(comm, loaded, data, batch_size, synthetic_batches)
    _announce(comm, "evaluating", held_out, checkpoint, loaded.step)
    predicted = predict_batches(loaded.backend, loaded.predict_step, held_out.batches(), tf,
                                loaded.schema.labels)
    metrics = evaluation_metrics(comm, predicted.scores, predicted.labels, predicted.groups,
                                 loaded.schema.labels)
    metrics.update(checkpoint_step=loaded.step, data=os.fspath(data), ranks=comm.size)
    return metrics


def predict_checkpoint(comm, checkpoint, data, out, batch_size=4096, model=None):
    """Write one score per input row (column ``score``, the probability), in the input's row
    order, with the label (``label``) and the ``group_by`` column when the data has them (a
    schema of several tasks: a prediction and a label column per task, :func:`task_columns`), to the
    Parquet file ``out`` (rank 0, atomically). Returns the number of rows. ``model``: the
    operator's ``--model`` (see :func:`load_for_inference`)."""
    import tensorflow as tf
    from hybridps.evaluation import predict_batches
    loaded = load_for_inference(comm, checkpoint, model=model)
    held_out = _held_out(comm, loaded, data, batch_size, 1)
    if held_out.synthetic:
        raise ConfigError("hybridps predict writes a score per row of a data file; synthetic data "
                          "has no rows to follow: give --data a file")
    predicted = predict_batches(loaded.backend, loaded.predict_step, held_out.batches(), tf,
                                loaded.schema.labels)
    if predicted.row_ids is None:
        raise ConfigError(f"data {data!r}: this reader does not number its rows, so scores "
                          f"cannot be written in input order; use a Parquet, TFRecord or CSV file")
    parts = comm.gather_object((predicted.row_ids, predicted.scores, predicted.labels,
                                predicted.groups))
    rows = 0
    if comm.rank == 0:
        row_ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(row_ids, kind="stable")
        scores = np.concatenate([p[1] for p in parts])[order]
        labels = np.concatenate([p[2] for p in parts])[order]
        columns = (task_columns(loaded.schema.labels, scores, labels) if loaded.schema.labels
                   else {"score": scores, "label": labels})
        if loaded.schema.group_by and all(p[3] is not None for p in parts):
            columns[loaded.schema.group_by] = np.concatenate([p[3] for p in parts])[order]
        write_parquet_atomically(out, columns)
        rows = len(order)
    return comm.bcast_object(rows)


def task_columns(tasks, scores, labels):
    """The output columns of several tasks: per task its prediction (``<task>``: the
    probability of a binary task, the value of a regression one) and its label
    (``<task>_label``, null where missing)."""
    import pyarrow as pa
    columns = {}
    for t, task in enumerate(tasks):
        columns[task.name] = scores[:, t]
        columns[f"{task.name}_label"] = pa.array(labels[:, t], mask=np.isnan(labels[:, t]))
    return columns


def _announce(comm, doing, held_out, checkpoint, step):
    if comm.rank == 0:
        sys.stderr.write(f"[hybridps] {doing} {held_out.count} batch(es) of up to "
                         f"{held_out.batch_size} rows per rank on {comm.size} rank(s) with "
                         f"{checkpoint} (step {step})\n")
        sys.stderr.flush()


def write_parquet_atomically(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hybridps.errors import OutputError
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------- commands
def add_evaluate_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory or root (its latest)")
    parser.add_argument("--data", required=True, help="held-out data: a file, directory, glob, or 'synthetic'")
    parser.add_argument("--metrics-out", help="write the metrics as JSON here (rank 0)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per rank per batch")
    parser.add_argument("--batches", type=int, default=20, help="batches of synthetic data")
    add_model_argument(parser)
    parser.set_defaults(func=evaluate_main)


def add_predict_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory or root (its latest)")
    parser.add_argument("--data", required=True, help="the rows to score: a file, directory or glob")
    parser.add_argument("--out", required=True, help="the Parquet file to write (score, label, group_by; "
                             "with several tasks <task> and <task>_label per task)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per rank per batch")
    add_model_argument(parser)
    parser.set_defaults(func=predict_main)


def _comm():
    from hybridps import comm as comm_module
    comm = comm_module.init(with_horovod=False)
    from hybridps.tf_runtime import configure_tensorflow, default_tf_threads
    configure_tensorflow(default_tf_threads(_NoThreads(), comm.local_size))
    return comm


class _NoThreads:
    tf_threads = 0


def evaluate_main(args):
    """``hybridps evaluate``: print the metrics (and write them with --metrics-out)."""
    import json
    from hybridps.metrics import write_summary
    if args.metrics_out and os.path.isdir(args.metrics_out):
        raise ConfigError(f"--metrics-out {args.metrics_out} is a directory; give a file name")
    comm = _comm()
    metrics = evaluate_checkpoint(comm, args.checkpoint, args.data, args.batch_size, args.batches,
                                  model=args.model)
    if comm.rank == 0:
        if args.metrics_out:
            write_summary(args.metrics_out, metrics)
        print(json.dumps(metrics, indent=2))
    return 0


def predict_main(args):
    """``hybridps predict``: write the scores; print how many."""
    if os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a directory; give a file name such as "
                          f"{os.path.join(args.out, 'scores.parquet')}")
    comm = _comm()
    rows = predict_checkpoint(comm, args.checkpoint, args.data, args.out, args.batch_size,
                              model=args.model)
    if comm.rank == 0:
        sys.stdout.write(f"wrote {rows} scores to {args.out}\n")
    return 0


__all__ = ["HeldOut", "evaluate_checkpoint", "load_for_inference", "predict_checkpoint"]
