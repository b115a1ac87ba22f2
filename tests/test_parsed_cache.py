"""The cache of parsed parts (``--data-cache``, hybridps.data.parsed_cache) and ``hybridps
prepare-data``: batches read through the cache equal the file read independently by pyarrow,
in the epoch that fills it, in later epochs and in later runs on other rank counts; a changed
file or schema never reads an old entry; a damaged entry or a cache that cannot be written
costs speed, never rows.
"""
import json
import os

import numpy as np
import pytest

from hybridps.config import make_config
from hybridps.errors import ConfigError
from hybridps.schema import build_schema
from tests.schema_data import FEATURES, rows, write_parquet, write_tfrecord
from tests.test_readers import SCHEMA, assert_batch, expected_batch


def parquet(paths, cache, **options):
    from hybridps.data.parquet import ParquetReader
    return ParquetReader(paths, SCHEMA, data_cache=str(cache), **options)


def entries(cache):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(cache) for f in files
                  if f.endswith(".parsed"))


def test_cached_batches_equal_the_file_in_every_epoch_and_run(tmp_path):
    import pyarrow.parquet as pq
    path = write_parquet(tmp_path / "a.parquet", rows(100), row_group_size=25)
    table = pq.read_table(path).to_pydict()                # the file, read independently
    cache = tmp_path / "cache"
    first = parquet([path], cache, rank=1, world_size=2)
    got = list(first.iter_batches(10, 15))                 # 5 batches an epoch: 3 epochs
    mine = list(range(25, 50)) + list(range(75, 100))      # rank 1: row groups 1 and 3
    for k, batch in enumerate(got):
        assert_batch(batch, expected_batch(table, mine[10 * (k % 5):10 * (k % 5 + 1)]))
        np.testing.assert_array_equal(batch.row_ids, mine[10 * (k % 5):10 * (k % 5 + 1)])
    # epoch 1 converted its 2 parts and stored them; epochs 2 and 3 read them back
    assert (first.cache.misses, first.cache.hits) == (2, 4)
    assert len(entries(cache)) == 2
    assert first.stats()["cache"]["bytes_written"] > 0
    # a later run on one rank: rank 1's parts come from the cache, the others are converted
    again = parquet([path], cache, rank=0, world_size=1)
    batches = list(again.iter_batches(20, 5))
    for k, batch in enumerate(batches):
        assert_batch(batch, expected_batch(table, range(20 * k, 20 * (k + 1))))
    assert (again.cache.hits, again.cache.misses) == (2, 2)
    assert len(entries(cache)) == 4


def test_tfrecord_parts_are_cached_too(tmp_path):
    columns = rows(30)
    paths = [write_tfrecord(tmp_path / f"p{i}.tfrecord", {k: v[10 * i:10 * (i + 1)] for k, v in columns.items()})
             for i in range(3)]
    from hybridps.data.tfrecord import TFRecordReader
    plain = list(TFRecordReader(paths, SCHEMA).iter_batches(6, 10))
    cached_reader = TFRecordReader(paths, SCHEMA, data_cache=str(tmp_path / "cache"))
    cached = list(cached_reader.iter_batches(6, 10))        # 5 batches an epoch: 2 epochs
    assert (cached_reader.cache.misses, cached_reader.cache.hits) == (3, 3)
    for a, b in zip(plain, cached):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.dense, b.dense)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.groups, b.groups)
        for name in a.lists:
            np.testing.assert_array_equal(a.lists[name][0], b.lists[name][0])
            np.testing.assert_array_equal(a.lists[name][1], b.lists[name][1])


def test_a_changed_file_or_schema_never_reads_an_old_entry(tmp_path):
    import pyarrow.parquet as pq
    path = tmp_path / "a.parquet"
    cache = tmp_path / "cache"
    write_parquet(path, rows(40, seed=1), row_group_size=20)
    list(parquet([str(path)], cache).iter_batches(20, 2))
    # new rows in the same file: other keys (the size and mtime differ), the new rows read
    write_parquet(path, rows(40, seed=2), row_group_size=20)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    changed = parquet([str(path)], cache)
    table = pq.read_table(str(path)).to_pydict()
    for k, batch in enumerate(changed.iter_batches(20, 2)):
        assert_batch(batch, expected_batch(table, range(20 * k, 20 * (k + 1))))
    assert (changed.cache.hits, changed.cache.misses) == (0, 2)
    # another schema (a feature's key space): its own directory, no entry shared
    other_features = json.loads(json.dumps(FEATURES))
    other_features["sparse"][0]["key_space"] = "person"
    other = build_schema(make_config(overrides={"features": other_features}))
    from hybridps.data.parquet import ParquetReader
    reader = ParquetReader([str(path)], other, data_cache=str(cache))
    list(reader.iter_batches(20, 2))
    assert (reader.cache.hits, reader.cache.misses) == (0, 2)
    assert reader.cache.directory != changed.cache.directory
    # what conversion does not read (a table's dim and learning rate): the same entries
    tuned = json.loads(json.dumps(FEATURES))
    tuned["tables"]["user"] = {"dim": 8, "learning_rate": 0.01}
    reader = ParquetReader([str(path)], build_schema(make_config(overrides={"features": tuned})),
                           data_cache=str(cache))
    list(reader.iter_batches(20, 2))
    assert (reader.cache.hits, reader.cache.misses) == (2, 0)


def test_a_damaged_entry_is_reported_read_from_the_file_and_rewritten(tmp_path, capsys):
    import pyarrow.parquet as pq
    path = write_parquet(tmp_path / "a.parquet", rows(40), row_group_size=20)
    table = pq.read_table(path).to_pydict()
    cache = tmp_path / "cache"
    list(parquet([path], cache).iter_batches(20, 2))
    first, second = entries(cache)
    with open(first, "r+b") as fh:                         # cut short, as a failing disk might
        fh.truncate(os.path.getsize(first) - 7)
    with open(second, "r+b") as fh:                        # not a cache file at all
        fh.write(b"garbage!!")
    reader = parquet([path], cache)
    for k, batch in enumerate(reader.iter_batches(20, 2)):
        assert_batch(batch, expected_batch(table, range(20 * k, 20 * (k + 1))))
    assert (reader.cache.hits, reader.cache.misses) == (0, 2)
    err = capsys.readouterr().err
    assert "unreadable cache entry" in err and "size does not match" in err
    assert "not a hybridps parsed-data cache file" in err
    fresh = parquet([path], cache)                         # both were rewritten whole
    list(fresh.iter_batches(20, 2))
    assert (fresh.cache.hits, fresh.cache.misses) == (2, 0)


def test_a_cache_that_cannot_be_written_is_switched_off_and_no_row_is_lost(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq
    path = write_parquet(tmp_path / "a.parquet", rows(60), row_group_size=20)
    table = pq.read_table(path).to_pydict()
    reader = parquet([path], tmp_path / "cache")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("hybridps.data.parsed_cache.os.replace", disk_full)
    for k, batch in enumerate(reader.iter_batches(20, 6)):
        assert_batch(batch, expected_batch(table, range(20 * (k % 3), 20 * (k % 3 + 1))))
    assert not reader.cache.enabled and reader.cache.hits == 0
    assert capsys.readouterr().err.count("cannot write to the data cache") == 1
    assert entries(tmp_path / "cache") == []
    assert not [f for _, _, files in os.walk(tmp_path / "cache") for f in files]   # no temporaries


def test_a_cache_path_that_is_not_a_directory_is_a_config_error(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", rows(10), row_group_size=10)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"data_cache .*cannot create .*leave data_cache unset"):
        parquet([path], blocker)


def test_prepare_data_fills_the_cache_every_later_run_reads(tmp_path, capsys):
    from hybridps.data.prepare import main
    from hybridps.cli import build_parser
    paths = [write_parquet(tmp_path / f"p{i}.parquet", rows(30, seed=i), row_group_size=10) for i in range(2)]
    config = tmp_path / "schema.yaml"
    import yaml
    config.write_text(yaml.safe_dump({"features": FEATURES}))
    cache = tmp_path / "cache"
    args = build_parser().parse_args(["prepare-data", "--config", str(config), "--data", str(tmp_path),
                                      "--data-cache", str(cache)])
    assert args.func is main
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["parts"], summary["rows"], summary["converted"], summary["already_cached"]) == (6, 60, 6, 0)
    for rank in (0, 1):                                    # a 2-rank run: every part a hit
        reader = parquet(paths, cache, rank=rank, world_size=2)
        list(reader.iter_batches(10, 3))
        assert (reader.cache.hits, reader.cache.misses) == (3, 0)
    assert main(args) == 0                                 # again: nothing left to convert
    summary = json.loads(capsys.readouterr().out)
    assert (summary["converted"], summary["already_cached"]) == (0, 6)
    csv = tmp_path / "a.csv"
    csv.write_text("label,x\n1,2\n")
    args = build_parser().parse_args(["prepare-data", "--config", str(config), "--data", str(csv),
                                      "--data-cache", str(cache)])
    with pytest.raises(ConfigError, match=r"not Parquet or TFRecord files"):
        main(args)
    from hybridps.errors import DataError
    args = build_parser().parse_args(["prepare-data", "--config", str(config), "--data",
                                      str(tmp_path / "nothing*.parquet"), "--data-cache", str(cache)])
    with pytest.raises(DataError):
        main(args)


def test_a_cache_given_for_data_it_cannot_serve_is_reported(tmp_path, capsys):
    from hybridps.data import open_data
    csv = tmp_path / "a.csv"
    csv.write_text("label,x,y,user,item,tags,seen,row\n1,0.5,2,u1,3,t1|t2,4|5,0\n")
    config = make_config(overrides={"features": FEATURES, "data": str(csv), "data_cache": str(tmp_path / "c")})
    reader = open_data(config, SCHEMA, rank=0, world_size=1)
    assert reader.num_rows == 1
    assert "data_cache" in capsys.readouterr().err and not (tmp_path / "c").exists()
    open_data(config, SCHEMA, rank=1, world_size=2)        # reported by rank 0 only
    assert capsys.readouterr().err == ""
