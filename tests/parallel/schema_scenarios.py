"""Scenarios of a feature schema, run inside one MPI job per world size:

    mpirun -np N python tests/parallel/schema_scenarios.py OUT CONFIG PHASE

CONFIG is a YAML config with a ``features:`` schema (mixed dims, two features sharing a table,
every pooling, empty lists, sequences longer than max_len) over a CSV file. Every phase trains
``equiv-sgd`` and ``equiv-adagrad`` (4 steps, global batch 16, state dumped), which the pytest
side compares across world sizes and with a pure-TensorFlow reference. Phase ``two`` (2 ranks)
also writes a checkpoint (``ckpt``, every 2 steps), trains the user model of
examples/movielens and DIN; phase ``one`` (1 rank) resumes the 2-rank checkpoint copied to
OUT/resume-ckpt at step 2, trains to step 4, and writes the predictions of the final model on
every row of the file (read only, through the backend), which the pytest side compares with
the exported SavedModel. With a 4th argument SKIPDATA (phase ``two``), the same rows as
Parquet row groups, one of them garbled: ``skip-parquet`` trains 10 steps under
``on_bad_line=skip`` with a checkpoint at step 5, ``skip-resumed`` resumes it at step 5.
"""
import json
import os
import shutil
import sys

import numpy as np

from hybridps import comm as comm_module
from hybridps.config import make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH = 16
STEPS = 4


def train(comm, out, name, config_path, **overrides):
    from hybridps.trainer import Trainer
    settings = dict(dict(steps=STEPS, batch_size=GLOBAL_BATCH // comm.size, progress=False,
                         dump_state=os.path.join(out, name),
                         metrics_out=os.path.join(out, name, "metrics.json")), **overrides)
    trainer = Trainer(make_config(config_path, settings), comm=comm)
    trainer.run()
    return trainer


def predictions(trainer, path):
    """The final model's probability of every row of the data file, in file order (1 rank)."""
    import tensorflow as tf
    from hybridps.evaluation import predict_batches
    from hybridps.sparse.layout import SparseLayout
    from hybridps.step import make_predict_step
    step = make_predict_step(tf, trainer.model, SparseLayout(trainer.schema), trainer.schema.num_dense)
    share = trainer.dataset.share
    predicted = predict_batches(trainer.backend, step, [share.take(slice(0, share.size))], tf)
    np.savez(path, scores=predicted.scores, labels=predicted.labels)


def main(out, config_path, phase, skip_data=None):
    comm = comm_module.init(with_horovod=True)
    if skip_data:
        skipping = dict(data=f"parquet:{skip_data}", on_bad_line="skip", steps=10)
        train(comm, out, "skip-parquet", config_path, checkpoint_dir=os.path.join(out, "skip-ckpt"),
              checkpoint_every=5, keep_checkpoints=5, **skipping)
        resume_dir = os.path.join(out, "skip-resume-ckpt")
        if comm.rank == 0:          # the checkpoint of step 5 alone, to resume from
            shutil.copytree(os.path.join(out, "skip-ckpt", "ckpt-0000000005"),
                            os.path.join(resume_dir, "ckpt-0000000005"))
            with open(os.path.join(resume_dir, "latest"), "w") as fh:
                fh.write("ckpt-0000000005\n")
        comm.barrier()
        train(comm, out, "skip-resumed", config_path, checkpoint_dir=resume_dir, resume=True,
              **skipping)
    for optimizer in ("sgd", "adagrad"):
        train(comm, out, f"equiv-{optimizer}", config_path, optimizer=optimizer,
              dense_optimizer=optimizer, dense_learning_rate=0.1)     # the reference's
    if phase == "two":
        train(comm, out, "ckpt", config_path, optimizer="adagrad", dense_optimizer="adagrad",
              dense_learning_rate=0.1,
              checkpoint_dir=os.path.join(out, "ckpt"), checkpoint_every=2, keep_checkpoints=5)
        train(comm, out, "user-model", config_path, steps=6,
              model=os.path.join(REPO, "examples", "movielens", "model.py") + ":build")
        train(comm, out, "din", config_path, model="din", steps=6)
    if phase == "one":
        trainer = train(comm, out, "resumed", config_path, optimizer="adagrad",
                        dense_optimizer="adagrad", dense_learning_rate=0.1,
                        checkpoint_dir=os.path.join(out, "resume-ckpt"), resume=True)
        with open(os.path.join(out, "resumed", "resume.json"), "w") as fh:
            json.dump({"start_step": trainer.start_step, "messages": trainer.resume_messages}, fh)
        predictions(trainer, os.path.join(out, "resumed", "predictions.npz"))
    comm.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
