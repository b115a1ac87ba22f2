"""Scenarios of a feature schema, run inside one MPI job of 4 ranks:

    mpirun -np 4 python tests/parallel/schema_scenarios.py OUT CONFIG SKIPDATA

Its phases run in turn on the first 2, 1 and 4 ranks of the job (tests/parallel/sub_world.py):
phase ``two`` writes to OUT/np2/, ``one`` to OUT/np1/, ``four`` to OUT/np4/.

CONFIG is a YAML config with a ``features:`` schema (mixed dims, two features sharing a table,
every pooling, empty lists, sequences longer than max_len) over a CSV file. Every phase trains
``equiv-sgd`` and ``equiv-adagrad`` (4 steps, global batch 16, state dumped), which the pytest
side compares across world sizes and with a pure-TensorFlow reference. Phase ``two`` (2 ranks)
also writes a checkpoint (``ckpt``, every 2 steps), trains the user model of
examples/movielens and DIN; phase ``one`` (1 rank) resumes the 2-rank checkpoint of step 2
copied to OUT/np1/resume-ckpt, trains to step 4, and writes the predictions of the final model on
every row of the file (read only, through the backend), which the pytest side compares with
the exported SavedModel. SKIPDATA (used by phase ``two``) holds the same rows as
Parquet row groups, one of them garbled: ``skip-parquet`` trains 10 steps under
``on_bad_line=skip`` with a checkpoint at step 5, ``skip-resumed`` resumes it at step 5.
"""
import json
import os
import shutil
import sys

import numpy as np

from hybridps.config import make_config
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

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


def scenarios(comm, out, config_path, phase, skip_data=None):
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
        two = os.path.join(os.path.dirname(out), "np2", "ckpt", "ckpt-0000000002")
        shutil.copytree(two, os.path.join(out, "resume-ckpt", "ckpt-0000000002"))
        with open(os.path.join(out, "resume-ckpt", "latest"), "w") as fh:
            fh.write("ckpt-0000000002\n")
        trainer = train(comm, out, "resumed", config_path, optimizer="adagrad",
                        dense_optimizer="adagrad", dense_learning_rate=0.1,
                        checkpoint_dir=os.path.join(out, "resume-ckpt"), resume=True)
        with open(os.path.join(out, "resumed", "resume.json"), "w") as fh:
            json.dump({"start_step": trainer.start_step, "messages": trainer.resume_messages}, fh)
        predictions(trainer, os.path.join(out, "resumed", "predictions.npz"))
    comm.barrier()


def main(out, config_path, skip_data):
    sys.path.insert(0, REPO)        # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import parts_on_first_ranks
    parts = (("np2", 2, "two", skip_data), ("np1", 1, "one", None), ("np4", 4, "four", None))
    for comm, part_out, (phase, skip) in parts_on_first_ranks(out, parts):
        scenarios(comm, part_out, config_path, phase, skip)


if __name__ == "__main__":
    main(*sys.argv[1:4])
