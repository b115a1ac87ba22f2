"""PS-mode scenarios, in one MPI job of 5 ranks: `mpirun -np 5 python tests/parallel/ps_scenarios.py OUT`.

Each part runs on the first N ranks of the job (tests/parallel/sub_world.py) and writes to
OUT/<part>/: ``collective-1`` and ``collective-3``: BSP runs (SGD, Adagrad) on 1 and 3 ranks,
the references for PS with 1 and 3 workers; ``ps-1s1w`` (2 ranks) and ``ps-2s3w`` (5 ranks):
the same BSP runs with 1 server + 1 worker and 2 servers + 3 workers, then (with 2 servers)
ASP and SSP(2) on synthetic data and a run in which no worker has a key owned by the last
server. Every run's summary goes to OUT/<part>/<name>.json and its state to OUT/<part>/<name>/.
"""
import json
import os
import sys

import numpy as np

from hybridps.config import make_config
from hybridps.data import SAMPLE_CRITEO_CSV, Batch, DataSource
from hybridps.sparse.routing import owner_ranks
from hybridps.trainer import Trainer
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EQUIVALENCE = {"model": "deepfm", "data": SAMPLE_CRITEO_CSV, "steps": 5, "batch_size": 8,
               "dim": 8, "hidden": [16, 8], "seed": 3, "warmup_steps": 1, "progress": False,
               "learning_rate": 0.1, "dense_learning_rate": 0.1,
               "table_groups": [list(range(0, 10)), list(range(10, 26))]}
CONVERGENCE = {"steps": 120, "batch_size": 256, "hidden": [32], "dim": 8, "progress": False,
               "warmup_steps": 2, "seed": 5, "vocab_size": 2000, "learning_rate": 0.1}


class OneServerKeys(DataSource):
    """Batches whose keys are all owned by server 0 of ``num_servers`` (2 fields, 1 dense)."""

    kind = "one-server-keys"
    finite = False

    def __init__(self, rank, num_servers):
        candidates = np.arange(1, 5000, dtype=np.int64) * 104729
        self.keys = candidates[owner_ranks(candidates, num_servers, 4096) == 0]
        self.rng = np.random.default_rng(rank)

    def state(self):
        return {"kind": self.kind}

    def restore(self, state):
        pass

    def stats(self):
        return None

    def _next_batches(self, batch_size, num_steps):
        for _ in range(num_steps):
            keys = self.rng.choice(self.keys, size=(batch_size, 2))
            yield Batch(dense=self.rng.normal(size=(batch_size, 1)).astype(np.float32), keys=keys,
                        labels=(self.rng.random(batch_size) < 0.3).astype(np.float32))


def run(comm, out_dir, name, settings, dataset=None):
    settings = dict(settings, dump_state=os.path.join(out_dir, name))
    trainer = Trainer(make_config(overrides=settings), comm=comm)
    if dataset is not None:
        trainer.dataset = dataset
    summary = trainer.run()
    if comm.rank == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(summary, fh)


def scenarios(comm, out_dir, mode, servers):
    extra = {"mode": "ps", "num_servers": servers} if mode == "ps" else {}
    for optimizer in ("sgd", "adagrad"):
        run(comm, out_dir, f"bsp-{optimizer}", dict(EQUIVALENCE, optimizer=optimizer,
                                                     dense_optimizer=optimizer, **extra))
    if mode == "ps" and servers > 1:
        run(comm, out_dir, "asp", dict(CONVERGENCE, sync="asp", **extra))
        run(comm, out_dir, "ssp2", dict(CONVERGENCE, sync="ssp", staleness=2, **extra))
        workers = comm.size - servers
        run(comm, out_dir, "no-keys-for-a-server",
            dict(CONVERGENCE, steps=6, num_fields=2, num_dense=1, **extra),
            dataset=OneServerKeys(comm.rank, servers) if comm.rank < workers else None)
    comm.barrier()


PARTS = (("collective-1", 1, "collective", 0), ("collective-3", 3, "collective", 0),
         ("ps-1s1w", 2, "ps", 1), ("ps-2s3w", 5, "ps", 2))


def main(out_dir):
    sys.path.insert(0, REPO_ROOT)       # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import parts_on_first_ranks
    for comm, part_dir, (mode, servers) in parts_on_first_ranks(out_dir, PARTS):
        scenarios(comm, part_dir, mode, servers)


if __name__ == "__main__":
    main(sys.argv[1])
