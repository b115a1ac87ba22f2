"""Tests of hybridps.data: hashing, the Criteo reader, the synthetic generator and roc_auc.

Expected values come from independent computations: hashlib / plain Python integer arithmetic
for keys, rows of the sample file parsed by hand, brute-force pair counts for AUC.
"""
import hashlib
import ast
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridps.data import (SAMPLE_CRITEO_CSV, Batch, CriteoReader, SyntheticCTR,
                           feature_keys, integer_feature_keys, make_dataset, missing_key,
                           roc_auc)
from hybridps.errors import ConfigError, DataError
from tests.reference import mix64_int as ref_splitmix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- references
M64 = (1 << 64) - 1


def ref_key(field, value):
    """The documented string-key formula, straight from hashlib."""
    data = str(field).encode() + b"\x1f" + value.encode("utf-8")
    d = hashlib.blake2b(data, digest_size=8, person=b"hybridps-feat-v1").digest()
    return int.from_bytes(d, "little", signed=True)


def ref_missing(field):
    d = hashlib.blake2b(str(field).encode() + b"\x1e", digest_size=8,
                        person=b"hybridps-feat-v1").digest()
    return int.from_bytes(d, "little", signed=True)





def ref_int_key(field, i):
    u = ref_splitmix(((i & M64) + (field << 48) + 0x9E3779B97F4A7C15) & M64)
    return u - (1 << 64) if u >= 1 << 63 else u


def brute_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- hashing
def test_feature_keys_match_documented_formula_and_literals():
    # literal values: blake2b(b"0\x1f05db9164", digest_size=8, person=b"hybridps-feat-v1") etc.
    assert feature_keys(0, "05db9164") == -2119132907839031769
    assert feature_keys(1, "08d6d899") == -5109655183825299816
    assert feature_keys(25, "ded4aac9") == 1570955859240383647
    assert missing_key(18) == 6906887721512368682
    values = ["05db9164", "a73ee510", "x", "ünïcode", "05db9164"]
    for field in (0, 7, 25, 1000):
        got = feature_keys(field, values)
        assert got.dtype == np.int64 and got.shape == (5,)
        assert got.tolist() == [ref_key(field, v) for v in values]


def test_feature_keys_missing_bytes_arrays_and_fields():
    assert feature_keys(3, "") == ref_missing(3)
    assert feature_keys(3, None) == ref_missing(3)
    assert feature_keys(3, [None, "", b"", float("nan")]).tolist() == [ref_missing(3)] * 4
    assert missing_key(3) != missing_key(4)
    assert missing_key(3) not in feature_keys(3, ["", "0", "None", "nan"]).tolist()[1:]
    # bytes and str of the same text hash alike; numpy arrays keep their shape
    assert feature_keys(2, b"abc") == feature_keys(2, "abc") == ref_key(2, "abc")
    arr = np.array([["a", "b"], ["", "a"]])
    got = feature_keys(5, arr)
    assert got.shape == (2, 2)
    assert got.tolist() == [[ref_key(5, "a"), ref_key(5, "b")],
                            [ref_missing(5), ref_key(5, "a")]]
    assert feature_keys(5, np.array([b"a", b"b"], dtype="S1")).tolist() == got[0].tolist()
    assert feature_keys(0, []).shape == (0,)
    # the same value in different fields: different keys
    keys = [int(feature_keys(f, "05db9164")) for f in range(26)]
    assert len(set(keys)) == 26
    with pytest.raises(DataError, match="integer_feature_keys"):
        feature_keys(0, [1, 2])
    with pytest.raises(ConfigError):
        feature_keys(-1, "a")


def test_integer_feature_keys_formula_and_disjoint_fields():
    assert integer_feature_keys(0, 0) == -2152535657050944081  # splitmix64's first output
    ids = np.array([0, 1, 2, 12345, -1, 2 ** 47, 2 ** 63 - 1], dtype=np.int64)
    for field in (0, 3, 25):
        got = integer_feature_keys(field, ids)
        assert got.dtype == np.int64
        assert got.tolist() == [ref_int_key(field, int(i)) for i in ids]
    got2d = integer_feature_keys(4, ids.reshape(1, -1))
    assert got2d.shape == (1, ids.size)
    # fields are disjoint for ids in [0, 2**48): check a dense block exhaustively
    block = np.arange(5000)
    all_keys = np.concatenate([integer_feature_keys(f, block) for f in range(26)])
    assert np.unique(all_keys).size == all_keys.size
    with pytest.raises(DataError):
        integer_feature_keys(0, np.array([1.5]))


def test_numpy_mixer_matches_cython_mix64():
    from hybridps._hashtable import mix64
    from hybridps.data.hashing import _splitmix64_numpy
    x = np.random.default_rng(0).integers(-2 ** 63, 2 ** 63 - 1, 1000, dtype=np.int64)
    np_out = _splitmix64_numpy(x.view(np.uint64))
    assert np.array_equal(np_out, mix64(x))
    assert [int(v) for v in np_out[:20]] == [ref_splitmix(int(v) & M64) for v in x[:20]]


def test_keys_identical_in_another_process_with_other_hash_seed():
    code = ("from hybridps.data import feature_keys, integer_feature_keys;"
            "print(feature_keys(3, ['abc', '', '05db9164']).tolist(),"
            " integer_feature_keys(7, [0, 99]).tolist())")
    outs = []
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout.strip())
    here = (f"{feature_keys(3, ['abc', '', '05db9164']).tolist()} "
            f"{integer_feature_keys(7, [0, 99]).tolist()}")
    assert outs[0] == outs[1] == here


# ----------------------------------------------------------------------------- Criteo reader
ROW1_DENSE = [0, math.log1p(3), math.log1p(260), 0, math.log1p(17668), 0, 0, math.log1p(33),
              0, 0, 0, 0, 0]
ROW1_CATS = ["05db9164", "08d6d899", "9143c832", "f56b7dd5", "25c83c98", "7e0ccccf",
             "df5c2d18", "0b153874", "a73ee510", "8f48ce11", "a7b606c4", "ae1bb660",
             "eae197fd", "b28479f6", "bfef54b3", "bad5ee18", "e5ba7672", "87c6f83c", "", "",
             "0429f84b", "", "3a171ecb", "c0d61a5c", "", ""]
# row 2 has I2 = -1, which the transform clamps to 0
ROW2_DENSE = [0, 0, math.log1p(19), math.log1p(35), math.log1p(30251), math.log1p(247),
              math.log1p(1), math.log1p(35), math.log1p(160), 0, math.log1p(1), 0,
              math.log1p(35)]
ROW2_CATS = ["68fd1e64", "04e09220", "95e13fd4", "a1e6a194", "25c83c98", "fe6b92e5",
             "f819e175", "062b5529", "a73ee510", "ab9456b4", "6153cf57", "8882c6cd",
             "769a1844", "b28479f6", "69f825dd", "23056e4f", "d4bb7bd8", "6fc84bfb", "", "",
             "5155d8a3", "", "be7c41b4", "ded4aac9", "", ""]


def expected_keys(cats):
    return [ref_key(f, v) if v else ref_missing(f) for f, v in enumerate(cats)]


def test_sample_is_shipped_inside_the_package():
    assert os.path.commonpath([SAMPLE_CRITEO_CSV, REPO]) == REPO
    assert os.path.isfile(SAMPLE_CRITEO_CSV)
    assert os.path.isfile(os.path.join(os.path.dirname(SAMPLE_CRITEO_CSV), "NOTICE.md"))


@pytest.fixture(scope="module")
def sample():
    return CriteoReader(SAMPLE_CRITEO_CSV)


def test_reader_parses_sample_csv(sample):
    assert sample.format == "csv-header"
    assert sample.num_rows == 200 and len(sample) == 200 and sample.bad_lines == 0
    assert sample.dense.dtype == np.float32 and sample.dense.shape == (200, 13)
    assert sample.keys.dtype == np.int64 and sample.keys.shape == (200, 26)
    assert sample.labels.dtype == np.float32 and set(np.unique(sample.labels)) <= {0.0, 1.0}
    np.testing.assert_allclose(sample.dense[0], ROW1_DENSE, rtol=1e-6)
    np.testing.assert_allclose(sample.dense[1], ROW2_DENSE, rtol=1e-6)
    assert sample.labels[0] == 0 and sample.labels[1] == 0
    assert sample.keys[0].tolist() == expected_keys(ROW1_CATS)
    assert sample.keys[1].tolist() == expected_keys(ROW2_CATS)
    # missing C19 in both rows gives the same reserved key; C9 = a73ee510 in both rows too
    assert sample.keys[0, 18] == sample.keys[1, 18] == missing_key(18)
    assert sample.keys[0, 8] == sample.keys[1, 8]
    # label counts, counted independently from the raw file
    with open(SAMPLE_CRITEO_CSV) as fh:
        raw_labels = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    assert sample.labels.sum() == raw_labels.count("1")


def test_reader_shards_disjoint_and_covering(sample):
    parts = [CriteoReader(SAMPLE_CRITEO_CSV, rank=r, world_size=3) for r in range(3)]
    assert [p.num_rows for p in parts] == [67, 67, 66]
    for r, p in enumerate(parts):
        np.testing.assert_array_equal(p.keys, sample.keys[r::3])
        np.testing.assert_array_equal(p.dense, sample.dense[r::3])
        np.testing.assert_array_equal(p.labels, sample.labels[r::3])
    rows = [tuple(row) for p in parts for row in p.keys.tolist()]
    assert sorted(rows) == sorted(tuple(row) for row in sample.keys.tolist())


def test_reader_rank_batches_union_equals_one_rank_batch(sample):
    # batch k of ranks 0 and 1 (B each) together = rows [2kB, 2(k+1)B) of the file
    r0, r1 = (CriteoReader(SAMPLE_CRITEO_CSV, rank=r, world_size=2) for r in range(2))
    b = 10
    for k, (x0, x1) in enumerate(zip(r0.iter_batches(b, 5), r1.iter_batches(b, 5))):
        got = sorted(tuple(row) for row in np.vstack([x0.keys, x1.keys]).tolist())
        want = sorted(tuple(row) for row in sample.keys[2 * k * b:2 * (k + 1) * b].tolist())
        assert got == want


def write_tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def sample_rows(n):
    with open(SAMPLE_CRITEO_CSV) as fh:
        return [line.split(",") for line in fh.read().splitlines()[1:n + 1]]


def test_reader_tsv_without_header(tmp_path, sample):
    path = write_tsv(tmp_path / "day_0.tsv", sample_rows(6))
    r = CriteoReader(path)
    assert r.format == "tsv" and r.num_rows == 6
    np.testing.assert_array_equal(r.keys, sample.keys[:6])
    np.testing.assert_array_equal(r.dense, sample.dense[:6])
    np.testing.assert_array_equal(r.labels, sample.labels[:6])


@pytest.mark.parametrize("mutate, problem", [
    (lambda row: row[:-1], "expected 40"),
    (lambda row: row[:3] + ["12x"] + row[4:], "I3"),
    (lambda row: ["2"] + row[1:], "label"),
    (lambda row: row[:5] + ["inf"] + row[6:], "I5"),
])
def test_reader_malformed_line_raises_or_skips(tmp_path, sample, mutate, problem):
    rows = sample_rows(6)
    rows[3] = mutate(rows[3])  # physical line 4
    path = write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError) as err:
        CriteoReader(path)
    msg = str(err.value)
    assert "bad.tsv" in msg and "line 4" in msg and problem in msg
    r = CriteoReader(path, on_bad_line="skip")
    assert r.bad_lines == 1 and r.num_rows == 5
    assert r.stats()["bad_lines"] == 1 and "line 4" in r.stats()["bad_line_examples"][0]
    np.testing.assert_array_equal(r.keys, sample.keys[[0, 1, 2, 4, 5]])
    # the bad line is data line 3: owned by rank 1 of 2, whose share shrinks; rank 0 parses it not
    assert CriteoReader(path, rank=0, world_size=2).num_rows == 3
    with pytest.raises(DataError, match="line 4"):
        CriteoReader(path, rank=1, world_size=2)


def test_reader_header_line_number_and_blank_lines(tmp_path, sample):
    with open(SAMPLE_CRITEO_CSV) as fh:
        lines = fh.read().splitlines()[:5]
    lines.insert(2, "")  # a blank line (physical line 3) is ignored
    lines[4] = lines[4] + ",extra"  # physical line 5
    p = tmp_path / "with_header.csv"
    p.write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(DataError, match=r"with_header\.csv, line 5: expected 40"):
        CriteoReader(str(p))
    r = CriteoReader(str(p), on_bad_line="skip")
    assert r.num_rows == 3 and r.data_lines == 4
    np.testing.assert_array_equal(r.keys, sample.keys[[0, 1, 3]])


def test_reader_batches_positions_and_restore(sample):
    r = CriteoReader(SAMPLE_CRITEO_CSV)
    sizes = [b.size for b in r.batches(64)]
    assert sizes == [64, 64, 64, 8] and r.state()["epoch"] == 1
    assert [b.size for b in r.batches(64, drop_remainder=True)] == [64, 64, 64]
    r = CriteoReader(SAMPLE_CRITEO_CSV)
    got = list(r.iter_batches(64, 4))
    assert [b.size for b in got] == [64] * 4
    np.testing.assert_array_equal(got[3].keys, np.vstack([sample.keys[192:], sample.keys[:56]]))
    st_ = r.state()
    assert (st_["epoch"], st_["offset"]) == (1, 56)
    fresh = CriteoReader(SAMPLE_CRITEO_CSV)
    fresh.restore(st_)
    nxt = next(fresh.iter_batches(64, 1))
    np.testing.assert_array_equal(nxt.keys, sample.keys[56:120])
    # restore onto two ranks: each continues at global line 56 -> offset 28 of its share
    r0 = CriteoReader(SAMPLE_CRITEO_CSV, rank=0, world_size=2)
    r0.restore(st_)
    assert (r0.epoch, r0.offset) == (1, 28)
    np.testing.assert_array_equal(next(r0.iter_batches(2, 1)).keys, sample.keys[[56, 58]])
    with pytest.raises(DataError):
        fresh.restore({"kind": "synthetic", "next_step": 3})


def test_reader_errors():
    with pytest.raises(ConfigError):
        CriteoReader(SAMPLE_CRITEO_CSV, rank=3, world_size=3)
    with pytest.raises(ConfigError):
        CriteoReader(SAMPLE_CRITEO_CSV, on_bad_line="ignore")
    with pytest.raises(DataError, match="does not exist"):
        CriteoReader(os.path.join(REPO, "no_such_file.csv"))


def _gzip_sample(tmp_path, name="sample.csv.gz"):
    import gzip as gzip_module
    with open(SAMPLE_CRITEO_CSV, "rb") as fh:
        text = fh.read()
    path = tmp_path / name
    with gzip_module.open(path, "wb") as fh:
        fh.write(text)
    return path, text


@pytest.mark.parametrize("on_bad_line", ["raise", "skip"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_damaged_gzip_names_the_file_and_the_line(tmp_path, on_bad_line, world_size):
    import zlib
    path, text = _gzip_sample(tmp_path)
    whole = CriteoReader(path, on_bad_line=on_bad_line)
    assert whole.num_rows == 200
    data = path.read_bytes()
    # truncated: every line decompressed before the cut is counted
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[:len(data) // 2])
    decompressed = zlib.decompressobj(31).decompress(data[:len(data) // 2])
    line = decompressed.count(b"\n") + 1
    assert 1 < line < text.count(b"\n")
    for rank in range(world_size):
        with pytest.raises(DataError) as err:
            CriteoReader(cut, rank=rank, world_size=world_size, on_bad_line=on_bad_line)
        assert f"{cut}, line {line}: damaged gzip file (truncated" in str(err.value)
    # a flipped byte in the compressed stream: zlib's or the CRC's error, at some line
    flipped = tmp_path / "flipped.csv.gz"
    corrupt = bytearray(data)
    corrupt[len(data) // 3] ^= 0x5A
    flipped.write_bytes(bytes(corrupt))
    with pytest.raises(DataError) as err:
        CriteoReader(flipped, world_size=world_size, on_bad_line=on_bad_line)
    message = str(err.value)
    assert message.startswith(f"{flipped}, line ") and "damaged gzip file (corrupt: " in message
    assert 1 <= int(message.split(", line ")[1].split(":")[0]) <= text.count(b"\n") + 1
    # not gzip at all (a .gz name over plain text)
    plain = tmp_path / "plain.csv.gz"
    plain.write_bytes(text)
    with pytest.raises(DataError, match=r"plain\.csv\.gz, line 1: damaged gzip file \(corrupt: Not a gzipped"):
        CriteoReader(plain, on_bad_line=on_bad_line)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_batch_shapes_and_determinism():
    ds = SyntheticCTR(seed=7)
    b = ds.batch(3, 256)
    assert isinstance(b, Batch) and b.size == 256
    assert b.dense.shape == (256, 13) and b.dense.dtype == np.float32
    assert b.keys.shape == (256, 26) and b.keys.dtype == np.int64
    assert b.labels.shape == (256,) and b.labels.dtype == np.float32
    assert set(np.unique(b.labels)) <= {0.0, 1.0}
    again = SyntheticCTR(seed=7).batch(3, 256)
    for a, c in ((b.dense, again.dense), (b.keys, again.keys), (b.labels, again.labels)):
        np.testing.assert_array_equal(a, c)
    other_rank = SyntheticCTR(seed=7, rank=1, world_size=2).batch(3, 256)
    other_step = ds.batch(4, 256)
    other_seed = SyntheticCTR(seed=8).batch(3, 256)
    for o in (other_rank, other_step, other_seed):
        assert not np.array_equal(o.dense, b.dense)
        assert not np.array_equal(o.keys, b.keys)
    # keys are integer_feature_keys(field, id) of ids in [0, vocab): id 0 is the most common
    top = [ref_int_key(f, 0) for f in range(26)]
    big = ds.batch(0, 20000)
    for f in (0, 13, 25):
        vals, counts = np.unique(big.keys[:, f], return_counts=True)
        assert vals[np.argmax(counts)] == top[f]


def test_synthetic_ids_are_zipf_skewed():
    ds = SyntheticCTR(seed=0, vocab_size=100_000, zipf_a=1.2)
    keys = ds.batch(0, 20000).keys[:, 0]
    _, counts = np.unique(keys, return_counts=True)
    assert counts.max() > 100 * np.median(counts)
    # frequency of id 0 against the bounded Zipf law 1 / sum_k k^-a
    p0 = 1.0 / sum(k ** -1.2 for k in range(1, 100_001))
    freq0 = np.mean(keys == ref_int_key(0, 0))
    assert abs(freq0 - p0) < 4 * math.sqrt(p0 * (1 - p0) / keys.size)
    ids_ok = SyntheticCTR(vocab_size=5).batch(0, 1000).keys
    assert np.unique(ids_ok[:, 2]).size <= 5


def test_synthetic_planted_model_is_calibrated_and_learnable():
    ds = SyntheticCTR(seed=0)
    auc = ds.bayes_auc(num_samples=100_000)
    assert 0.65 < auc < 0.9
    batches = [ds.batch(s, 512) for s in range(100)]
    labels = np.concatenate([b.labels for b in batches])
    assert 0.15 < labels.mean() < 0.4
    probs = np.concatenate([ds.true_probabilities(b) for b in batches])
    assert probs.min() > 0 and probs.max() < 1
    # the planted probabilities are calibrated: label rate per probability decile matches
    order = np.argsort(probs)
    for chunk in np.array_split(order, 5):
        p, y = probs[chunk].mean(), labels[chunk].mean()
        assert abs(p - y) < 4 * math.sqrt(p * (1 - p) / chunk.size) + 0.005
    # a plain logistic regression on one-hot keys (+ dense), 100 steps of 512, learns signal
    all_keys = np.concatenate([b.keys for b in batches] + [ds.batch(10_000, 4096).keys])
    uniq, inv = np.unique(all_keys, return_inverse=True)
    inv = inv.reshape(all_keys.shape)
    w, wd, bias, lr = np.zeros(uniq.size), np.zeros(13), 0.0, 0.05
    acc, accd = np.full(uniq.size, 1e-6), np.full(13, 1e-6)
    for s, b in enumerate(batches):
        idx = inv[s * 512:(s + 1) * 512]
        z = w[idx].sum(1) + b.dense @ wd + bias
        g = (1 / (1 + np.exp(-z)) - b.labels) / 512
        gw = np.bincount(idx.ravel(), weights=np.repeat(g, 26), minlength=uniq.size)
        acc += gw ** 2
        w -= lr * gw / np.sqrt(acc) * 10
        gd = b.dense.T @ g
        accd += gd ** 2
        wd -= lr * gd / np.sqrt(accd) * 10
        bias -= lr * g.sum()
    held = ds.batch(10_000, 4096)
    idx = inv[100 * 512:]
    learned = roc_auc(held.labels, w[idx].sum(1) + held.dense @ wd)
    assert 0.6 < learned <= auc + 0.02
    # ...and the planted probabilities do better than the learned model on the same data
    assert roc_auc(held.labels, ds.true_probabilities(held)) > learned


def test_synthetic_iter_batches_state_restore_and_describe():
    ds = SyntheticCTR(seed=3, num_fields=4, num_dense=2, vocab_size=[10, 20, 30, 40])
    got = list(ds.iter_batches(32, 3))
    assert len(got) == 3 and ds.state()["next_step"] == 3
    np.testing.assert_array_equal(got[2].keys, ds.batch(2, 32).keys)
    other = SyntheticCTR(seed=3, num_fields=4, num_dense=2, vocab_size=[10, 20, 30, 40])
    other.restore(ds.state())
    np.testing.assert_array_equal(next(other.iter_batches(32, 1)).keys, ds.batch(3, 32).keys)
    d = ds.describe()
    assert d["num_fields"] == 4 and d["vocab_size"] == [10, 20, 30, 40] and d["seed"] == 3
    b = ds.batch(0, 2000)
    for f, v in enumerate([10, 20, 30, 40]):
        assert set(b.keys[:, f].tolist()) <= {ref_int_key(f, i) for i in range(v)}
    with pytest.raises(ConfigError):
        SyntheticCTR(rank=2, world_size=2)
    with pytest.raises(ConfigError):
        SyntheticCTR(vocab_size=[10, 20])
    with pytest.raises(DataError):
        ds.restore({"kind": "criteo", "epoch": 0})


def _reference_synthetic_batch(ds, step, n):
    """The documented generator formulas in plain numpy (the C kernels are not called):
    the same PCG64 draws, the alias pick, the integer key formula and the planted logit (the
    pairwise FM sum written out pair by pair). The alias table itself is checked against the
    Zipf law by test_synthetic_ids_are_zipf_skewed."""
    from tests.reference import mix64_array
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([ds.seed, ds.rank, step])))
    keys = np.empty((n, ds.num_fields), dtype=np.int64)
    for vocab in sorted(set(ds.vocab_sizes)):
        cols = np.array([f for f, v in enumerate(ds.vocab_sizes) if v == vocab])
        prob, alias = ds._groups[[g[0] for g in ds._groups].index(vocab)][2:]
        candidates = rng.integers(0, vocab, size=(n, cols.size), dtype=alias.dtype)
        coins = rng.random((n, cols.size), dtype=np.float32)
        ids = np.where(coins < prob[candidates], candidates, alias[candidates]).astype(np.uint64)
        offsets = np.array([((int(f) << 48) + 0x9E3779B97F4A7C15) & M64 for f in cols], dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys[:, cols] = mix64_array(ids + offsets[None, :]).view(np.int64)
    dense = rng.standard_normal((n, ds.num_dense), dtype=np.float32)
    label_u = rng.random(n)
    # planted logit: bias + field term (16-bit chunks of mix64(key ^ salt_w)) + dense + FM term
    f = ds.num_fields
    h = mix64_array(keys.view(np.uint64) ^ np.uint64(ds._salt_w))
    chunks = sum((h >> np.uint64(16 * c)) & np.uint64(0xFFFF) for c in range(4))
    z = chunks.sum(axis=1).astype(np.float64)
    logit = ds.bias + (z / 65536.0 - 2.0 * f) * math.sqrt(3.0) * ds.field_scale / math.sqrt(f)
    logit = logit + dense.astype(np.float64) @ ds.dense_weights.astype(np.float64)
    if ds._v_scale > 0:
        c = ds._v_scale
        v = np.stack([((mix64_array(keys.view(np.uint64) ^ np.uint64(ds._salt_v[j // 4]))
                        >> np.uint64(16 * (j % 4))) & np.uint64(0xFFFF)).astype(np.float64)
                      * (2 * c / 65536.0) - c for j in range(ds.planted_dim)], axis=2)
        pair_sum = np.zeros(n)
        for a in range(f):
            for b in range(a + 1, f):
                pair_sum += (v[:, a] * v[:, b]).sum(axis=1)
        logit = logit + pair_sum
    probability = 1.0 / (1.0 + np.exp(-logit))
    return keys, dense, probability, (label_u < probability).astype(np.float32)


@pytest.mark.parametrize("options", [dict(seed=0), dict(seed=5, planted_dim=7, num_dense=3),
                                     dict(seed=3, num_fields=4, num_dense=2,
                                          vocab_size=[10, 20, 30, 40]),
                                     dict(seed=1, planted_dim=0, rank=1, world_size=2)])
def test_synthetic_batch_matches_the_documented_formulas(options):
    ds = SyntheticCTR(**options)
    for step in (0, 7):
        got = ds.batch(step, 512)
        keys, dense, probability, labels = _reference_synthetic_batch(ds, step, 512)
        np.testing.assert_array_equal(got.keys, keys)
        np.testing.assert_array_equal(got.dense, dense)
        np.testing.assert_allclose(ds.true_probabilities(got), probability, rtol=1e-12)
        np.testing.assert_array_equal(got.labels, labels)


def test_synthetic_rejects_a_planted_dim_above_64():
    with pytest.raises(ConfigError, match="planted_dim"):
        SyntheticCTR(planted_dim=65)


# ----------------------------------------------------------------------------- roc_auc
def test_roc_auc_hand_examples():
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: (0.5 vs 0.5)=.5, others win -> 3.5/4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([1, 0, 1, 0, 1], [3, 3, 3, 3, 3]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [1, 2, 3]) == 1.0
    assert roc_auc([True, False], [0.0, 1.0]) == 0.0
    # ties inside the positives only do not matter: pos {2,2} vs neg {1, 3} -> 2/4
    assert roc_auc([1, 1, 0, 0], [2, 2, 1, 3]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(DataError):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError):
        roc_auc([0, 1], [0.1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=40))
def test_roc_auc_matches_brute_force(pairs):
    labels = [p[0] for p in pairs]
    scores = [float(p[1]) for p in pairs]
    if len(set(labels)) < 2:
        assert math.isnan(roc_auc(labels, scores))
    else:
        assert roc_auc(labels, scores) == pytest.approx(brute_auc(labels, scores))


# ----------------------------------------------------------------------------- factory
def test_make_dataset():
    syn = make_dataset("synthetic", rank=1, world_size=2, seed=5, num_fields=3)
    assert isinstance(syn, SyntheticCTR) and syn.rank == 1 and syn.num_fields == 3
    rd = make_dataset(SAMPLE_CRITEO_CSV, rank=0, world_size=2, seed=0)
    assert isinstance(rd, CriteoReader) and rd.num_rows == 100
    assert make_dataset("sample", rank=0, world_size=1, seed=0).num_rows == 200
    with pytest.raises(DataError, match="no_such"):
        make_dataset(os.path.join(REPO, "no_such.tsv"), rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError):
        make_dataset(SAMPLE_CRITEO_CSV, rank=0, world_size=1, seed=0, zipf_a=1.1)
    # both kinds share iter_batches / state / restore
    for ds in (syn, rd):
        out = list(ds.iter_batches(8, 2))
        assert len(out) == 2 and all(b.size == 8 for b in out)
        assert isinstance(ds.state(), dict)


def test_package_imports_no_heavy_modules():
    # statically: no module of hybridps.data imports TensorFlow, mpi4py or Horovod; the one
    # exception is the TFRecord reader, which parses records with TensorFlow inside its
    # functions only, so importing hybridps.data never loads it
    # (importing hybridps.data at run time also imports hybridps/__init__, which is not ours)
    sources = glob.glob(os.path.join(REPO, "hybridps", "data", "*.py"))
    assert len(sources) >= 6
    for src in sources:
        tree = ast.parse(open(src).read())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                lazy_tf = src.endswith("tfrecord.py") and id(node) not in top_level and name == "tensorflow"
                # the Redis client, only inside the Redis stream source
                lazy_redis = src.endswith("stream.py") and id(node) not in top_level and name == "redis"
                if lazy_tf or lazy_redis:
                    continue
                assert name.split(".")[0] not in ("tensorflow", "mpi4py", "horovod", "keras"), (src, name)
                assert name.split(".")[0] in ("__future__", "hybridps", "numpy", "os", "math",
                                              "gzip", "time", "typing", "dataclasses",
                                              "functools", "hashlib", "operator", "re", "io",
                                              "glob", "pyarrow", "struct", "urllib", "sys", "json"), (src, name)


def test_batch_validates_shapes():
    with pytest.raises(DataError):
        Batch(dense=np.zeros((3, 2)), keys=np.zeros((4, 5), np.int64), labels=np.zeros(3))
    b = Batch(dense=np.zeros((3, 2)), keys=np.zeros((3, 5), np.int64), labels=np.zeros(3))
    assert b.size == 3 and b.dense.dtype == np.float32



def test_the_criteo_reader_serves_the_criteo_preset_schema_and_refuses_another():
    """A CriteoReader's schema is the Criteo preset (label, I1..I13, C1..C26, the columns of
    the file) unless the run gives its own preset; a schema of other features is refused."""
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    reader = CriteoReader(SAMPLE_CRITEO_CSV)
    assert reader.schema.preset == "criteo" and reader.schema.label == "label"
    assert [f.column for f in reader.schema.sparse] == [f"C{i}" for i in range(1, 27)]
    assert [f.column for f in reader.schema.dense] == [f"I{i}" for i in range(1, 14)]
    per_field = build_schema(make_config(overrides={"table_layout": "per_field"}), 26, 13)
    assert CriteoReader(SAMPLE_CRITEO_CSV, schema=per_field).schema is per_field
    for other in (build_schema(make_config(), 3, 13),
                  build_schema(make_config(overrides={"features": {
                      "label": "label", "sparse": [{"name": "user", "table": "user"}],
                      "tables": {"user": {"dim": 4}}}}))):
        with pytest.raises(ConfigError, match="Criteo layout"):
            CriteoReader(SAMPLE_CRITEO_CSV, schema=other)
