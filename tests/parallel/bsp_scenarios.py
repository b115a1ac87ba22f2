"""Scenarios run inside one MPI job of 4 ranks (`mpirun -np 4 python tests/parallel/bsp_scenarios.py OUT`).

Every part below runs on 1, 2 and 4 ranks: on the first N ranks of the job
(tests/parallel/sub_world.py), writing to OUT/npN/. Grouped so a test session starts few
TensorFlow processes:
  1. exchange edge cases on CollectiveExchange (no TF): a rank with no keys for some owner, all
     keys on one owner, duplicate keys across ranks, a batch of all-new keys, an empty batch.
     Expected rows come from the key-seeded initializer and from gradients every rank can
     recompute for every other rank (a pure function of (rank, key)).
  2. BSP training on the Criteo sample (DeepFM, fields in two shared tables) with SGD and
     Adagrad, the global batch fixed, each run dumping its final state to OUT/<optimizer>/.
  3. BSP training of MMoE on two tasks (a binary click and a Huber-loss regression, both
     with missing labels, and row weights; tests/schema_data.MULTITASK_FEATURES) from a CSV
     file, evaluated while training on another file, dumping its state to OUT/multitask/, then
     its checkpoint evaluated (OUT/multitask/evaluate.json) and predicted
     (OUT/multitask/predict.parquet) on the held-out file.
The pytest side (tests/test_parallel_bsp.py) compares the dumps across world sizes and with an
independent pure-TensorFlow reference.
"""
import json
import os
import sys

import numpy as np

from hybridps.config import make_config
from hybridps.data.batch import Batch
from hybridps.schema import build_schema
from hybridps.sparse import CollectiveExchange, OwnerShard, SparseLayout
from hybridps.sparse.routing import owner_ranks
from hybridps.sparse.table import initial_rows
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 32
STEPS = 6
LR = 0.1


def fake_grads(rank, keys, dim):
    """A gradient each rank can recompute for any other rank: a function of (rank, key)."""
    base = (keys.astype(np.float64) % 997)[:, None] / 997.0
    return ((rank + 1) * base * np.arange(1, dim + 1)[None, :] / dim).astype(np.float32)


def exchange_case(comm, name, local_keys_by_rank, dim=4):
    """Pull then push one batch per rank with SGD; check pulled rows and updated owner rows."""
    config = make_config(overrides={"dim": dim, "optimizer": "sgd", "learning_rate": LR,
                                    "seed": 7, "num_fields": 1})
    schema = build_schema(config)
    shard = OwnerShard(schema, config.seed)
    exchange = CollectiveExchange(comm, SparseLayout(schema), shard, config.num_buckets)
    mine = np.asarray(local_keys_by_rank[comm.rank], dtype=np.int64).reshape(-1, 1)
    batch = Batch(dense=np.zeros((len(mine), 0)), keys=mine, labels=np.zeros(len(mine)))
    pulled = exchange.pull(batch, step=1)
    plan = pulled.plan
    unique_rows = pulled.rows.reshape(-1, dim)
    expected_init = initial_rows(plan.unique_keys, dim, "normal", 7, 0, 0.0, config.init_std)
    np.testing.assert_array_equal(unique_rows, expected_init, err_msg=f"{name}: pulled rows")
    # every key of the batch is among the unique keys (one table: each once)
    position = {k: i for i, k in enumerate(plan.unique_keys.tolist())}
    inverse = np.array([position[k] for k in mine[:, 0].tolist()], dtype=np.int64)
    np.testing.assert_array_equal(plan.unique_keys[inverse], mine[:, 0])
    exchange.push(pulled, fake_grads(comm.rank, plan.unique_keys, dim), step=1)
    # Every key this rank owns: init - lr * sum over ranks that had it of their gradient.
    all_keys = np.unique(np.concatenate([np.asarray(k, dtype=np.int64) for k in local_keys_by_rank]))
    owned = all_keys[owner_ranks(all_keys, comm.size, config.num_buckets) == comm.rank]
    table = shard.tables[0]
    assert table.size == len(owned), f"{name}: rank {comm.rank} holds {table.size} rows, owns {len(owned)}"
    if len(owned):
        expected = initial_rows(owned, dim, "normal", 7, 0, 0.0, config.init_std).astype(np.float64)
        for r, keys in enumerate(local_keys_by_rank):
            had = np.isin(owned, np.asarray(keys, dtype=np.int64))
            expected[had] -= LR * fake_grads(r, owned[had], dim)
        rows = table.export()
        order = np.argsort(rows["keys"])
        np.testing.assert_array_equal(rows["keys"][order], owned)
        np.testing.assert_allclose(rows["values"][order], expected, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name}: owner rows after push")
    return {"name": name, "keys_sent": exchange.counters.keys_sent,
            "keys_received": exchange.counters.keys_received,
            "send_counts": plan.send_counts.ravel().tolist()}


def exchange_scenarios(comm):
    size = comm.size
    candidates = np.arange(1, 20000, dtype=np.int64) * 7919
    owners = owner_ranks(candidates, size, 4096)
    by_owner = [candidates[owners == r] for r in range(size)]
    results = []
    # a rank with no keys for some owner: rank r only sends keys owned by itself
    results.append(exchange_case(comm, "only_own_keys", [by_owner[r][:50] for r in range(size)]))
    # all keys on one owner (rank 0), from every rank
    results.append(exchange_case(comm, "all_on_one_owner",
                                 [by_owner[0][r * 30:(r + 1) * 30] for r in range(size)]))
    # duplicate keys across ranks (and within a batch)
    shared = candidates[:40]
    results.append(exchange_case(comm, "duplicates_across_ranks",
                                 [np.concatenate([shared, shared[::3], candidates[100 + r:110 + r]])
                                  for r in range(size)]))
    # every id new, spread over all owners
    results.append(exchange_case(comm, "all_new", [candidates[1000 + 200 * r:1200 + 200 * r]
                                                   for r in range(size)]))
    # one rank with an empty batch (rank size-1), the others with keys
    results.append(exchange_case(comm, "empty_batch_on_last_rank",
                                 [candidates[:25] if r < size - 1 else candidates[:0] for r in range(size)]))
    return results


def training_scenarios(comm, out_dir):
    from hybridps.data import SAMPLE_CRITEO_CSV
    from hybridps.trainer import Trainer
    summaries = {}
    for optimizer in ("sgd", "adagrad"):
        run_dir = os.path.join(out_dir, optimizer)
        config = make_config(overrides={
            "model": "deepfm", "data": SAMPLE_CRITEO_CSV, "steps": STEPS,
            "batch_size": GLOBAL_BATCH // comm.size, "optimizer": optimizer, "learning_rate": LR,
            "dense_optimizer": optimizer, "dense_learning_rate": LR,     # as the reference's
            "dim": 8, "hidden": [16, 8], "seed": 3, "warmup_steps": 1, "progress": False,
            "table_groups": [list(range(0, 10)), list(range(10, 26))],
            "dump_state": run_dir, "metrics_out": os.path.join(run_dir, "metrics.json")})
        summaries[optimizer] = Trainer(config, comm=comm).run()
    return summaries


def multitask_scenario(comm, out_dir):
    from hybridps.inference import evaluate_checkpoint, predict_checkpoint
    from hybridps.trainer import Trainer
    from tests.schema_data import MULTITASK_FEATURES, multitask_rows, write_csv
    run_dir = os.path.join(out_dir, "multitask")
    train, heldout = os.path.join(out_dir, "mt-train.csv"), os.path.join(out_dir, "mt-heldout.csv")
    if comm.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_csv(train, multitask_rows(GLOBAL_BATCH * STEPS, seed=21))
        write_csv(heldout, multitask_rows(60, seed=22))
    comm.barrier()
    config = make_config(overrides={
        "model": "mmoe", "features": MULTITASK_FEATURES, "data": train, "steps": STEPS,
        "batch_size": GLOBAL_BATCH // comm.size, "optimizer": "adagrad", "learning_rate": LR,
        "hidden": [8], "num_experts": 2, "expert_units": [8], "seed": 3, "warmup_steps": 1,
        "progress": False, "eval_data": heldout, "eval_every": 3,
        "checkpoint_dir": os.path.join(run_dir, "ckpt"), "dump_state": run_dir,
        "metrics_out": os.path.join(run_dir, "metrics.json")})
    Trainer(config, comm=comm).run()
    metrics = evaluate_checkpoint(comm, os.path.join(run_dir, "ckpt"), heldout, batch_size=16)
    predict_checkpoint(comm, os.path.join(run_dir, "ckpt"), heldout,
                       os.path.join(run_dir, "predict.parquet"), batch_size=16)
    if comm.rank == 0:
        with open(os.path.join(run_dir, "evaluate.json"), "w") as fh:
            json.dump(metrics, fh)


def scenarios(comm, out_dir):
    results = {"exchange": exchange_scenarios(comm)}
    multitask_scenario(comm, out_dir)
    summaries = training_scenarios(comm, out_dir)
    if comm.rank == 0:
        results["training"] = {k: {"loss_trajectory": v["loss_trajectory"],
                                    "exchange": v["exchange"]} for k, v in summaries.items()}
        with open(os.path.join(out_dir, "scenarios.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    comm.barrier()


WORLD_SIZES = (1, 2, 4)


def main(out_dir):
    sys.path.insert(0, REPO_ROOT)       # mpirun runs this file as a script: tests/ is not on the path
    from tests.parallel.sub_world import parts_on_first_ranks
    for comm, world_dir, _ in parts_on_first_ranks(out_dir, [(f"np{n}", n) for n in WORLD_SIZES]):
        scenarios(comm, world_dir)


if __name__ == "__main__":
    main(sys.argv[1])
