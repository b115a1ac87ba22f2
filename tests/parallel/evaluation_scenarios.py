"""Scenarios of Parquet/TFRecord training and held-out evaluation, inside one MPI job of 2 ranks:

    mpirun -np 2 python tests/parallel/evaluation_scenarios.py OUT

Phase ``two`` runs on both ranks, then phase ``one`` on the first rank alone
(tests/parallel/sub_world.py).

OUT holds what tests/test_parallel_evaluation.py wrote: ``config.yaml`` (a schema, model
wide_deep), ``train-*.parquet`` and ``train-*.tfrecord`` (the same rows, one Parquet row group
per file, so both formats give every rank the same parts) and ``heldout.parquet``.

Phase ``two`` (2 ranks):

* ``parquet`` and ``tfrecord``: the same run on each format (eval during training every 2 steps
  on the held-out file, TensorBoard, a checkpoint at the end);
* ``whole`` (shuffled, buffer of 24 rows, 1 epoch) and ``part1`` + ``part2`` (the same run
  stopped after step 2 and resumed from its checkpoint): every batch's row ids per rank are
  written to ``rows-<run>-<rank>.npy`` by wrapping the reader;
* ``evaluate``: the ``parquet`` run's checkpoint evaluated twice, with sha256 of every
  checkpoint file before and after and of every table's export (keys, rows, slots, counters)
  before and after the evaluation reads;
* ``predict``: its scores of every held-out row to ``predict.parquet``.

* ``asp``: ASP with evaluation every 2 steps (at the pipeline's fences), and its final
  checkpoint evaluated after it (``asp/evaluate.json``).

Phase ``one`` (1 rank): the commands ``hybridps evaluate`` and ``hybridps predict`` on the
``parquet`` checkpoint (``evaluate-1.json``, ``predict-1.parquet``).
"""
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np

from hybridps.config import make_config
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = 16          # per rank


def train(comm, out, name, data, **overrides):
    from hybridps.trainer import Trainer
    settings = dict(dict(data=data, steps=6, batch_size=BATCH, progress=False, log_every=2,
                         metrics_out=os.path.join(out, name, "metrics.json")), **overrides)
    trainer = Trainer(make_config(os.path.join(out, "config.yaml"), settings), comm=comm)
    read = trainer.dataset.iter_batches
    seen = []

    def logged(*args, **kwargs):
        for batch in read(*args, **kwargs):
            seen.append(batch.row_ids.copy())
            yield batch
    trainer.dataset.iter_batches = logged
    trainer.run()
    np.save(os.path.join(out, f"rows-{name}-{comm.rank}.npy"),
            np.concatenate(seen) if seen else np.empty(0, np.int64))
    return trainer


def files_digest(root):
    digests = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                digests[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return digests


def tables_digest(tables):
    digest = hashlib.sha256()
    for table in tables:
        exported = table.export()
        for key in sorted(exported):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(exported[key]).tobytes())
        digest.update(json.dumps(table.counters(), sort_keys=True, default=int).encode())
    return digest.hexdigest()


def evaluate_phase(comm, out):
    import tensorflow as tf
    from hybridps.evaluation import evaluation_metrics, predict_batches
    from hybridps.inference import HeldOut, evaluate_checkpoint, load_for_inference, predict_checkpoint
    ckpt = os.path.join(out, "parquet", "ckpt")
    heldout = os.path.join(out, "heldout.parquet")
    before = files_digest(ckpt)
    first = evaluate_checkpoint(comm, ckpt, heldout, batch_size=BATCH)
    second = evaluate_checkpoint(comm, ckpt, heldout, batch_size=BATCH)
    after = files_digest(ckpt)
    loaded = load_for_inference(comm, ckpt)
    tables = loaded.backend.state().tables
    tables_before = tables_digest(tables)
    held = HeldOut(comm, dataclasses.replace(loaded.config, data=heldout), loaded.schema,
                   comm.rank, comm.size, BATCH)
    predicted = predict_batches(loaded.backend, loaded.predict_step, held.batches(), tf)
    direct = evaluation_metrics(comm, predicted.scores, predicted.labels, predicted.groups)
    tables_after = tables_digest(tables)
    rows = predict_checkpoint(comm, ckpt, heldout, os.path.join(out, "predict.parquet"), batch_size=BATCH)
    digests = comm.gather_object({"tables_before": tables_before, "tables_after": tables_after})
    if comm.rank == 0:
        with open(os.path.join(out, "evaluate.json"), "w") as fh:
            json.dump({"first": first, "second": second, "direct": direct, "files_before": before,
                       "files_after": after, "tables": digests, "predicted_rows": rows}, fh)


def scenarios(comm, out, phase):
    if phase == "one":            # the commands themselves, on one rank
        from hybridps.cli import main as cli
        common = ["--checkpoint", os.path.join(out, "parquet", "ckpt"), "--data",
                  os.path.join(out, "heldout.parquet"), "--batch-size", str(BATCH)]
        cli(["evaluate", *common, "--metrics-out", os.path.join(out, "evaluate-1.json")])
        cli(["predict", *common, "--out", os.path.join(out, "predict-1.parquet")])
        return
    heldout = os.path.join(out, "heldout.parquet")
    for kind in ("parquet", "tfrecord"):
        train(comm, out, kind, os.path.join(out, f"train-*.{kind}"), eval_data=heldout, eval_every=2,
              checkpoint_dir=os.path.join(out, kind, "ckpt"),
              tensorboard_dir=os.path.join(out, kind, "tb"))
    from hybridps.inference import evaluate_checkpoint
    asp = train(comm, out, "asp", os.path.join(out, "train-*.parquet"), sync="asp", eval_data=heldout,
                eval_every=2, checkpoint_dir=os.path.join(out, "asp", "ckpt"))
    after = evaluate_checkpoint(comm, os.path.join(out, "asp", "ckpt"), heldout, batch_size=BATCH)
    if comm.rank == 0:
        with open(os.path.join(out, "asp", "evaluate.json"), "w") as fh:
            json.dump({"in_training": asp.eval_log, "checkpoint": after}, fh)
    shuffled = dict(shuffle=True, shuffle_buffer=24, seed=5)
    data = os.path.join(out, "train-*.parquet")
    train(comm, out, "whole", data, **shuffled)
    resume_dir = os.path.join(out, "resume-ckpt")
    train(comm, out, "part1", data, steps=2, checkpoint_dir=resume_dir, **shuffled)
    train(comm, out, "part2", data, checkpoint_dir=resume_dir, resume=True, **shuffled)
    evaluate_phase(comm, out)
    comm.barrier()


def main(out):
    sys.path.insert(0, REPO)        # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import first_ranks
    for phase, ranks in (("two", 2), ("one", 1)):
        with first_ranks(ranks) as comm:
            if comm is not None:
                scenarios(comm, out, phase)


if __name__ == "__main__":
    main(sys.argv[1])
