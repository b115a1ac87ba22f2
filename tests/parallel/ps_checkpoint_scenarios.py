"""Checkpoints across modes, in one MPI job of 2 ranks:

    mpirun -np 2 python tests/parallel/ps_checkpoint_scenarios.py OUT

The reference is collective BSP on 1 rank; PS mode runs 1 server + 1 worker (the same single
computing rank, so the same batches and, under BSP, the same arithmetic). N = HALF steps. The
parts run in turn, each on the first ranks of the job it needs (tests/parallel/sub_world.py):

  PART collective (1 rank): ``col-straight`` 2N steps with a checkpoint at N (mid-run) and
      at 2N; ``col-half`` N steps with its checkpoint at the end (root ckpt-col).
  PART ps (2 ranks): ``ps-from-col`` resumes ckpt-col in PS mode and trains to 2N;
      ``ps-straight`` 2N steps in PS mode with checkpoint_every N (the consistent-point path);
      ``ps-half`` N steps in PS mode (root ckpt-ps); ``ps-from-ps`` resumes it to 2N.
  PART collective-from-ps (1 rank): ``col-from-ps`` resumes the PS checkpoint ckpt-ps to 2N.

Every run's summary goes to OUT/<name>.json and its final state to OUT/<name>/.
"""
import json
import os
import shutil
import sys

from hybridps.config import make_config
from hybridps.trainer import Trainer
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HALF = 4
COMMON = {"model": "deepfm", "data": "synthetic", "num_fields": 6, "num_dense": 3,
          "vocab_size": 300, "batch_size": 16, "dim": 4, "hidden": [8], "seed": 7,
          "warmup_steps": 0, "progress": False, "optimizer": "adagrad", "dense_optimizer": "adam",
          "learning_rate": 0.05, "table_layout": "per_field", "steps": 2 * HALF}
PS = {"mode": "ps", "num_servers": 1}


def run(comm, out, name, **overrides):
    settings = dict(COMMON, dump_state=os.path.join(out, name), **overrides)
    trainer = Trainer(make_config(overrides=settings), comm=comm)
    summary = trainer.run()
    summary["resume_messages"] = trainer.resume_messages
    if comm.rank == 0:
        with open(os.path.join(out, f"{name}.json"), "w") as fh:
            json.dump(summary, fh)
    comm.barrier()


def copy_root(comm, source, target):
    """A private copy of a checkpoint root (a resume must not add to the source's checkpoints)."""
    if comm.rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    comm.barrier()


def scenarios(comm, out, part):
    ck = lambda name: os.path.join(out, name)   # noqa: E731
    if part == "collective":
        run(comm, out, "col-straight", checkpoint_dir=ck("ckpt-col-straight"), checkpoint_every=HALF)
        run(comm, out, "col-half", steps=HALF, checkpoint_dir=ck("ckpt-col"))
    elif part == "ps":
        copy_root(comm, ck("ckpt-col"), ck("ckpt-col-for-ps"))
        run(comm, out, "ps-from-col", checkpoint_dir=ck("ckpt-col-for-ps"), resume=True, **PS)
        run(comm, out, "ps-straight", checkpoint_dir=ck("ckpt-ps-straight"), checkpoint_every=HALF, **PS)
        run(comm, out, "ps-half", steps=HALF, checkpoint_dir=ck("ckpt-ps"), **PS)
        copy_root(comm, ck("ckpt-ps"), ck("ckpt-ps-for-ps"))
        run(comm, out, "ps-from-ps", checkpoint_dir=ck("ckpt-ps-for-ps"), resume=True, **PS)
    elif part == "collective-from-ps":
        copy_root(comm, ck("ckpt-ps"), ck("ckpt-ps-for-col"))
        run(comm, out, "col-from-ps", checkpoint_dir=ck("ckpt-ps-for-col"), resume=True)
    else:
        raise SystemExit(f"unknown part {part!r}")


def main(out):
    sys.path.insert(0, REPO)        # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import first_ranks
    for part, ranks in (("collective", 1), ("ps", 2), ("collective-from-ps", 1)):
        with first_ranks(ranks) as comm:
            if comm is not None:
                scenarios(comm, out, part)


if __name__ == "__main__":
    main(sys.argv[1])
