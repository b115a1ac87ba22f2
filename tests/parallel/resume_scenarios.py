"""Resume scenarios in one MPI job: `mpirun -np N python tests/parallel/resume_scenarios.py OUT`.

straight: 2N steps of BSP on the Criteo sample with a checkpoint at the end.
split: N steps (checkpoint), then a new Trainer with --resume runs to 2N.
ssp: SSP(1) with a checkpoint every 3 steps (pipeline fences), then a resume to the end.
Summaries and final state go to OUT/<name>[-part].json and OUT/<name>/ for tests/test_parallel_resume.py.
"""
import json
import os
import sys

from hybridps import comm as comm_module
from hybridps.config import make_config
from hybridps.data import SAMPLE_CRITEO_CSV
from hybridps.trainer import Trainer
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

N = 4
COMMON = {"model": "deepfm", "data": SAMPLE_CRITEO_CSV, "batch_size": 8, "dim": 8,
          "hidden": [16, 8], "seed": 11, "warmup_steps": 1, "progress": False,
          "optimizer": "adagrad", "learning_rate": 0.1, "table_layout": "per_field"}


def run(comm, out_dir, name, **overrides):
    summary = Trainer(make_config(overrides=dict(COMMON, **overrides)), comm=comm).run()
    if comm.rank == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(summary, fh)


def main(out_dir):
    comm = comm_module.init(with_horovod=True)
    ck = lambda name: os.path.join(out_dir, "ckpt-" + name)   # noqa: E731
    run(comm, out_dir, "straight", steps=2 * N, checkpoint_dir=ck("straight"),
        dump_state=os.path.join(out_dir, "straight"))
    run(comm, out_dir, "split-1", steps=N, checkpoint_dir=ck("split"))
    run(comm, out_dir, "split-2", steps=2 * N, checkpoint_dir=ck("split"), resume=True,
        dump_state=os.path.join(out_dir, "split"))
    run(comm, out_dir, "ssp-1", steps=2 * N - 1, sync="ssp", staleness=1, checkpoint_every=3,
        checkpoint_dir=ck("ssp"))
    run(comm, out_dir, "ssp-2", steps=2 * N + 2, sync="ssp", staleness=1, checkpoint_dir=ck("ssp"),
        resume=True)
    comm.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
