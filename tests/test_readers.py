"""Parquet and TFRecord readers in one process: each against the same file read independently
(pyarrow, tf.data), the same rows giving the same batches in both formats, sharding, equal
steps, epochs, seeded shuffling, a resume that reads no row twice, and bad input.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hybridps.config import make_config  # noqa: E402
from hybridps.data.hashing import space_keys, text_ids  # noqa: E402
from hybridps.errors import DataError  # noqa: E402
from hybridps.schema import build_schema  # noqa: E402
from tests.schema_data import FEATURES, rows, write_parquet, write_tfrecord  # noqa: E402

SCHEMA = build_schema(make_config(overrides={"features": FEATURES}))


def expected_batch(columns, index):
    """The batch of the rows ``index`` computed from the columns themselves."""
    take = lambda name: [columns[name][i] for i in index]                   # noqa: E731
    seen = [list(s)[:4] for s in take("seen")]
    tags = take("tags")
    return {"labels": np.array(take("label"), np.float32),
            "dense": np.stack([np.array(take("x"), np.float32),
                               np.log1p(np.maximum(np.array(take("y")), 0)).astype(np.float32)], 1),
            "keys": np.stack([space_keys("user", text_ids(take("user"))),
                              space_keys("item", np.array(take("item")))], 1),
            "tags": (space_keys("tag", text_ids([t for ts in tags for t in ts])), [len(t) for t in tags]),
            "seen": (space_keys("item", np.array([s for ss in seen for s in ss], np.int64)), [len(s) for s in seen]),
            "groups": np.array(take("row"))}


def assert_batch(batch, want, float_rtol=1e-6):
    np.testing.assert_array_equal(batch.labels, want["labels"])
    np.testing.assert_allclose(batch.dense, want["dense"], rtol=float_rtol)
    np.testing.assert_array_equal(batch.keys, want["keys"])
    for name in ("tags", "seen"):
        np.testing.assert_array_equal(batch.lists[name][0], want[name][0])
        assert batch.lists[name][1].tolist() == want[name][1]
    np.testing.assert_array_equal(batch.groups, want["groups"])


def reader(kind, paths, **options):
    from hybridps.data.parquet import ParquetReader
    from hybridps.data.tfrecord import TFRecordReader
    return {"parquet": ParquetReader, "tfrecord": TFRecordReader}[kind](paths, SCHEMA, **options)


def test_parquet_reader_against_the_file_read_by_pyarrow(tmp_path):
    import pyarrow.parquet as pq
    path = write_parquet(tmp_path / "a.parquet", rows(100), row_group_size=25)
    table = pq.read_table(path).to_pydict()                # the file, read independently
    got = list(reader("parquet", [path], rank=1, world_size=2).iter_batches(10, 5))
    # row groups 0..3 of 25 rows: rank 1 reads groups 1 and 3 (rows 25-49, 75-99)
    mine = list(range(25, 50)) + list(range(75, 100))
    for k, batch in enumerate(got):
        assert_batch(batch, expected_batch(table, mine[10 * k:10 * (k + 1)]))


def test_tfrecord_reader_against_tf_data_and_the_same_batches_as_parquet(tmp_path):
    import tensorflow as tf
    columns = rows(60, seed=1)
    record_paths, parquet_paths = [], []
    for part in range(3):                                 # three parts of 20 rows in each format
        piece = {k: v[20 * part:20 * (part + 1)] for k, v in columns.items()}
        record_paths.append(write_tfrecord(tmp_path / f"p{part}.tfrecord", piece))
        parquet_paths.append(write_parquet(tmp_path / f"p{part}.parquet", piece, row_group_size=20))
    # the records, read independently with tf.data
    spec = {"row": tf.io.FixedLenFeature([], tf.int64), "tags": tf.io.VarLenFeature(tf.string)}
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(record_paths[0])]
    assert [int(p["row"]) for p in parsed] == list(columns["row"][:20])
    assert [[t.decode() for t in p["tags"].values.numpy()] for p in parsed] == columns["tags"][:20]
    for rank in (0, 1):
        from_records = list(reader("tfrecord", record_paths, rank=rank, world_size=2).iter_batches(8, 4))
        from_parquet = list(reader("parquet", parquet_paths, rank=rank, world_size=2).iter_batches(8, 4))
        mine = [i for part in range(3) if part % 2 == rank for i in range(20 * part, 20 * (part + 1))]
        # 2 batches of 8 per epoch (rank 1's 20 rows); 4 batches: the first 16 rows, twice
        assert len(from_records) == len(from_parquet) == 4
        for k, (a, b) in enumerate(zip(from_records, from_parquet)):
            want = expected_batch(columns, mine[8 * (k % 2):8 * (k % 2) + 8])
            assert_batch(b, want)
            assert_batch(a, want)


def test_every_rank_runs_the_same_steps_and_the_remainder_is_dropped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", rows(70), row_group_size=10)  # 7 groups
    shares = [reader("parquet", [path], rank=r, world_size=2) for r in (0, 1)]
    assert [s.num_rows for s in shares] == [40, 30]
    assert shares[0].batches_per_epoch(8) == shares[1].batches_per_epoch(8) == 3   # 30 // 8
    batches = list(shares[0].iter_batches(8, 7))                 # two epochs and one batch
    assert shares[0].epoch == 2 and shares[0].batches_done == 1
    assert shares[0].stats()["dropped_rows"] == 2 * (40 - 24)
    first_epoch = np.concatenate([b.groups for b in batches[:3]])
    second_epoch = np.concatenate([b.groups for b in batches[3:6]])
    np.testing.assert_array_equal(first_epoch, second_epoch)     # no shuffling: the same rows again


class EveryRankReady:
    """A stream's per-step agreement for ranks run one after another in one process (every
    rank sees the same files): go when ready, end when ended."""

    def agree(self, step, ready=True, ended=False):
        assert ready or ended, "the test wrote everything, with an end marker"
        return "go" if ready else "end"


@pytest.mark.parametrize("kind", ["parquet", "tfrecord", "csv", "stream"])
def test_data_stats_positives_are_the_label_1_rows_of_every_format(tmp_path, kind):
    """data_stats.positives over 2 ranks after an epoch equals the label column's sum read
    independently (pyarrow), for every reader; a stream's are those of the rows it trained."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from hybridps.data.schema_csv import SchemaCSVReader
    from hybridps.data.stats import combine_data_stats
    from hybridps.data.stream import DirectoryStream
    from tests.test_streaming import write_csv
    columns = rows(80, seed=3)
    parts = [{k: v[20 * p:20 * (p + 1)] for k, v in columns.items()} for p in range(4)]
    label_sum = lambda path: pc.sum(pq.read_table(path, columns=["label"])["label"]).as_py()  # noqa: E731
    stats = []
    if kind in ("parquet", "tfrecord"):          # 4 parts of 20 rows: 2 per rank, both read in an epoch
        paths = [write_parquet(tmp_path / f"p{p}.parquet", part, 20) for p, part in enumerate(parts)]
        expected = sum(label_sum(p) for p in paths)
        if kind == "tfrecord":
            paths = [write_tfrecord(tmp_path / f"p{p}.tfrecord", part) for p, part in enumerate(parts)]
        for rank in (0, 1):
            share = reader(kind, paths, rank=rank, world_size=2)
            assert len(list(share.iter_batches(10, 4))) == 4
            stats.append(share.stats())
    elif kind == "csv":
        path = tmp_path / "a.csv"
        write_csv(path, columns)
        import pyarrow.csv as pacsv
        expected = pc.sum(pacsv.read_csv(path)["label"]).as_py()
        stats = [SchemaCSVReader(str(path), SCHEMA, rank=rank, world_size=2).stats() for rank in (0, 1)]
    else:                                        # 80 rows in 4 files; 3 steps of 2 x 12 rows
        paths = [write_parquet(tmp_path / f"f{p}.parquet", part, 20) for p, part in enumerate(parts)]
        open(tmp_path / "_END", "w").close()
        trained = pq.read_table(paths).slice(0, 72)          # the rows of the 3 global batches
        expected = pc.sum(trained["label"]).as_py()
        for rank in (0, 1):
            stream = DirectoryStream(str(tmp_path), SCHEMA, rank=rank, world_size=2)
            assert len(list(stream.iter_batches(12, None, control=EveryRankReady()))) == 3
            stats.append(stream.stats())
    assert 0 < expected < 80
    combined = combine_data_stats(stats)
    assert combined["positives"] == expected
    assert sum(p["positives"] for p in combined["per_rank"]) == expected


def test_data_stats_leave_out_a_figure_no_reader_reports():
    from hybridps.data.stats import combine_data_stats
    combined = combine_data_stats([{"kind": "x", "rows": 5, "bad_lines": 0}, None])
    assert combined["rows"] == 5 and "positives" not in combined


def test_shuffling_is_deterministic_for_a_seed_and_differs_between_epochs(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", rows(96), row_group_size=12)
    take = lambda seed: np.concatenate([b.groups for b in reader(  # noqa: E731
        "parquet", [path], rank=0, world_size=2, shuffle=True, shuffle_buffer=20, seed=seed
    ).iter_batches(8, 12)])
    a, b, other = take(3), take(3), take(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert not np.array_equal(a[:48], a[48:])                    # epoch 1 is another order
    assert sorted(a[:48].tolist()) == sorted(a[48:].tolist())    # of the same rows


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_resume_mid_epoch_over_several_files_reads_every_row_once(tmp_path, shuffle):
    paths = [write_parquet(tmp_path / f"part{i}.parquet", rows(40, seed=i), row_group_size=10)
             for i in range(3)]                                  # 12 row groups, 6 per rank
    options = dict(world_size=2, shuffle=shuffle, shuffle_buffer=15, seed=9)
    straight = {r: np.concatenate([b.groups for b in reader("parquet", paths, rank=r, **options)
                                   .iter_batches(10, 6)]) for r in (0, 1)}
    resumed = {}
    for r in (0, 1):
        first = reader("parquet", paths, rank=r, **options)
        before = [b.groups for b in first.iter_batches(10, 2)]
        state = first.state()
        again = reader("parquet", paths, rank=r, **options)
        again.restore(state)
        after = [b.groups for b in again.iter_batches(10, 4)]
        resumed[r] = np.concatenate(before + after)
        np.testing.assert_array_equal(resumed[r], straight[r])   # the same rows as without a stop
    everything = np.concatenate(list(resumed.values()))
    assert len(set(everything.tolist())) == len(everything) == 120   # each row exactly once


def test_bad_parquet_input_names_the_file_the_row_group_and_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = rows(20)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataError, match=r"x.parquet: not a readable Parquet file"):
        reader("parquet", [str(not_parquet)])
    missing = write_parquet(tmp_path / "m.parquet", {k: v for k, v in good.items() if k != "tags"}, 10)
    with pytest.raises(DataError, match=r"m.parquet: column\(s\) \['tags'\] missing"):
        reader("parquet", [missing])
    wrong = dict(good, item=np.arange(20) + 0.5)
    path = write_parquet(tmp_path / "w.parquet", wrong, 10)
    with pytest.raises(DataError, match=r"w.parquet, row group 0: column 'item' has type double"):
        next(reader("parquet", [path]).iter_batches(5, 1))
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({k: v[:0] if not isinstance(v, list) else pa.array([], pa.string())
                             for k, v in good.items() if k not in ("tags", "seen")}), empty)
    with pytest.raises(DataError):
        reader("parquet", [str(empty)])
    # a damaged row group: garble the bytes of the second row group's pages
    damaged = write_parquet(tmp_path / "d.parquet", rows(60), 20)
    meta = pq.ParquetFile(damaged).metadata.row_group(1)
    start = min(meta.column(c).data_page_offset for c in range(meta.num_columns))
    raw = bytearray(open(damaged, "rb").read())
    raw[start:start + 400] = b"\xff" * 400
    open(damaged, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"d.parquet, row group 1: cannot be read"):
        list(reader("parquet", [damaged]).iter_batches(10, 4))
    skipping = reader("parquet", [damaged], on_bad_line="skip")
    batches = list(skipping.iter_batches(10, 4))                 # row groups 0 and 2
    assert len(batches) == 4 and skipping.bad_parts == 1 and "row group 1" in skipping.bad_line_examples[0]
    assert np.concatenate([b.groups for b in batches]).tolist() == list(range(20)) + list(range(40, 60))
    assert skipping.stats()["bad_lines"] == 20


def test_bad_tfrecord_input_names_the_file(tmp_path):
    path = write_tfrecord(tmp_path / "a.tfrecord", rows(10))
    raw = open(path, "rb").read()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(raw[:-30])
    with pytest.raises(DataError, match=r"cut.tfrecord, record 9: truncated"):
        reader("tfrecord", [str(cut)])
    other = tmp_path / "other.tfrecord"
    columns = rows(10)
    columns.pop("tags")
    import tensorflow as tf
    with tf.io.TFRecordWriter(str(other)) as writer:
        writer.write(tf.train.Example().SerializeToString())
    with pytest.raises(DataError, match=r"other.tfrecord: no record among the first 100 holds the feature"):
        list(reader("tfrecord", [str(other)]).iter_batches(1, 1))


def test_data_specs_name_the_format_or_take_it_from_the_file_names(tmp_path):
    from hybridps.data import data_files
    a = write_parquet(tmp_path / "a.parquet", rows(5), 5)
    b = write_parquet(tmp_path / "b.parquet", rows(5), 5)
    assert data_files(str(tmp_path)) == ("parquet", [a, b])
    assert data_files(f"parquet:{tmp_path}/*.parquet") == ("parquet", [a, b])
    assert data_files(f"{a},{b}") == ("parquet", [a, b])
    (tmp_path / "c.bin").write_text("?")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        data_files(str(tmp_path / "c.bin"))
    with pytest.raises(DataError, match=r"does not exist"):
        data_files(str(tmp_path / "nope.parquet"))
