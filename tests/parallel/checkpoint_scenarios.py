"""Checkpoint scenarios run as their own processes (tests/test_parallel_checkpoint.py and
tests/test_checkpoint.py start them).

  save OUT          (mpirun -np 2) fill four tables (sgd, adagrad, adam, ftrl; min_count 2 so
                    some keys stay candidates; a few evictions) with keys each rank owns, save
                    a checkpoint to OUT/ckpt, dump every rank's table export to OUT/truth.
  restore OUT       (mpirun -np 1, 3, 4) restore OUT/ckpt into fresh tables, dump every rank's
                    export and its RestoreReport to OUT/restored-np<W>. ``restore@1`` and
                    ``restore@3`` in a job of 4 ranks run it on its first 1 and 3 ranks
                    (tests/parallel/sub_world.py).
  restore-ps OUT    (mpirun -np 4) restore OUT/ckpt as PS mode with 2 servers does: ranks 2 and
                    3 (servers 0 and 1) own the buckets b % 2 == server index; ranks 0 and 1
                    (workers) hold no keys. Dumps to OUT/restored-ps.
  damaged OUT       (mpirun -np 2) restore a copy of OUT/ckpt with one byte flipped in a
                    bucket that only rank 1 reads: every rank must raise the same CheckpointError.
  trainer OUT       (mpirun -np 2) Trainer runs: 6 steps straight; 3 steps + a checkpoint;
                    a fresh Trainer that resumes and runs 3 more. Dumps the three states.
  crash OUT         (one process, no MPI) save step 1, dump the tables, then save step 2 with
                    HYBRIDPS_CKPT_TEST_PAUSE set: the test kills it while it writes.
  hold OUT          (one process, no MPI) a job's CheckpointManager on OUT/ckpt: prints
                    "holding" once it holds the directory's lock, keeps it until stdin closes.
  locked OUT        (mpirun -np 2) a CheckpointManager on OUT/ckpt while `hold` holds it: every
                    rank's ConfigError message goes to OUT/locked.json.
Several MPI scenarios run in one job, in order: ``save,damaged,trainer OUT``; a scenario written
NAME@N runs on the first N ranks of the job (``restore@1,restore@3,restore,restore-ps OUT``).
"""
import json
import os
import shutil
import sys
import types

import numpy as np

from hybridps import checkpoint as ckpt
from hybridps.sparse.routing import owner_ranks
from hybridps.sparse.shard import TABLE_COUNTERS
from hybridps._hashtable import EmbeddingHashTable
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_BUCKETS = 256
TABLE_SPECS = [("sgd", 4), ("adagrad", 8), ("adam", 3), ("ftrl", 5)]


def make_tables():
    return [EmbeddingHashTable(dim=dim, optimizer=opt, learning_rate=0.05, seed=11, table_id=t,
                               min_count=2, initial_accumulator=0.1)
            for t, (opt, dim) in enumerate(TABLE_SPECS)]


def fill_tables(tables, rank, world_size, rows_per_table=6000):
    """Keys this rank owns; inserts, repeated hits, gradients at several steps, evictions."""
    rng = np.random.default_rng(1000 + rank)
    for t, table in enumerate(tables):
        pool = np.unique(rng.integers(-2**62, 2**62, size=rows_per_table * world_size * 2))
        mine = pool[owner_ranks(pool, world_size, NUM_BUCKETS) == rank][:rows_per_table]
        table.lookup_or_insert(mine, step=1)                 # first hit: candidates (min_count 2)
        admitted = mine[: int(len(mine) * 0.8)]
        table.lookup_or_insert(admitted, step=2)             # second hit: admitted rows
        for step in range(3, 7):
            touched = admitted[rng.random(len(admitted)) < 0.5]
            grads = rng.standard_normal((len(touched), table.dim)).astype(np.float32)
            table.apply_gradients(touched, grads, step=step)
        table.evict_to_budget(table.size - 25, "lru")        # evicted_rows counter > 0


def dump_tables(path, tables):
    arrays = {}
    for t, table in enumerate(tables):
        for name, value in table.export().items():
            arrays[f"t{t}_{name}"] = value
        arrays[f"t{t}_counters"] = np.array(
            [table.counters()[n] for n in TABLE_COUNTERS], dtype=np.int64)
    np.savez(path, **arrays)


def scenario_save(comm, out):
    tables = make_tables()
    fill_tables(tables, comm.rank, comm.size)
    os.makedirs(os.path.join(out, "truth"), exist_ok=True)
    dump_tables(os.path.join(out, "truth", f"rank{comm.rank}.npz"), tables)
    info = ckpt.save_checkpoint(os.path.join(out, "ckpt"), 6, tables=tables, comm=comm,
                                num_buckets=NUM_BUCKETS, data_state={"next_step": 6, "rank": comm.rank})
    if comm.rank == 0:
        with open(os.path.join(out, "save.json"), "w") as fh:
            json.dump({"path": info.path, "total_bytes": info.total_bytes}, fh)


def scenario_restore(comm, out, ps_servers=0):
    tables = make_tables()
    if ps_servers:        # the last ps_servers ranks serve (hybridps.backends.ps.protocol.PSRoles)
        workers = comm.size - ps_servers
        shard = (comm.rank - workers, ps_servers) if comm.rank >= workers else ckpt.NO_SHARD
        owner, owners = comm.rank - workers, ps_servers
    else:
        shard, owner, owners = None, comm.rank, comm.size
    report = ckpt.restore_checkpoint(os.path.join(out, "ckpt"), tables=tables, comm=comm, shard=shard)
    for t, table in enumerate(tables):
        keys = table.export(values=False)
        for kind in ("keys", "candidate_keys"):
            owners_of_keys = owner_ranks(keys[kind], owners, NUM_BUCKETS)
            assert np.all(owners_of_keys == owner), f"table {t}: rank {comm.rank} got {kind} it does not own"
    target = os.path.join(out, "restored-ps" if ps_servers else f"restored-np{comm.size}")
    os.makedirs(target, exist_ok=True)
    dump_tables(os.path.join(target, f"rank{comm.rank}.npz"), tables)
    with open(os.path.join(target, f"report{comm.rank}.json"), "w") as fh:
        json.dump({"bytes_read": report.bytes_read, "rows": report.rows,
                   "candidates": report.candidates, "data_state": report.data_state,
                   "step": report.step, "counters": report.counters}, fh)


def scenario_damaged(comm, out):
    from hybridps.errors import CheckpointError
    source = os.path.join(out, "ckpt")
    damaged_root = os.path.join(out, "damaged")
    if comm.rank == 0:
        shutil.rmtree(damaged_root, ignore_errors=True)
        shutil.copytree(source, damaged_root)
        ckpt_dir = ckpt.resolve_checkpoint(damaged_root)
        name = "table-002.rank-00001.rows"   # saved rank 1 holds odd buckets only
        with np.load(os.path.join(ckpt_dir, "table-002.rank-00001.index.npz")) as index:
            offsets = index["row_offsets"]
        record = ckpt.row_record_dtype(3 * 3).itemsize
        bucket = next(b for b in range(1, NUM_BUCKETS, 2) if offsets[b + 1] > offsets[b])  # rank 1's
        with open(os.path.join(ckpt_dir, name), "r+b") as fh:
            fh.seek(offsets[bucket] * record + 40)
            byte = fh.read(1)
            fh.seek(offsets[bucket] * record + 40)
            fh.write(bytes([byte[0] ^ 0x10]))
    comm.barrier()
    tables = make_tables()
    try:
        ckpt.restore_checkpoint(damaged_root, tables=tables, comm=comm)
    except CheckpointError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {comm.rank}: the damaged checkpoint was restored")
    assert "rank 1:" in message and "table-002.rank-00001.rows" in message \
        and "checksum mismatch" in message, message
    assert all(t.size == 0 and t.num_candidates == 0 for t in tables), "tables touched"
    with open(os.path.join(out, f"damaged{comm.rank}.txt"), "w") as fh:
        fh.write(message)


def scenario_trainer(comm, out):
    from hybridps.config import make_config
    from hybridps.trainer import Trainer
    base = dict(model="deepfm", data="synthetic", num_fields=4, num_dense=3, vocab_size=500,
                dim=4, hidden=[8], batch_size=32, optimizer="adam", dense_optimizer="adam",
                learning_rate=0.05, warmup_steps=0, progress=False, table_layout="per_field",
                seed=3, checkpoint_dir=os.path.join(out, "trainer_ckpt"))

    def final_state(trainer):
        state = {f"dense_{i}": v.numpy() for i, v in enumerate(trainer.model.variables)}
        for t, table in enumerate(trainer.backend.state().tables):
            exported = table.export()
            order = np.argsort(exported["keys"])
            for name in ("keys", "values", "slots", "hits", "update_count"):
                state[f"t{t}_{name}"] = exported[name][order]
        return state

    # the Trainer saves at the end of a run with checkpoint_dir and resumes by itself with resume
    straight = Trainer(make_config(overrides=dict(base, steps=6, checkpoint_dir=None)))
    straight.run()
    first_half = Trainer(make_config(overrides=dict(base, steps=3)))
    first_half.run()
    info = ckpt.resolve_checkpoint(base["checkpoint_dir"])
    resumed = Trainer(make_config(overrides=dict(base, steps=6, resume=True)))
    messages = resumed.resume_messages
    start = resumed.start_step
    assert start == 3, start
    assert resumed.dataset.state()["next_step"] == 3, resumed.dataset.state()
    assert int(resumed.backend.state().dense_optimizer.iterations.numpy()) == 3
    resumed.run()
    np.savez(os.path.join(out, f"trainer_straight.rank{comm.rank}.npz"), **final_state(straight))
    np.savez(os.path.join(out, f"trainer_resumed.rank{comm.rank}.npz"), **final_state(resumed))
    np.savez(os.path.join(out, f"trainer_half.rank{comm.rank}.npz"), **final_state(first_half))
    if comm.rank == 0:
        with open(os.path.join(out, "trainer.json"), "w") as fh:
            json.dump({"checkpoint": str(getattr(info, "path", info)), "messages": messages}, fh)


def scenario_crash(out):
    tables = make_tables()
    fill_tables(tables, 0, 1, rows_per_table=3000)
    ckpt.save_checkpoint(os.path.join(out, "ckpt"), 1, tables=tables, num_buckets=NUM_BUCKETS)
    dump_tables(os.path.join(out, "step1.npz"), tables)
    for table in tables:                                    # change state before step 2
        keys = table.export(values=False)["keys"][:100]
        table.apply_gradients(keys, np.ones((len(keys), table.dim), np.float32), step=7)
    os.environ["HYBRIDPS_CKPT_TEST_PAUSE"] = "0.4"
    print("saving step 2", flush=True)
    ckpt.save_checkpoint(os.path.join(out, "ckpt"), 2, tables=tables, num_buckets=NUM_BUCKETS)
    print("saved step 2", flush=True)


def scenario_hold(out):
    from hybridps.comm import SingleProcessComm
    config = types.SimpleNamespace(checkpoint_dir=os.path.join(out, "ckpt"))
    manager = ckpt.CheckpointManager(config, None, SingleProcessComm())
    print("holding", flush=True)
    sys.stdin.read()
    manager.close()


def scenario_locked(comm, out):
    from hybridps.errors import ConfigError
    config = types.SimpleNamespace(checkpoint_dir=os.path.join(out, "ckpt"))
    try:
        ckpt.CheckpointManager(config, None, comm)
        message = None
    except ConfigError as exc:
        message = str(exc)
    messages = comm.allgather_object(message)
    if comm.rank == 0:
        with open(os.path.join(out, "locked.json"), "w") as fh:
            json.dump(messages, fh)


MPI_SCENARIOS = {"save": scenario_save, "restore": scenario_restore, "damaged": scenario_damaged,
                 "trainer": scenario_trainer, "locked": scenario_locked,
                 "restore-ps": lambda comm, out: scenario_restore(comm, out, ps_servers=2)}


def main():
    """``SCENARIO OUT``; the MPI scenarios also as ``A,B,... OUT``: one after another in one
    job (one start-up for several scenarios of the same world size)."""
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "crash":
        return scenario_crash(out)
    if scenario == "hold":
        return scenario_hold(out)
    scenarios = scenario.split(",")
    from hybridps import comm as comm_module
    comm = comm_module.init(with_horovod="trainer" in scenarios)
    for name in scenarios:
        if "@" in name:
            sys.path.insert(0, REPO)        # mpirun runs this file as a script: tests/ is not on the path
            from tests.parallel.sub_world import first_ranks
            name, ranks = name.split("@")
            with first_ranks(int(ranks), with_horovod=False) as sub:
                if sub is not None:
                    MPI_SCENARIOS[name](sub, out)
                    sub.barrier()
            continue
        MPI_SCENARIOS[name](comm, out)
        comm.barrier()


if __name__ == "__main__":
    main()
