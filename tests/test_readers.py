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
from hybridps.errors import ConfigError, DataError  # noqa: E402
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

    notes = ()

    def agree(self, step, ready=True, ended=False, failure=None, notes=()):
        assert failure is None and (ready or ended), "the test wrote everything, with an end marker"
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
    with pytest.raises(DataError, match=r"w.parquet: column 'item' has type double"):
        reader("parquet", [path])                   # found in the footer, before any row
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
    with pytest.raises(DataError, match=r"cut.tfrecord: record 9 \(byte \d+\): truncated"):
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


# ---------------------------------------------------------------------------- skipping bad data
def garble_row_group(path, group):
    """Overwrite the first 400 bytes of a row group's pages (its footer stays intact)."""
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(path).metadata.row_group(group)
    start = min(meta.column(c).data_page_offset for c in range(meta.num_columns))
    raw = bytearray(open(path, "rb").read())
    raw[start:start + 400] = b"\xff" * 400
    open(path, "wb").write(bytes(raw))


def intact_rows(path, groups):
    """The row ids of these row groups, read by pyarrow (the independent expectation)."""
    import pyarrow.parquet as pq
    handle = pq.ParquetFile(path)
    return [r for g in groups for r in handle.read_row_group(g, columns=["row"]).column(0).to_pylist()]


def test_a_row_group_found_bad_mid_epoch_under_skip_keeps_every_batch_and_counts_it_once(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", rows(80), row_group_size=20)   # 4 groups
    expected = intact_rows(path, [0, 1, 2, 3])
    garble_row_group(path, 1)
    share = reader("parquet", [path], on_bad_line="skip")
    assert share.batches_per_epoch(10) == 8            # fixed from the footer: 80 rows
    got = np.concatenate([b.groups for b in share.iter_batches(10, 16)])  # two epochs
    # epoch: the 60 rows of groups 0, 2, 3, then the share again from its start (20 rows)
    good = expected[:20] + expected[40:]
    assert got.tolist() == 2 * (good + good[:20])
    stats = share.stats()
    assert (stats["bad_parts"], stats["bad_lines"], stats["refilled_rows"]) == (1, 20, 40)
    assert share.epoch == 2 and share.batches_done == 0


def test_ranks_of_a_skipped_part_run_the_same_steps_and_a_resume_passes_it_again(tmp_path):
    paths = [write_parquet(tmp_path / f"p{i}.parquet", rows(40, seed=i), row_group_size=10)
             for i in range(2)]                         # 8 row groups: 4 per rank
    rank0_groups = [(0, 0), (0, 2), (1, 0), (1, 2)]    # (file, group) of rank 0
    expected = [intact_rows(paths[f], [g]) for f, g in rank0_groups]
    garble_row_group(paths[0], 2)                       # rank 0's second part
    options = dict(world_size=2, on_bad_line="skip")
    straight = {}
    for r in (0, 1):
        share = reader("parquet", paths, rank=r, **options)
        straight[r] = [b.groups for b in share.iter_batches(10, 6)]   # 4 per epoch: 1.5 epochs
        assert len(straight[r]) == 6 and all(len(g) == 10 for g in straight[r])
    good = expected[0] + expected[2] + expected[3]
    assert np.concatenate(straight[0]).tolist() == good + expected[0] + good[:20]
    # a resume after 5 batches (past the bad part, in epoch 1): the same batches, no crash
    first = reader("parquet", paths, rank=0, **options)
    before = [b.groups for b in first.iter_batches(10, 5)]
    again = reader("parquet", paths, rank=0, **options)
    again.restore(first.state())
    after = [b.groups for b in again.iter_batches(10, 1)]
    np.testing.assert_array_equal(np.concatenate(before + after), np.concatenate(straight[0]))
    assert again.stats()["bad_parts"] == 1 and again.stats()["bad_lines"] == 10


def corrupt_tfrecord_data(path, record):
    """Flip a byte inside a record's data (its data checksum no longer matches)."""
    raw = bytearray(open(path, "rb").read())
    offset = 0
    for _ in range(record):
        (length,) = np.frombuffer(bytes(raw[offset:offset + 8]), "<u8")
        offset += 16 + int(length)
    raw[offset + 12 + 3] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    return offset


def test_a_tfrecord_file_found_bad_mid_epoch_under_skip_keeps_every_batch(tmp_path):
    columns = rows(60)
    paths = [write_tfrecord(tmp_path / f"p{i}.tfrecord", {k: v[20 * i:20 * (i + 1)] for k, v in columns.items()})
             for i in range(3)]
    corrupt_tfrecord_data(paths[1], 5)
    with pytest.raises(DataError, match=r"p1.tfrecord, file 0: cannot be read"):
        list(reader("tfrecord", paths).iter_batches(10, 6))
    share = reader("tfrecord", paths, on_bad_line="skip")
    got = np.concatenate([b.groups for b in share.iter_batches(10, 6)])
    good = list(columns["row"][:20]) + list(columns["row"][40:])
    assert got.tolist() == good + good[:20]
    assert (share.bad_parts, share.bad_rows, share.refilled_rows) == (1, 20, 20)


def test_a_damaged_tfrecord_length_field_is_named_and_skipped_alike_on_every_rank(tmp_path):
    columns = rows(60)
    paths = [write_tfrecord(tmp_path / f"p{i}.tfrecord", {k: v[20 * i:20 * (i + 1)] for k, v in columns.items()})
             for i in range(3)]
    raw = bytearray(open(paths[2], "rb").read())
    offset = 0
    for _ in range(7):                                  # record 7's length field
        offset += 16 + int(np.frombuffer(bytes(raw[offset:offset + 8]), "<u8")[0])
    raw[offset + 6] = 0x7F                              # a length of ~2^55 bytes
    open(paths[2], "wb").write(bytes(raw))
    with pytest.raises(DataError, match=rf"p2.tfrecord: record 7 \(byte {offset}\): damaged length field"):
        reader("tfrecord", paths)
    # a length off by one stays inside the file: the record it names is still the damaged one
    raw = bytearray(open(paths[1], "rb").read())
    third = 0
    for _ in range(3):
        third += 16 + int(np.frombuffer(bytes(raw[third:third + 8]), "<u8")[0])
    raw[third] -= 1
    open(paths[1], "wb").write(bytes(raw))
    with pytest.raises(DataError, match=rf"p1.tfrecord: record 3 \(byte {third}\): damaged length field"):
        reader("tfrecord", paths[:2])
    paths[1] = write_tfrecord(tmp_path / "p1.tfrecord", {k: v[20:40] for k, v in columns.items()})
    shares = [reader("tfrecord", paths, rank=r, world_size=2, on_bad_line="skip") for r in (0, 1)]
    # the file is left out on both ranks: rank 0 holds p0, rank 1 p1; counted once (rank 0)
    assert [s.num_rows for s in shares] == [20, 20]
    assert [s.bad_parts for s in shares] == [1, 0] and shares[0].bad_rows == 7
    assert [len(list(s.iter_batches(10, 3))) for s in shares] == [3, 3]


def test_bad_rows_of_a_part_are_named_or_skipped_one_by_one(tmp_path):
    import pyarrow as pa
    columns = rows(40)
    columns["x"] = columns["x"].copy()
    columns["x"][7] = 1e300                              # beyond float32: inf in the model
    label = pa.array(columns["label"], mask=np.arange(40) == 25)   # row 25: no label
    path = write_parquet(tmp_path / "a.parquet", dict(columns, label=label), row_group_size=20)
    with pytest.raises(DataError, match=r"a.parquet, row group 0: row 7: column 'x' .*float32 .*1e\+300"):
        list(reader("parquet", [path]).iter_batches(10, 1))
    with pytest.raises(DataError, match=r"a.parquet, row group 1: row 5: column 'label' \(the label\) is missing"):
        list(reader("parquet", [path], rank=1, world_size=2).iter_batches(10, 1))
    share = reader("parquet", [path], on_bad_line="skip")
    got = np.concatenate([b.groups for b in share.iter_batches(19, 4)])   # two epochs of 2
    good = [r for r in range(40) if r not in (7, 25)]
    assert got.tolist() == 2 * good[:38]
    stats = share.stats()
    assert (stats["bad_lines"], stats["bad_parts"]) == (2, 0)          # counted once
    assert any("row 7" in e and "1e+300" in e for e in stats["bad_line_examples"])


def test_a_list_column_for_a_single_valued_feature_is_named_not_a_pyarrow_keyerror(tmp_path):
    columns = rows(20)
    bad = write_parquet(tmp_path / "b.parquet", dict(columns, user=[[u] for u in columns["user"]]), 10)
    good = write_parquet(tmp_path / "g.parquet", columns, 10)
    with pytest.raises(DataError, match=r"b.parquet: column 'user' has type list<.*string>; "
                                        r"expected integer ids or text \(single-valued feature 'user'"):
        reader("parquet", [bad, good])
    share = reader("parquet", [bad, good], on_bad_line="skip")
    assert share.num_rows == 20 and share.bad_parts == 1
    assert np.concatenate([b.groups for b in share.iter_batches(10, 2)]).tolist() == list(range(20))
    # a file cut short (no footer) is left out alike under skip, on every rank, counted once
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(open(good, "rb").read()[:-100])
    shares = [reader("parquet", [str(cut), good], rank=r, world_size=2, on_bad_line="skip") for r in (0, 1)]
    assert [s.num_rows for s in shares] == [10, 10] and [s.bad_parts for s in shares] == [1, 0]
    assert "cut.parquet: skipped the whole file (not a readable Parquet file" in shares[0].bad_line_examples[0]


class _NotUTF8(str):
    """A value whose bytes in a TFRecord are not UTF-8 (write_tfrecord encodes each value)."""
    def encode(self, *args):
        return b"u\xff\xfe"


def test_a_tfrecord_value_that_is_not_utf8_names_the_record_and_the_feature(tmp_path):
    columns = rows(10)
    columns["user"] = list(columns["user"])
    columns["user"][6] = _NotUTF8("u?")
    path = write_tfrecord(tmp_path / "a.tfrecord", columns)
    with pytest.raises(DataError, match=r"a.tfrecord, record 6: feature 'user' holds b'u\\xff\\xfe', "
                                        r"which is not UTF-8 text"):
        list(reader("tfrecord", [path]).iter_batches(5, 1))


class RecordingAgreement:
    """A StepAgreement stand-in that records what went through it: the file and synthetic
    sources hand their batches to ``batches``; a stream asks ``agree`` before each step."""

    notes = ()

    def __init__(self):
        self.first_steps, self.agreed = [], []

    def batches(self, batches, first):
        self.first_steps.append(first)
        for step, batch in enumerate(batches, start=first):
            self.agreed.append(step)
            yield batch

    def agree(self, step, ready=True, ended=False, failure=None, notes=()):
        assert failure is None
        self.agreed.append(step)
        return "go" if ready else "end"


def _open(tmp_path, kind):
    """(config, schema) of a run reading ``kind`` data written into tmp_path."""
    from hybridps.data import SAMPLE_CRITEO_CSV, preset_shape
    from tests.test_streaming import write_csv
    columns = rows(40, seed=4)
    features = {"features": FEATURES}
    if kind in ("criteo-synthetic", "criteo-sample", "criteo-tsv"):
        data = {"criteo-synthetic": "synthetic", "criteo-sample": "sample"}.get(kind)
        if kind == "criteo-tsv":          # the sample's rows as the headerless Criteo TSV
            lines = open(SAMPLE_CRITEO_CSV).read().splitlines()[1:]
            (tmp_path / "day.tsv").write_text("\n".join(line.replace(",", "\t") for line in lines) + "\n")
            data = str(tmp_path / "day.tsv")
        features = {}
    elif kind == "schema-synthetic":
        data = "synthetic"
    elif kind == "csv":
        write_csv(tmp_path / "a.csv", columns)
        data = str(tmp_path / "a.csv")
    elif kind == "parquet":
        data = write_parquet(tmp_path / "a.parquet", columns, 10)
    elif kind == "tfrecord":
        data = write_tfrecord(tmp_path / "a.tfrecord", columns)
    else:
        (tmp_path / "in").mkdir()
        write_parquet(tmp_path / "in" / "f0.parquet", columns, 10)
        open(tmp_path / "in" / "_END", "w").close()
        data = f"stream:{tmp_path / 'in'}"
    config = make_config(overrides=dict(features, data=data, batch_size=8))
    return config, build_schema(config, *preset_shape(config))


KINDS = ["criteo-synthetic", "criteo-sample", "criteo-tsv", "schema-synthetic", "csv", "parquet",
         "tfrecord", "stream"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_is_a_data_source_of_the_run_schema_with_one_iter_batches(tmp_path, kind):
    """open_data gives a DataSource for every kind of data: the run's schema, the flags a
    caller asks instead of probing (files finite, generators and streams not; streams alone
    streaming), batches of the schema's width through one iter_batches signature whose step
    agreement every source honours from start_step on, and its stats and fingerprint."""
    from hybridps.data import DataSource, open_data
    config, schema = _open(tmp_path, kind)
    source = open_data(config, schema, rank=0, world_size=1)
    assert isinstance(source, DataSource)
    assert source.schema is schema
    assert (source.rank, source.world_size) == (0, 1)
    is_file = kind not in ("criteo-synthetic", "schema-synthetic", "stream")
    assert source.finite is is_file
    assert source.streaming is (kind == "stream")
    control = RecordingAgreement()
    batches = list(source.iter_batches(8, 3, control=control, start_step=5))
    assert control.agreed == [5, 6, 7]
    assert [b.keys.shape for b in batches] == [(8, len(schema.single_features))] * 3
    assert [b.dense.shape[1] for b in batches] == [schema.num_dense] * 3
    stats, fingerprint = source.stats(), source.fingerprint()
    if kind.endswith("synthetic"):
        assert stats is None and fingerprint is None
    else:
        assert stats["rows"] == (24 if kind == "stream" else source.num_rows)
    assert (fingerprint is not None) is is_file
    assert source.progress_note() is None or kind == "stream"
    if kind == "stream":
        with pytest.raises(ConfigError, match="held-out"):
            next(iter(source.epoch_batches(8)))
        with pytest.raises(ConfigError, match="control"):
            next(iter(source.iter_batches(8, 1)))


@pytest.mark.parametrize("kind", ["criteo-synthetic", "schema-synthetic"])
def test_synthetic_held_out_batches_are_steps_no_training_reaches(tmp_path, kind):
    """A generator's epoch_batches: ``count`` batches of steps 2**40 + k (a pure function of
    the step), the training position unmoved."""
    from hybridps.data import open_data
    config, schema = _open(tmp_path, kind)
    source = open_data(config, schema, rank=0, world_size=1)
    held_out = list(source.epoch_batches(8, 2))
    assert len(held_out) == 2 and source.state()["next_step"] == 0
    for k, batch in enumerate(held_out):
        np.testing.assert_array_equal(batch.keys, source.batch((1 << 40) + k, 8).keys)
    with pytest.raises(ConfigError, match="held-out batches"):
        next(iter(source.epoch_batches(8)))


def test_a_stream_as_held_out_data_is_a_config_error_not_a_traceback(tmp_path):
    from hybridps.inference import HeldOut
    config, schema = _open(tmp_path, "stream")
    with pytest.raises(ConfigError, match="stream"):
        HeldOut(None, config, schema, 0, 1, 8)


def test_the_criteo_preset_is_a_format_of_the_file_table(tmp_path):
    """data_format resolves the Criteo preset's specs like the schema readers' (format, files);
    a schema run cannot name the Criteo sample."""
    from hybridps.data import SAMPLE_CRITEO_CSV, data_format
    _, criteo = _open(tmp_path, "criteo-sample")
    assert data_format("sample", criteo) == ("criteo", [SAMPLE_CRITEO_CSV])
    assert data_format(SAMPLE_CRITEO_CSV, criteo) == ("criteo", [SAMPLE_CRITEO_CSV])
    with pytest.raises(DataError, match="neither 'synthetic' nor 'sample'"):
        data_format(str(tmp_path / "missing.tsv"), criteo)
    path = write_parquet(tmp_path / "a.parquet", rows(5), 5)
    assert data_format(path, SCHEMA) == ("parquet", [path])
    with pytest.raises(ConfigError, match="Criteo sample"):
        data_format("sample", SCHEMA)
