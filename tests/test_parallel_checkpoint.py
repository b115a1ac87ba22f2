"""Checkpoints under real MPI: save on 2 ranks, restore on 1, 3 and 4 (resharding) and on 4
ranks as PS mode with 2 servers does, a damaged checkpoint refused by every rank alike, and a
Trainer resumed from a checkpoint.

The jobs run tests/parallel/checkpoint_scenarios.py. Expected rows are the tables' own exports
dumped by the saving job before the save (not anything the checkpoint code computed); the
owner of a key is recomputed here from splitmix64 in plain numpy.
"""
import glob
import json
import os
import pathlib

import numpy as np
import pytest

from tests.mpi_util import REPO, run_mpi
from tests.reference import mix64_array as splitmix64

pytestmark = pytest.mark.mpi

SCRIPT = os.path.join(REPO, "tests", "parallel", "checkpoint_scenarios.py")
NUM_BUCKETS = 256
NUM_TABLES = 4
META = ("hits", "last_update_step", "update_count")
COUNTERS = ("admitted_keys", "refused_inserts", "evicted_rows", "dropped_unadmitted_grads",
            "dropped_missing_grads", "skipped_nonfinite_grads", "applied_row_updates")





def owner(keys, world_size):
    return ((splitmix64(keys) % np.uint64(NUM_BUCKETS)) % np.uint64(world_size)).astype(np.int64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The 2-rank scenarios in one job: the save, the damaged copy of it refused, the Trainer runs."""
    out = tmp_path_factory.mktemp("ckpt_mpi")
    run_mpi(2, [SCRIPT, "save,damaged,trainer", out], timeout=360)
    return str(out)


@pytest.fixture(scope="module")
def restored(saved):
    """Restored on 1, 3 and 4 ranks, and as PS mode on 4, in one job of 4 ranks."""
    run_mpi(4, [SCRIPT, "restore@1,restore@3,restore,restore-ps", saved], timeout=240)
    return saved


def _load_rows(paths):
    """Per table, every shard's arrays concatenated and sorted by key; per rank, its keys."""
    tables, per_rank = [], []
    shards = [dict(np.load(path)) for path in paths]
    for t in range(NUM_TABLES):
        merged = {}
        for kind in ("keys", "values", "slots") + META:
            merged[kind] = np.concatenate([z[f"t{t}_{kind}"] for z in shards])
        for kind in ("candidate_keys", "candidate_hits"):
            merged[kind] = np.concatenate([z[f"t{t}_{kind}"] for z in shards])
        order, cand_order = np.argsort(merged["keys"]), np.argsort(merged["candidate_keys"])
        for kind in merged:
            merged[kind] = merged[kind][cand_order if kind.startswith("candidate") else order]
        assert len(np.unique(merged["keys"])) == len(merged["keys"]), f"table {t}: a key held twice"
        tables.append(merged)
    for z in shards:
        per_rank.append([(z[f"t{t}_keys"], z[f"t{t}_candidate_keys"]) for t in range(NUM_TABLES)])
    counters = np.sum([np.stack([z[f"t{t}_counters"] for t in range(NUM_TABLES)]) for z in shards], axis=0)
    return tables, counters, per_rank


@pytest.mark.parametrize("world", [1, 3, 4])
def test_restore_on_another_world_size_gives_back_every_row(restored, world):
    truth, truth_counters, _ = _load_rows(sorted(glob.glob(os.path.join(restored, "truth", "rank*.npz"))))
    paths = [os.path.join(restored, f"restored-np{world}", f"rank{r}.npz") for r in range(world)]
    got, _, per_rank = _load_rows(paths)
    for t in range(NUM_TABLES):
        assert len(truth[t]["keys"]) > 9000 and len(truth[t]["candidate_keys"]) > 2000  # substance
        for kind in truth[t]:
            np.testing.assert_array_equal(got[t][kind], truth[t][kind], err_msg=f"table {t}: {kind}")
        for r, tables_of_rank in enumerate(per_rank):
            keys, cand_keys = tables_of_rank[t]
            assert len(keys) > 0 and np.all(owner(keys, world) == r), f"rank {r} holds foreign rows"
            assert np.all(owner(cand_keys, world) == r), f"rank {r} holds foreign candidates"
    # counters: summed over ranks they equal the saved sums (rank 0 carries the totals)
    reports = [json.load(open(os.path.join(restored, f"restored-np{world}", f"report{r}.json")))
               for r in range(world)]
    summed = np.array([[sum(rep["counters"][t][n] for rep in reports) for n in COUNTERS]
                       for t in range(NUM_TABLES)])
    np.testing.assert_array_equal(summed, truth_counters)
    assert truth_counters[:, COUNTERS.index("evicted_rows")].min() > 0
    assert all(rep["step"] == 6 for rep in reports)
    assert [rep["data_state"]["rank"] for rep in reports] == [r % 2 for r in range(world)]


@pytest.mark.parametrize("world", [1, 3, 4])
def test_each_rank_reads_only_its_buckets(restored, world):
    ckpt_dir = glob.glob(os.path.join(restored, "ckpt", "ckpt-*"))[0]
    sizes = {os.path.basename(p): os.path.getsize(p) for p in glob.glob(os.path.join(ckpt_dir, "*"))}
    data_total = sum(v for k, v in sizes.items() if k.endswith((".rows", ".cands")))
    index_total = sum(v for k, v in sizes.items() if k.endswith(".index.npz"))
    reports = [json.load(open(os.path.join(restored, f"restored-np{world}", f"report{r}.json")))
               for r in range(world)]
    data_read = [rep["bytes_read"]["data"] for rep in reports]
    assert sum(data_read) == data_total, "every data byte is read exactly once over the ranks"
    for r, rep in enumerate(reports):
        assert data_read[r] < data_total / world * 1.5, (r, data_read[r], data_total)
        assert rep["bytes_read"]["index"] <= index_total
        assert rep["bytes_read"]["total"] < data_total / world * 1.5 + index_total + 40_000


def test_restore_in_ps_mode_gives_every_row_to_its_server(restored):
    """4 ranks = 2 workers (ranks 0, 1) + 2 servers (ranks 2, 3): servers own b % 2 == index."""
    truth, truth_counters, _ = _load_rows(sorted(glob.glob(os.path.join(restored, "truth", "rank*.npz"))))
    target = os.path.join(restored, "restored-ps")
    got, _, per_rank = _load_rows([os.path.join(target, f"rank{r}.npz") for r in range(4)])
    for t in range(NUM_TABLES):
        for kind in truth[t]:
            np.testing.assert_array_equal(got[t][kind], truth[t][kind], err_msg=f"table {t}: {kind}")
        for worker in (0, 1):
            keys, cand_keys = per_rank[worker][t]
            assert len(keys) == 0 and len(cand_keys) == 0, f"worker rank {worker} holds rows"
        for server in (0, 1):
            keys, cand_keys = per_rank[2 + server][t]
            assert len(keys) > 0 and np.all(owner(keys, 2) == server), f"server {server}: foreign rows"
            assert np.all(owner(cand_keys, 2) == server), f"server {server}: foreign candidates"
    reports = [json.load(open(os.path.join(target, f"report{r}.json"))) for r in range(4)]
    summed = np.array([[sum(rep["counters"][t][n] for rep in reports) for n in COUNTERS]
                       for t in range(NUM_TABLES)])
    np.testing.assert_array_equal(summed, truth_counters)
    ckpt_dir = glob.glob(os.path.join(restored, "ckpt", "ckpt-*"))[0]
    data_total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ckpt_dir, "*"))
                     if p.endswith((".rows", ".cands")))
    data_read = [rep["bytes_read"]["data"] for rep in reports]
    assert data_read[0] == data_read[1] == 0, "workers read no rows"
    assert data_read[2] + data_read[3] == data_total
    assert max(data_read[2:]) < data_total / 2 * 1.5, data_read


def test_damaged_bucket_is_refused_by_every_rank(saved):
    messages = [open(os.path.join(saved, f"damaged{r}.txt")).read() for r in range(2)]
    assert messages[0] == messages[1]
    assert "table-002.rank-00001.rows" in messages[0] and "checksum mismatch in bucket" in messages[0]


def test_a_held_checkpoint_directory_is_refused_by_every_rank_alike(tmp_path):
    import socket
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, SCRIPT, "hold", str(tmp_path)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        run_mpi(2, [SCRIPT, "locked", tmp_path], timeout=120)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with open(tmp_path / "locked.json") as fh:
        messages = json.load(fh)
    assert len(messages) == 2 and messages[0] == messages[1], messages
    assert messages[0].startswith(f"--checkpoint-dir {tmp_path / 'ckpt'} is in use by another training "
                                  f"job: pid {holder.pid} on host {socket.gethostname()}, started ")


def test_trainer_resumed_from_checkpoint_continues_exactly(saved):
    out = pathlib.Path(saved)
    info = json.load(open(out / "trainer.json"))
    assert any("resumed from" in m and "step 3" in m for m in info["messages"])
    for r in range(2):
        straight = np.load(out / f"trainer_straight.rank{r}.npz")
        resumed = np.load(out / f"trainer_resumed.rank{r}.npz")
        half = np.load(out / f"trainer_half.rank{r}.npz")
        assert set(straight.files) == set(resumed.files)
        for name in straight.files:
            np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"rank {r}: {name}")
        # the last three steps changed the state, so equality above is not trivial
        assert not np.allclose(half["dense_0"], straight["dense_0"])
        assert any(half[f"t{t}_keys"].shape != straight[f"t{t}_keys"].shape
                   or not np.allclose(half[f"t{t}_values"], straight[f"t{t}_values"]) for t in range(4))
