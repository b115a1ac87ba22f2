"""SSP / ASP scenarios in one MPI job of 4 ranks:

    mpirun -np 4 python tests/parallel/sync_scenarios.py OUT

Runs on 4 ranks (writing to OUT/np4/), then on the first 2 ranks of the job (OUT/np2/;
tests/parallel/sub_world.py), on synthetic data: BSP and SSP(0) (dumping state for an exact
comparison), SSP(1), SSP(2), SSP(4), SSP(1) with dense_staleness 2, and ASP; MMoE on two tasks
with missing labels (tests.schema_data's click and Huber rating, row weights) under SSP(1) and
ASP; on 2 ranks, also BSP, SSP(2) and ASP with rank 1's data loader sleeping 30 ms per batch.
Every run's summary goes to OUT/npN/<name>.json (rank 0); the pytest side
(tests/test_parallel_sync.py) checks them.
"""
import json
import os
import sys

from hybridps import testing_hooks
from hybridps.config import make_config
from hybridps.trainer import Trainer
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 24 steps fill SSP's pipeline many times over (its bounds and SSP(0) == BSP hold at any length).
# ASP keeps its 150 steps of 512 rows: 80 of them end below the AUC bound of
# tests/test_parallel_sync.py.
COMMON = {"steps": 24, "batch_size": 256, "hidden": [32], "dim": 8, "progress": False,
          "warmup_steps": 2, "seed": 5, "vocab_size": 2000, "learning_rate": 0.1}


def run(comm, out_dir, name, **overrides):
    settings = dict(COMMON, **overrides)
    if name in ("bsp", "ssp0"):
        settings["dump_state"] = os.path.join(out_dir, name)
    summary = Trainer(make_config(overrides=settings), comm=comm).run()
    if comm.rank == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(summary, fh)


def scenarios(comm, out_dir, slow):
    run(comm, out_dir, "bsp", sync="bsp")
    run(comm, out_dir, "ssp0", sync="ssp", staleness=0)
    for s in (1, 2, 4):
        run(comm, out_dir, f"ssp{s}", sync="ssp", staleness=s)
    run(comm, out_dir, "ssp1-dense2", sync="ssp", staleness=1, dense_staleness=2)
    run(comm, out_dir, "asp", sync="asp", steps=150, batch_size=512)
    from tests.schema_data import MULTITASK_FEATURES, multitask_rows, write_csv
    rows = os.path.join(out_dir, "mt-rows.csv")
    if comm.rank == 0:
        write_csv(rows, multitask_rows(4096, seed=31))
    comm.barrier()
    multitask = {"model": "mmoe", "features": MULTITASK_FEATURES, "data": rows, "steps": 12,
                 "batch_size": 64, "num_experts": 2, "expert_units": [8], "hidden": [8]}
    run(comm, out_dir, "mt-ssp1", sync="ssp", staleness=1, **multitask)
    run(comm, out_dir, "mt-asp", sync="asp", **multitask)
    if slow:
        testing_hooks.use(loader_delay_ms=30.0, delay_rank=1)     # rank 1 a straggler
        slow_rank = {"steps": 15}
        run(comm, out_dir, "slow-bsp", sync="bsp", **slow_rank)
        run(comm, out_dir, "slow-ssp2", sync="ssp", staleness=2, **slow_rank)
        run(comm, out_dir, "slow-asp", sync="asp", **slow_rank)
        testing_hooks.use()
    comm.barrier()


def main(out_dir):
    sys.path.insert(0, REPO_ROOT)       # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import parts_on_first_ranks
    for comm, world_dir, (slow,) in parts_on_first_ranks(out_dir, (("np4", 4, False), ("np2", 2, True))):
        scenarios(comm, world_dir, slow)


if __name__ == "__main__":
    main(sys.argv[1])
