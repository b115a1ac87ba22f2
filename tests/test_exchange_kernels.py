"""Unit tests of the per-step exchange kernels (hybridps._kernels via hybridps.sparse):
unique keys and their inverse, the send order of the fused exchange (``unique_route`` and the
whole plan of a step against a numpy reference plan), and the owner's staleness histogram. Expected values come from numpy (np.unique, a sort) and the splitmix64 reference in
tests/reference.py, never from the kernels themselves.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridps._kernels import count_staleness
from hybridps.config import make_config
from hybridps.data.batch import Batch
from hybridps.schema import build_schema
from hybridps.sparse.layout import SparseLayout
from hybridps.sparse.plan import plan_batch
from hybridps.sparse.routing import unique_inverse, unique_route
from tests.reference import mix64_array, send_order_index

KEYS = st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 30), min_size=0, max_size=300)


def reference_owner(keys, world, buckets):
    return ((mix64_array(np.asarray(keys, dtype=np.int64)) % np.uint64(buckets))
            % np.uint64(world)).astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(KEYS)
def test_unique_inverse_matches_numpy(values):
    keys = np.array(values, dtype=np.int64)
    uniq, inverse = unique_inverse(keys)
    assert sorted(uniq.tolist()) == np.unique(keys).tolist()        # each distinct key once
    np.testing.assert_array_equal(uniq[inverse], keys)
    if len(keys):                                                   # first-occurrence order
        _, first = np.unique(keys, return_index=True)
        assert uniq.tolist() == keys[np.sort(first)].tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.sampled_from([1, 2, 3, 4]),
       st.sampled_from(["shared", "per_field", "pairs"]), st.integers(0, 2**31))
def test_route_unique_keys_gives_the_send_buffer_and_its_inverse(batch, fields, world, layout, seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 12, size=(batch, fields)) * 7919 + rng.integers(0, 2, size=(batch, fields)) * 2**40
    groups = {"shared": [list(range(fields))], "per_field": [[f] for f in range(fields)],
              "pairs": [list(range(fields))[i:i + 2] for i in range(0, fields, 2)]}[layout]
    schema = build_schema(make_config(overrides={"num_fields": fields, "table_groups": groups}))
    batch_of = Batch(dense=np.zeros((batch, 0)), keys=keys, labels=np.zeros(batch))
    plan = plan_batch(SparseLayout(schema), batch_of, world, 4096)
    send_keys, counts = plan.unique_keys, plan.send_counts
    assert counts.shape == (world, len(groups)) and counts.sum() == len(send_keys)
    assert all(index.dtype == np.int32 for index in plan.feature_inputs)   # the TF step's indices
    table_of_field = {f: t for t, g in enumerate(groups) for f in g}
    inverse = send_order_index(send_keys, counts, keys, [table_of_field[f] for f in range(fields)])
    assert inverse.shape == keys.shape
    np.testing.assert_array_equal(send_keys[inverse], keys)           # every (sample, field)
    start = 0
    for rank in range(world):                                         # grouped by owner, then table
        for table in range(len(groups)):
            block = send_keys[start:start + counts[rank, table]]
            assert (reference_owner(block, world, 4096) == rank).all()
            fields_of_table = [f for f in range(fields) if table_of_field[f] == table]
            expected = set(np.unique(keys[:, fields_of_table]).tolist())
            owned = {k for k in expected if reference_owner([k], world, 4096)[0] == rank}
            assert sorted(block.tolist()) == sorted(owned)            # unique within the table
            start += counts[rank, table]
    for b in range(batch):                                            # a field reads its own table's entry
        for f in range(fields):
            t = table_of_field[f]
            rank = reference_owner([keys[b, f]], world, 4096)[0]
            lo = counts[:rank].sum() + counts[rank, :t].sum()
            assert lo <= inverse[b, f] < lo + counts[rank, t], (b, f)


def reference_route(parts, world, buckets):
    """(send keys, counts, each key's send position) in numpy: per table its distinct keys in
    first-occurrence order, then blocks by (owner, table), a dictionary for the positions."""
    blocks = {}
    for t, keys in enumerate(parts):
        keys = np.asarray(keys, dtype=np.int64)
        _, first = np.unique(keys, return_index=True)
        distinct = keys[np.sort(first)]
        owner = reference_owner(distinct, world, buckets)
        for r in range(world):
            blocks[r, t] = distinct[owner == r]
    order = [blocks[r, t] for r in range(world) for t in range(len(parts))]
    send_keys = np.concatenate(order) if order else np.zeros(0, np.int64)
    counts = np.array([[len(blocks[r, t]) for t in range(len(parts))] for r in range(world)])
    position, start = {}, 0
    for r in range(world):
        for t in range(len(parts)):
            for j, key in enumerate(blocks[r, t].tolist()):
                position[t, key] = start + j
            start += len(blocks[r, t])
    index = [position[t, key] for t, keys in enumerate(parts) for key in np.asarray(keys).tolist()]
    return send_keys, counts, np.array(index, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(st.lists(KEYS, min_size=1, max_size=4), st.sampled_from([1, 2, 3, 5]))
def test_unique_route_equals_a_numpy_reference(tables, world):
    parts = [np.array(values, dtype=np.int64) for values in tables]
    send_keys, counts, index = unique_route(parts, world, 4096)
    expected_keys, expected_counts, expected_index = reference_route(parts, world, 4096)
    assert send_keys.dtype == np.int64 and counts.dtype == np.int64 and index.dtype == np.int32
    np.testing.assert_array_equal(send_keys, expected_keys)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(index, expected_index)


LIST_FEATURES = {
    "label": "label",
    "sparse": [
        {"name": "user", "table": "user"},
        {"name": "genres", "table": "genre", "pooling": "mean"},
        {"name": "movie", "table": "movie"},
        {"name": "tags", "table": "genre", "pooling": "sum"},
        {"name": "friends", "table": "user", "pooling": "sqrtn"},
        {"name": "city", "table": "city"},
    ],
    # dims 8, 4, 8, 4: two dim groups whose TF order (user, movie, genre, city) is not the
    # table order
    "tables": {"user": {"dim": 8}, "genre": {"dim": 4}, "movie": {"dim": 8}, "city": {"dim": 4}},
}


def reference_plan(schema, batch, world, buckets):
    """The TF step's inputs of a step in numpy: rows in TF order (dim group, table, owner),
    each key's row found by a dictionary; returns (send keys, counts, group rows, inputs)."""
    layout = SparseLayout(schema)
    parts = []
    for t in range(len(schema.tables)):
        single = batch.keys[:, layout.single_columns[t]].reshape(-1)
        parts.append(np.concatenate([single] + [batch.lists[n][0] for n in layout.list_features[t]]))
    send_keys, counts, _ = reference_route(parts, world, buckets)
    row_in_group, group_rows = {}, []
    starts = np.concatenate([[0], np.cumsum(counts.ravel())])
    for _, tables in layout.groups:
        row = 0
        for t in tables:
            for r in range(world):
                b = r * len(schema.tables) + t
                for key in send_keys[starts[b]:starts[b + 1]].tolist():
                    row_in_group[t, key] = row
                    row += 1
        group_rows.append(row)
    inputs = []
    for columns in layout.group_columns:
        if columns:
            inputs.append(np.array([[row_in_group[layout.column_table[c], int(batch.keys[b, c])]
                                     for c in columns] for b in range(batch.size)]))
    for name, t, _, _ in layout.list_specs:
        values, lengths = batch.lists[name]
        inputs.append(np.array([row_in_group[t, v] for v in values.tolist()], dtype=np.int64))
        inputs.append(lengths)
    return send_keys, counts, group_rows, inputs


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.sampled_from([1, 2, 3, 4]),
       st.sampled_from(["shared", "per_field", "pairs", "lists"]), st.integers(0, 2**31))
def test_plan_batch_equals_a_numpy_reference_plan(size, world, layout_name, seed):
    """Every array of the plan, exactly: the send keys and counts, the rows per dim group, each
    index matrix and list's ids, on keys with many duplicates (a hot head and a long tail)."""
    rng = np.random.default_rng(seed)

    def hot_or_tail(shape):
        return np.where(rng.random(shape) < 0.6, rng.integers(0, 5, shape),
                        rng.integers(0, 2**62, shape)).astype(np.int64)

    if layout_name == "lists":
        schema = build_schema(make_config(overrides={"features": LIST_FEATURES}))
        lists = {}
        for name in ("genres", "tags", "friends"):
            lengths = rng.integers(0, 4, size=size).astype(np.int32)
            lists[name] = (hot_or_tail(int(lengths.sum())), lengths)
        batch = Batch(dense=np.zeros((size, 0)), keys=hot_or_tail((size, 3)), labels=np.zeros(size),
                      lists=lists)
    else:
        fields = 5
        groups = {"shared": [list(range(fields))], "per_field": [[f] for f in range(fields)],
                  "pairs": [[0, 1], [2, 3], [4]]}[layout_name]
        schema = build_schema(make_config(overrides={"num_fields": fields, "table_groups": groups}))
        batch = Batch(dense=np.zeros((size, 0)), keys=hot_or_tail((size, fields)), labels=np.zeros(size))
    plan = plan_batch(SparseLayout(schema), batch, world, 4096)
    send_keys, counts, group_rows, inputs = reference_plan(schema, batch, world, 4096)
    np.testing.assert_array_equal(plan.unique_keys, send_keys)
    np.testing.assert_array_equal(plan.send_counts, counts)
    np.testing.assert_array_equal(plan.group_rows, group_rows)
    assert len(plan.feature_inputs) == len(inputs)
    for got, expected in zip(plan.feature_inputs, inputs):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def reference_staleness(versions, step, applied_through):
    current = np.maximum(versions, applied_through)
    stale = np.maximum(step - 1 - current, 0)
    stale[versions >= step] = 0
    return stale


@pytest.mark.parametrize("step, applied", [(10, 8), (10, -1), (3, 5), (400, 2)])
def test_count_staleness_matches_the_formula(step, applied):
    versions = np.array([-1, 0, 1, 2, 5, 8, 9, 10, 11, 150, 399], dtype=np.int64)
    histogram = np.zeros(256, dtype=np.int64)
    histogram[0] = 7                                    # the kernel adds to what is there
    worst = count_staleness(versions, step, applied, histogram)
    stale = reference_staleness(versions, step, applied)
    expected = np.bincount(np.minimum(stale, 255), minlength=256)
    expected[0] += 7
    np.testing.assert_array_equal(histogram, expected)
    assert worst == stale.max()


def test_text_value_ids_equal_the_python_text_id_on_every_kind_of_value():
    """The C text ids (BLAKE2b-64 with the value personalization, canonical integers, empty as
    missing) against hybridps.data.hashing.text_id, the Python reference built on hashlib:
    integer edge cases, non-ASCII text, and lengths around BLAKE2b's 128-byte blocks."""
    import random
    from hybridps._kernels import text_value_ids
    from hybridps.data.hashing import VALUE_PERSON, text_id
    rng = random.Random(1)
    values = ["", "0", "-0", "00", "-", "7", "-7", "0123", "1e5", " 1", "\u00b2", "\u00e9t\u00e9",
              "9223372036854775807", "9223372036854775808", "-9223372036854775808",
              "-9223372036854775809", "12345678901234567890"] + ["x" * n for n in (1, 127, 128, 129, 256, 300)]
    values += ["".join(rng.choice("ab09-\u00e9 ") for _ in range(rng.randint(0, 200))) for _ in range(500)]
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    got = text_value_ids(offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8), VALUE_PERSON)
    np.testing.assert_array_equal(got, np.array([text_id(v) for v in values], dtype=np.int64))


def test_text_columns_from_arrow_hash_like_the_python_reference_also_sliced_and_with_nulls():
    """Plain, large, sliced and dictionary-encoded text columns (as the Parquet reader hands
    them over, also with several chunks of different dictionaries), through a cold and then a
    warm cache: every id equals the Python text_id."""
    import pyarrow as pa
    from hybridps._kernels import TextIdCache
    from hybridps.data.columns import _combined, _text_column_ids
    from hybridps.data.hashing import VALUE_PERSON, text_id
    values = ["u1", None, "42", "", "u1", "caf\u00e9", "x" * 200, None, "-3"]
    expected = [text_id(v) for v in values]
    cache = TextIdCache(VALUE_PERSON)
    arrays = (pa.array(values), pa.array(values, pa.large_string()), pa.array(["pad"] + values).slice(1),
              pa.array(values).dictionary_encode(), pa.array(values, pa.binary()),
              _combined(pa.chunked_array([pa.array(values[:4]).dictionary_encode(),
                                          pa.array(values[4:]).dictionary_encode()])))
    for _warm in range(2):
        for array in arrays:
            np.testing.assert_array_equal(_text_column_ids(array, cache), expected)
    assert cache.hits > 0 and len(cache) == len({v for v in values if v})


def test_text_id_cache_equals_text_value_ids_when_full_and_when_probing_long_chains():
    """The cache against the uncached kernel (itself held to hashlib above) on a Zipf stream of
    values in many calls: with room for everything, with room for only 50 values (it must keep
    computing the rest) and with a byte budget that refuses long values; repeats are hits."""
    import random
    from hybridps._kernels import TextIdCache, text_value_ids
    from hybridps.data.hashing import VALUE_PERSON
    rng = random.Random(3)
    vocabulary = [str(i) if i % 7 == 0 else f"v{i}-" + "y" * (i % 150) for i in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(vocabulary))]
    caches = [TextIdCache(VALUE_PERSON), TextIdCache(VALUE_PERSON, max_values=50),
              TextIdCache(VALUE_PERSON, max_bytes=300)]
    seen = set()
    for _call in range(30):
        batch = rng.choices(vocabulary, weights, k=400) + [""]
        encoded = [v.encode() for v in batch]
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        expected = text_value_ids(offsets, data, VALUE_PERSON)
        for cache in caches:
            np.testing.assert_array_equal(cache.ids(offsets, data), expected)
        seen.update(v for v in batch if v)
    assert len(caches[0]) == len(seen)               # every distinct value remembered once
    assert caches[0].misses == len(seen)             # ... and computed once
    assert len(caches[1]) == 50 and caches[1].misses > len(seen)
    assert caches[2].misses > len(seen)