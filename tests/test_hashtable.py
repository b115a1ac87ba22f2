"""Unit tests of the Cython embedding hash table (hybridps._hashtable).

Every expected value comes from an independent reference written here: a numpy port of the
key-seeded initializer and of each optimizer formula stated in cython/hashtable.pyx, and a
plain Python dict model of the table's key set, hits and versions.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hybridps._hashtable import EmbeddingHashTable, initial_rows, mix64
from hybridps.errors import ConfigError, NonFiniteGradientError, TableFullError, TableInputError
from tests.reference import mix64_array as np_mix64, mix64_int as py_mix64

# ---------------------------------------------------------------------------------------------
# Independent reference implementations
# ---------------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1
INIT_SALT = 0x2545F4914F6CDD1D
SLOT_SALT = 0x5851F42D4C957F2D
GOLDEN = 0x9E3779B97F4A7C15
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

ADVERSARIAL_KEYS = (
    [0, -1, 1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, -(2**62), 2**62]
    + [i * 2**40 for i in range(-4, 5) if i]
    + [i * 2**32 for i in range(1, 9)]
    + [i * 2**48 for i in range(1, 5)]
)

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])





def ref_ziggurat_tables():
    """The 256-layer ziggurat tables from r and v by the recursion the docstring names."""
    r, v, m = 3.6541528853610088, 4.92867323399e-3, 2.0 ** 52
    k, w, f = [0] * 256, [0.0] * 256, [0.0] * 256
    q = v / math.exp(-0.5 * r * r)
    k[0], w[0], w[255], f[0], f[255] = int(r / q * m), q / m, r / m, 1.0, math.exp(-0.5 * r * r)
    dn = tn = r
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(v / dn + math.exp(-0.5 * dn * dn)))
        k[i + 1], tn = int(dn / tn * m), dn
        f[i], w[i] = math.exp(-0.5 * dn * dn), dn / m
    return k, w, f


ZIG_K, ZIG_W, ZIG_F = ref_ziggurat_tables()


ZIG_PATHS = {"fast": 0, "tail": 0, "wedge": 0}   # how often each ziggurat branch ran


def ref_ziggurat_row(base, dim):
    """dim standard normals from the stream u_k = mix64(base + (k + 1) * GOLDEN), in plain
    Python integers and floats (one element at a time, as the docstring describes)."""
    counter = [0]

    def draw():
        counter[0] += 1
        return py_mix64((base + counter[0] * GOLDEN) & MASK64)

    def unit():
        return (draw() >> 11) * 2.0 ** -53

    out = []
    while len(out) < dim:
        u = draw()
        layer, magnitude = u & 255, (u >> 9) & (2 ** 52 - 1)
        x = magnitude * ZIG_W[layer] * (-1.0 if (u >> 8) & 1 else 1.0)
        if magnitude < ZIG_K[layer]:
            ZIG_PATHS["fast"] += 1
            out.append(x)
        elif layer == 0:
            ZIG_PATHS["tail"] += 1
            while True:
                xx = -math.log1p(-unit()) / 3.6541528853610088
                yy = -math.log1p(-unit())
                if yy + yy > xx * xx:
                    out.append(-(3.6541528853610088 + xx) if (magnitude >> 8) & 1
                               else 3.6541528853610088 + xx)
                    break
        else:
            ZIG_PATHS["wedge"] += 1
            if ZIG_F[layer] + unit() * (ZIG_F[layer - 1] - ZIG_F[layer]) < math.exp(-0.5 * x * x):
                out.append(x)
    return out


def ref_initial_rows(keys, dim, kind="normal", seed=0, table_id=0, a=0.0, b=0.01):
    """Numpy / plain Python port of the docstring's counter-based initializer (float64, cast
    to float32)."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    n = keys.shape[0]
    if kind == "zeros":
        return np.zeros((n, dim), dtype=np.float32)
    table_mix = py_mix64((table_id + INIT_SALT) & MASK64)
    seed_mix = py_mix64((seed & MASK64) ^ table_mix)
    base = np_mix64(np.uint64(seed_mix) ^ keys.view(np.uint64))
    out = np.empty((n, dim), dtype=np.float64)
    if kind == "uniform":
        counters = np.array([((j + 1) * GOLDEN) & MASK64 for j in range(dim)], dtype=np.uint64)
        u = np_mix64(base[:, None] + counters[None, :])               # (n, dim), wraps mod 2**64
        unit = (u >> np.uint64(11)).astype(np.float64) * 2.0**-53     # top 53 bits -> [0, 1)
        out[:] = a + (b - a) * unit
    elif kind == "normal":
        for i in range(n):
            out[i] = a + b * np.array(ref_ziggurat_row(int(base[i]), dim))
    else:
        raise AssertionError(kind)
    return out.astype(np.float32)


def f32(x):
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def ref_update(optimizer, w, s, g, t, hp):
    """One lazy update of one row per the docstring formulas; state stored as float32.

    w: (dim,) value; s: (n_slots, dim) slots; g: summed gradient; t: this row's update number
    (1 for its first update). Returns new (w, s) as float64 arrays holding float32 values.
    """
    w = w.astype(np.float64)
    s = s.astype(np.float64).copy()
    g = g.astype(np.float64)
    lr = hp["learning_rate"]
    if optimizer == "sgd":
        w = w - lr * g
    elif optimizer == "adagrad":
        s[0] = f32(s[0] + g * g)
        w = w - lr * g / (np.sqrt(s[0]) + hp["epsilon"])
    elif optimizer == "adam":
        b1, b2, eps = hp["beta1"], hp["beta2"], hp["epsilon"]
        m = b1 * s[0] + (1 - b1) * g
        v = b2 * s[1] + (1 - b2) * g * g
        s[0], s[1] = f32(m), f32(v)
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    elif optimizer == "ftrl":
        l1, l2 = hp["l1"], hp["l2"]
        n_old = s[0]
        n_new = n_old + g * g
        z = s[1] + g - (np.sqrt(n_new) - np.sqrt(n_old)) / lr * w
        s[0], s[1] = f32(n_new), f32(z)
        w = np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / (np.sqrt(n_new) / lr + 2 * l2), 0.0)
    else:
        raise AssertionError(optimizer)
    return f32(w), s


def initial_slots(optimizer, dim, hp):
    if optimizer == "sgd":
        return np.zeros((0, dim))
    if optimizer == "adagrad":
        return np.full((1, dim), f32(hp.get("initial_accumulator", 0.1)))
    if optimizer == "adam":
        return np.zeros((2, dim))
    return np.stack([np.full(dim, f32(hp.get("initial_accumulator", 0.1))), np.zeros(dim)])


def by_key(export):
    """Export dict re-ordered by key, as {name: array}."""
    order = np.argsort(export["keys"], kind="stable")
    out = {name: export[name][order] for name in
           ("keys", "hits", "last_update_step", "update_count") if name in export}
    for name in ("values", "slots"):
        if name in export:
            out[name] = export[name][order]
    corder = np.argsort(export["candidate_keys"], kind="stable")
    out["candidate_keys"] = export["candidate_keys"][corder]
    out["candidate_hits"] = export["candidate_hits"][corder]
    return out


def rows_of(table, keys):
    """Current rows of keys via find + export (does not insert or count hits)."""
    idx = table.find(np.asarray(keys, dtype=np.int64))
    assert (idx >= 0).all()
    return table.export()["values"][idx]


def assert_load_ok(table):
    cap = table.capacity
    assert cap >= 16 and cap & (cap - 1) == 0, cap
    assert table.size + table.num_candidates <= int(cap * 0.7)     # the maximum load


def home_slot(key, capacity):
    """Start slot per the docstring: high bits of mix64(key ^ SLOT_SALT)."""
    bits = capacity.bit_length() - 1
    return py_mix64((key & MASK64) ^ SLOT_SALT) >> (64 - bits)


# ---------------------------------------------------------------------------------------------
# mix64 and the reference itself
# ---------------------------------------------------------------------------------------------

def test_mix64_matches_published_splitmix64_vectors():
    # splitmix64 reference generator (Vigna): state += GOLDEN, output = mix(state).
    state, expected = 1234567, [6457827717110365317, 3203168211198807973, 9817491932198370423]
    keys = []
    for _ in expected:
        state = (state + GOLDEN) & MASK64
        keys.append(state - 2**64 if state >= 2**63 else state)
    assert [int(x) for x in mix64(np.array(keys, dtype=np.int64))] == expected
    assert int(mix64(np.array([GOLDEN - 2**64]))[0]) == 0xE220A8397B1DCDAF
    assert py_mix64(GOLDEN) == 0xE220A8397B1DCDAF


def test_mix64_on_adversarial_keys_matches_reference():
    keys = np.array(ADVERSARIAL_KEYS, dtype=np.int64)
    got = mix64(keys)
    assert got.dtype == np.uint64
    assert [int(x) for x in got] == [py_mix64(int(k)) for k in keys]
    np.testing.assert_array_equal(got, np_mix64(keys.view(np.uint64)))


# ---------------------------------------------------------------------------------------------
# 1. Property tests against a dict model
# ---------------------------------------------------------------------------------------------

key_strategy = st.one_of(
    st.sampled_from(ADVERSARIAL_KEYS),
    st.integers(-12, 12),
    st.integers(INT64_MIN, INT64_MAX),
)
grad_entry = st.integers(-16, 16).map(lambda x: x / 8.0)     # exact in float32, exact sums

SM_CFG = dict(dim=3, optimizer="sgd", learning_rate=0.5, initializer="normal", init_mean=0.25,
              init_std=1.5, seed=0xDEADBEEFCAFEF00D, table_id=-5)


class HashTableMachine(RuleBasedStateMachine):
    """Random sequences of lookup/find/apply/erase/bulk insert/export-import vs a dict model."""

    def __init__(self):
        super().__init__()
        self.table = EmbeddingHashTable(capacity_hint=1, **SM_CFG)
        self.rows, self.hits, self.last, self.count = {}, {}, {}, {}
        self.gone = set()
        self.step = 0
        self.dropped_missing = 0

    def _new_rows(self, keys):
        return ref_initial_rows(keys, SM_CFG["dim"], "normal", SM_CFG["seed"],
                                SM_CFG["table_id"], SM_CFG["init_mean"], SM_CFG["init_std"])

    def _insert_model(self, keys, step):
        new = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if new:
            for k, r in zip(new, self._new_rows(new)):
                self.rows[k] = r.astype(np.float64)
                self.hits[k], self.last[k], self.count[k] = 0, step, 0
        for k in keys:
            self.hits[k] += 1

    @rule(keys=st.lists(key_strategy, max_size=12))
    def lookup(self, keys):
        self.step += 1
        karr = np.array(keys, dtype=np.int64)
        versions = np.empty(len(keys), dtype=np.int64)
        out = self.table.lookup_or_insert(karr, step=self.step, versions=versions)
        self._insert_model(keys, self.step)
        assert out.shape == (len(keys), SM_CFG["dim"]) and out.dtype == np.float32
        if keys:
            expected = np.stack([self.rows[k] for k in keys])
            np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
            assert list(versions) == [self.last[k] for k in keys]

    @rule(base=st.integers(0, 7), n=st.integers(1, 150), shift=st.sampled_from([32, 40]))
    def bulk_insert(self, base, n, shift):
        # Keys equal in their low `shift` bits, to stress the slot hash and growth.
        keys = [(base * 1000 + i) << shift for i in range(n)]
        self.step += 1
        size = self.table.insert(np.array(keys, dtype=np.int64), step=self.step)
        self._insert_model(keys, self.step)
        assert size == len(self.rows)

    @rule(keys=st.lists(key_strategy, max_size=8))
    def find(self, keys):
        idx = self.table.find(np.array(keys, dtype=np.int64))
        exported = self.table.export()
        for k, i in zip(keys, idx):
            if k in self.rows:
                assert i >= 0 and exported["keys"][i] == k
                np.testing.assert_allclose(exported["values"][i], self.rows[k], rtol=1e-6, atol=1e-6)
            else:
                assert i == -1

    @rule(data=st.data(), keys=st.lists(key_strategy, max_size=10))
    def apply_sgd(self, data, keys):
        grads = np.array(data.draw(st.lists(st.lists(grad_entry, min_size=3, max_size=3),
                                            min_size=len(keys), max_size=len(keys))),
                         dtype=np.float32).reshape(len(keys), 3)
        self.step += 1
        touched = self.table.apply_gradients(np.array(keys, dtype=np.int64), grads, step=self.step)
        summed = {}
        for k, g in zip(keys, grads):
            if k in self.rows:
                summed[k] = summed.get(k, 0.0) + g.astype(np.float64)
            else:
                self.dropped_missing += 1
        for k, g in summed.items():
            self.rows[k] = f32(self.rows[k] - SM_CFG["learning_rate"] * g)
            self.last[k] = self.step
            self.count[k] += 1
        assert touched == len(summed)

    @precondition(lambda self: len(self.rows) > 0)
    @rule(data=st.data())
    def apply_sgd_existing(self, data):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.rows)), min_size=1, max_size=10))
        self.apply_sgd(data, keys)

    @rule(keys=st.lists(key_strategy, max_size=8))
    def erase(self, keys):
        removed = self.table.erase(np.array(keys, dtype=np.int64))
        present = {k for k in keys if k in self.rows}
        assert removed == len(present)
        for k in present:
            del self.rows[k], self.hits[k], self.last[k], self.count[k]
            self.gone.add(k)

    @precondition(lambda self: len(self.rows) > 0)
    @rule(data=st.data())
    def erase_existing(self, data):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.rows)), min_size=1, max_size=20))
        self.erase(keys)

    @rule(capacity_hint=st.sampled_from([0, 1, 16, 1000]))
    def export_import_into_fresh_table(self, capacity_hint):
        ex = self.table.export()
        fresh = EmbeddingHashTable(capacity_hint=capacity_hint, **SM_CFG)
        fresh.import_rows(ex["keys"], ex["values"], ex["slots"], ex["hits"],
                          ex["last_update_step"], ex["update_count"])
        fresh.import_candidates(ex["candidate_keys"], ex["candidate_hits"])
        self.table = fresh
        self.dropped_missing = 0

    @invariant()
    def matches_model(self):
        t = self.table
        assert t.size == len(t) == len(self.rows)
        assert t.num_candidates == 0
        assert_load_ok(t)
        assert t.counters()["dropped_missing_grads"] == self.dropped_missing
        ex = by_key(t.export())
        keys = sorted(self.rows)
        assert list(ex["keys"]) == keys
        if keys:
            np.testing.assert_allclose(ex["values"], np.stack([self.rows[k] for k in keys]),
                                       rtol=1e-6, atol=1e-6)
            assert list(ex["hits"]) == [self.hits[k] for k in keys]
            assert list(ex["last_update_step"]) == [self.last[k] for k in keys]
            assert list(ex["update_count"]) == [self.count[k] for k in keys]
        # Every live key findable (distinct rows), every erased key absent.
        idx = t.find(np.array(keys, dtype=np.int64))
        assert (idx >= 0).all() and len(set(idx.tolist())) == len(keys)
        absent = sorted(self.gone - set(self.rows))
        if absent:
            assert (t.find(np.array(absent, dtype=np.int64)) == -1).all()


HashTableMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestHashTableStateMachine = HashTableMachine.TestCase


@FAST
@given(perm_seed=st.integers(0, 2**32 - 1), n_erase=st.integers(0, 10))
def test_erase_keeps_other_keys_findable_in_full_tiny_table(perm_seed, n_erase):
    """Capacity 16 holding 11 keys (load 0.69, the most it takes): long clusters; erase in
    random order."""
    rng = np.random.default_rng(perm_seed)
    pool = np.array(ADVERSARIAL_KEYS, dtype=np.int64)
    keys = rng.choice(pool, size=11, replace=False)
    t = EmbeddingHashTable(dim=2, capacity_hint=11, seed=3)
    t.lookup_or_insert(keys)
    assert t.capacity == 16
    erased = rng.permutation(keys)[:n_erase]
    for k in erased:                       # one by one: each erase shifts a cluster back
        assert t.erase(np.array([k])) == 1
        kept = np.setdiff1d(keys, erased[: list(erased).index(k) + 1])
        assert (t.find(kept) >= 0).all()
        np.testing.assert_array_equal(rows_of(t, kept), ref_initial_rows(kept, 2, seed=3))
    assert (t.find(erased) == -1).all()
    assert t.size == 11 - n_erase and t.capacity == 16
    # Re-inserting erased keys gives back their key-seeded rows.
    np.testing.assert_allclose(t.lookup_or_insert(erased), ref_initial_rows(erased, 2, seed=3),
                               rtol=1e-6, atol=1e-9)


def test_erase_of_cluster_wrapping_around_table_end():
    """Keys whose start slots are 14, 15, 15, 15, 0 form a cluster that wraps past slot 15."""
    wanted = [14, 15, 15, 15, 0, 1]
    keys, k = [], 0
    for h in wanted:
        while home_slot(k, 16) != h or k in keys:
            k += 1
        keys.append(k)
        k = 0
    for order in itertools.permutations(range(len(keys))):
        t = EmbeddingHashTable(dim=1, capacity_hint=8, initializer="uniform")
        t.insert(np.array(keys))
        assert t.capacity == 16
        for n, i in enumerate(order):
            assert t.erase(np.array([keys[i]])) == 1
            kept = [keys[j] for j in order[n + 1:]]
            if kept:
                idx = t.find(np.array(kept))
                assert (idx >= 0).all()
                assert list(t.export(values=False)["keys"][idx]) == kept
            assert t.find(np.array([keys[i]]))[0] == -1
        assert t.size == 0


def test_random_op_sequence_at_scale():
    """Thousands of keys through growth, erase and re-insert, checked against a dict model."""
    rng = np.random.default_rng(12345)
    t = EmbeddingHashTable(dim=4, optimizer="sgd", learning_rate=1.0, capacity_hint=1, seed=9,
                           table_id=2)
    model, count, last = {}, {}, {}
    universe = np.concatenate([rng.integers(INT64_MIN, INT64_MAX, 3000, dtype=np.int64),
                               np.arange(-500, 500, dtype=np.int64) * 2**40,
                               np.array(ADVERSARIAL_KEYS, dtype=np.int64)])
    universe = np.unique(universe)
    for rnd in range(30):
        ins = rng.choice(universe, 400)
        t.lookup_or_insert(ins, step=100 + rnd)
        new = [k for k in dict.fromkeys(ins.tolist()) if k not in model]
        if new:
            for k, r in zip(new, ref_initial_rows(new, 4, seed=9, table_id=2)):
                model[k] = r.astype(np.float64)
                count[k], last[k] = 0, 100 + rnd
        upd = rng.choice(universe, 300)
        g = rng.integers(-8, 9, (300, 4)).astype(np.float32) / 4
        t.apply_gradients(upd, g, step=rnd)
        acc = {}
        for k, gi in zip(upd.tolist(), g):
            if k in model:
                acc[k] = acc.get(k, 0) + gi.astype(np.float64)
        for k, gi in acc.items():
            model[k] = f32(model[k] - gi)
            count[k] += 1
            last[k] = rnd
        dead = rng.choice(universe, 250)
        assert t.erase(dead) == len({k for k in dead.tolist() if k in model})
        for k in dead.tolist():
            model.pop(k, None)
        assert t.size == len(model)
        assert_load_ok(t)
        ex = by_key(t.export(values=False))
        assert ex["keys"].tolist() == sorted(model)
        assert ex["update_count"].tolist() == [count[k] for k in sorted(model)]
        assert ex["last_update_step"].tolist() == [last[k] for k in sorted(model)]
    keys = np.array(sorted(model), dtype=np.int64)
    np.testing.assert_allclose(rows_of(t, keys), np.stack([model[k] for k in keys]),
                               rtol=1e-6, atol=1e-6)
    absent = np.setdiff1d(universe, keys)
    assert (t.find(absent) == -1).all()


# ---------------------------------------------------------------------------------------------
# 2. Optimizer kernels vs numpy reference
# ---------------------------------------------------------------------------------------------

OPT_CASES = {
    "sgd": dict(learning_rate=0.1),
    "adagrad": dict(learning_rate=0.1, initial_accumulator=0.1, epsilon=1e-7),
    "adagrad_eps": dict(learning_rate=0.3, initial_accumulator=0.01, epsilon=0.5),
    "adam": dict(learning_rate=0.01, beta1=0.9, beta2=0.999, epsilon=1e-7),
    "adam_eps": dict(learning_rate=0.05, beta1=0.8, beta2=0.99, epsilon=1e-3),
    "ftrl": dict(learning_rate=0.1, initial_accumulator=0.1, l1=0.0, l2=0.0),
    "ftrl_l1_l2": dict(learning_rate=0.2, initial_accumulator=0.1, l1=0.5, l2=0.05),
}


@pytest.mark.parametrize("case", sorted(OPT_CASES))
def test_optimizer_matches_numpy_reference(case):
    optimizer = case.split("_")[0]
    hp = OPT_CASES[case]
    dim, seed = 4, 77
    rng = np.random.default_rng(sum(map(ord, case)))
    t = EmbeddingHashTable(dim=dim, optimizer=optimizer, initializer="normal", init_std=0.5,
                           seed=seed, table_id=1, capacity_hint=4, **hp)
    keys = np.array([3, -7, INT64_MIN, INT64_MAX, 2**40, 0, 11], dtype=np.int64)
    init = ref_initial_rows(keys, dim, "normal", seed, 1, 0.0, 0.5)
    np.testing.assert_allclose(t.lookup_or_insert(keys, step=0), init, rtol=1e-6, atol=1e-7)
    w = {int(k): init[i].astype(np.float64) for i, k in enumerate(keys)}
    s = {int(k): initial_slots(optimizer, dim, hp) for k in keys}
    count = {int(k): 0 for k in keys}
    last = {int(k): 0 for k in keys}
    # 11 is never updated (lazy); 0 is first updated at step 5 (own Adam count, t=1).
    batches = [
        [3, -7, 3, INT64_MIN, 3],
        [INT64_MAX, -7, 2**40, 2**40],
        [3, 3, INT64_MIN],
        [-7, INT64_MAX, 2**40, 3],
        [0, 3, 0, -7, INT64_MIN, INT64_MAX],
        [0, 2**40],
    ]
    untouched_before = rows_of(t, [11]).copy()
    for step, batch in enumerate(batches, start=1):
        bk = np.array(batch, dtype=np.int64)
        grads = rng.normal(0, 1, (len(batch), dim)).astype(np.float32)
        before = by_key(t.export())
        assert t.apply_gradients(bk, grads, step=step) == len(set(batch))
        summed = {}
        for k, g in zip(batch, grads):
            summed[k] = summed.get(k, 0.0) + g.astype(np.float64)
        for k, g in summed.items():
            count[k] += 1
            last[k] = step
            w[k], s[k] = ref_update(optimizer, w[k], s[k], g, count[k], hp)
        after = by_key(t.export())
        order = list(after["keys"])
        # Lazy: rows (and slots) not in the batch are bit-for-bit unchanged.
        for i, k in enumerate(order):
            if k not in summed:
                np.testing.assert_array_equal(after["values"][i], before["values"][i])
                np.testing.assert_array_equal(after["slots"][i], before["slots"][i])
        np.testing.assert_allclose(after["values"], np.stack([w[k] for k in order]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{case} values at step {step}")
        np.testing.assert_allclose(after["slots"], np.stack([s[k] for k in order]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{case} slots at step {step}")
        assert list(after["update_count"]) == [count[k] for k in order]
        assert list(after["last_update_step"]) == [last[k] for k in order]
    np.testing.assert_array_equal(rows_of(t, [11]), untouched_before)
    assert t.optimizer_slot_names == {"sgd": (), "adagrad": ("accumulator",), "adam": ("m", "v"),
                                      "ftrl": ("accumulator", "linear")}[optimizer]
    if case == "ftrl_l1_l2":
        # l1 must have clipped some weights to exactly zero for this test to mean anything.
        assert (rows_of(t, keys[:-1]) == 0).any()


def test_adam_bias_correction_uses_row_update_count():
    """A key first updated at global step 1000 takes a full-size first step (~lr)."""
    t = EmbeddingHashTable(dim=3, optimizer="adam", learning_rate=0.01, initializer="zeros")
    t.lookup_or_insert(np.array([1, 2]))
    for step in range(1, 6):
        t.apply_gradients(np.array([1]), np.full((1, 3), 0.5, np.float32), step=step)
    t.apply_gradients(np.array([2]), np.array([[0.5, -2.0, 1e-3]], np.float32), step=1000)
    # t=1: m_hat = g, v_hat = g^2 -> step = lr * g / (|g| + eps) = lr * sign(g).
    expected = -0.01 * np.array([0.5, -2.0, 1e-3]) / (np.abs([0.5, -2.0, 1e-3]) + 1e-7)
    np.testing.assert_allclose(rows_of(t, [2])[0], expected, rtol=1e-5)
    ex = by_key(t.export())
    assert list(ex["update_count"]) == [5, 1]


def keras_adam(values, learning_rate, m=None, v=None, iterations=0):
    """A dense Keras Adam (the installed Keras, its own update formula) on a tf.Variable holding
    ``values``, optionally with moments m, v and an update count already there. Returns
    (variable, optimizer, apply(grads))."""
    import tensorflow as tf
    var = tf.Variable(np.asarray(values, np.float32))
    opt = tf.keras.optimizers.Adam(learning_rate=learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    opt.build([var])
    if m is not None:
        opt._momentums[0].assign(np.asarray(m, np.float32))
        opt._velocities[0].assign(np.asarray(v, np.float32))
        opt.iterations.assign(iterations)

    def apply(grads):
        opt.apply_gradients([(tf.constant(np.asarray(grads, np.float32)), var)])
    return var, opt, apply


@pytest.mark.parametrize("steps, rare_gap", [(100, 97), (420, 400)])
def test_catch_up_adam_follows_keras_adam_on_a_dense_table(steps, rare_gap):
    """adam_catch_up: each step updates a random half of the rows (the other rows: zero-gradient
    rows of a dense Keras Adam); one row waits rare_gap steps between updates, beyond the terms
    applied one by one in the second case. Every updated row equals Keras's within 1e-4
    relative at every step, and all rows do after a last step that touches every row."""
    n_rows, dim, lr = 12, 4, 0.01
    keys = np.arange(100, 100 + n_rows, dtype=np.int64)
    table = EmbeddingHashTable(dim=dim, optimizer="adam", learning_rate=lr, init_std=0.5, seed=3,
                               adam_catch_up=True)
    init = table.lookup_or_insert(keys, step=0)
    var, _, keras_apply = keras_adam(init, lr)
    rng = np.random.default_rng(steps)
    for step in range(steps + 1):
        touched = rng.random(n_rows) < 0.5
        touched[0] = step in (0, 1, 1 + rare_gap)
        if step == steps:
            touched[:] = True            # every row catches up to the last step
        grads = (rng.normal(size=(n_rows, dim)) * rng.choice([0.01, 1.0, 30.0], size=(n_rows, 1)))
        grads = np.where(touched[:, None], grads, 0.0).astype(np.float32)
        table.apply_gradients(keys[touched], grads[touched], step=step)
        keras_apply(grads)
        np.testing.assert_allclose(rows_of(table, keys[touched]), var.numpy()[touched],
                                   rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
    if steps > 100:
        assert rare_gap > table.catch_up_terms      # the long gap's later steps were dropped


def test_catch_up_adam_of_restored_rows_continues_keras_adam():
    """A row imported with its moments and last update step (as a checkpoint of lazy Adam rows
    restores it) catches up from that step: Keras's Adam started from the same state agrees."""
    dim, lr, last, now = 3, 0.02, 6, 30
    w = np.array([[0.3, -0.2, 0.05]], np.float32)
    m = np.array([[0.1, -0.4, 0.0]], np.float32)
    v = np.array([[0.02, 0.5, 1e-6]], np.float32)
    table = EmbeddingHashTable(dim=dim, optimizer="adam", learning_rate=lr, adam_catch_up=True)
    table.import_rows(np.array([9]), w, slots=np.stack([m, v], axis=1),
                      last_update_step=np.array([last]), update_count=np.array([4]))
    g = np.array([[0.5, 0.1, -2.0]], np.float32)
    table.apply_gradients(np.array([9]), g, step=now)
    var, _, keras_apply = keras_adam(w, lr, m, v, iterations=last + 1)
    for _ in range(last + 1, now):
        keras_apply(np.zeros_like(g))
    keras_apply(g)
    np.testing.assert_allclose(rows_of(table, [9]), var.numpy(), rtol=1e-4)


def test_catch_up_adam_is_for_adam_tables_only():
    with pytest.raises(ConfigError, match="adam_catch_up applies to the adam optimizer"):
        EmbeddingHashTable(dim=2, optimizer="adagrad", adam_catch_up=True)
    assert EmbeddingHashTable(dim=2, optimizer="adam", adam_catch_up=True).adam_catch_up
    assert not EmbeddingHashTable(dim=2, optimizer="adam").adam_catch_up


def test_duplicate_keys_summed_before_nonlinear_update():
    """Adagrad on [k, k] with g each must equal one update with 2g (not two updates)."""
    hp = dict(learning_rate=0.5, initial_accumulator=0.1, epsilon=1e-7)
    a = EmbeddingHashTable(dim=2, optimizer="adagrad", initializer="zeros", **hp)
    a.lookup_or_insert(np.array([5]))
    g = np.array([[0.3, -1.2]], np.float32)
    assert a.apply_gradients(np.array([5, 5]), np.vstack([g, g]), step=1) == 1
    acc = 0.1 + (2 * g[0].astype(np.float64)) ** 2
    np.testing.assert_allclose(rows_of(a, [5])[0], -0.5 * 2 * g[0] / (np.sqrt(acc) + 1e-7),
                               rtol=1e-5)
    np.testing.assert_allclose(a.export()["slots"][0, 0], acc, rtol=1e-6)
    assert a.export()["update_count"][0] == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
def test_many_duplicate_keys_from_several_senders_are_summed_in_arrival_order(optimizer):
    """Thousands of keys as an owner receives them (each sender's keys distinct, the senders'
    blocks concatenated, so a key comes once per sender), plus keys the table does not hold
    and unadmitted candidates: each held row is updated once with its gradients summed in
    arrival order (numpy float32 sums), bit for bit the update of the summed gradient, and the
    dropped ones are counted."""
    rng = np.random.default_rng(7)
    held = rng.integers(-2**62, 2**62, size=40000)     # rows scattered over 0..40000
    tables = [EmbeddingHashTable(dim=5, optimizer=optimizer, learning_rate=0.1, seed=3) for _ in range(2)]
    for table in tables:
        table.insert(held)
    senders = [rng.choice(held, size=2000, replace=False) for _ in range(4)]
    missing = rng.integers(2**62, 2**62 + 10**6, size=50)
    keys = np.concatenate(senders + [missing])
    grads = rng.normal(size=(len(keys), 5)).astype(np.float32)
    _, first = np.unique(keys, return_index=True)
    order = np.sort(first)                                       # first arrival order
    summed = {}
    for key, g in zip(keys.tolist(), grads):
        summed[key] = summed[key] + g if key in summed else g.copy()   # float32, arrival order
    present = [k for k in keys[order].tolist() if k not in set(missing.tolist())]
    before = rows_of(tables[0], present)
    assert tables[0].apply_gradients(keys, grads, step=4) == len(present)
    expected_sums = np.stack([summed[k] for k in present])
    if optimizer == "sgd":                                       # w - lr * g, float32
        np.testing.assert_array_equal(rows_of(tables[0], present),
                                      before - np.float32(0.1) * expected_sums)
    exported = tables[0].export()
    counts = dict(zip(exported["keys"].tolist(), exported["update_count"].tolist()))
    assert all(counts[k] == 1 for k in present)                 # each row updated once
    assert tables[1].apply_gradients(np.array(present), expected_sums, step=4) == len(present)
    np.testing.assert_array_equal(rows_of(tables[0], present), rows_of(tables[1], present))
    exported = [table.export() for table in tables]
    by_key = [dict(zip(e["keys"].tolist(), e["slots"])) for e in exported]
    np.testing.assert_array_equal(np.stack([by_key[0][k] for k in present]),
                                  np.stack([by_key[1][k] for k in present]))
    assert tables[0].counters()["dropped_missing_grads"] == len(missing)
    candidates = EmbeddingHashTable(dim=5, optimizer=optimizer, min_count=3)
    candidates.lookup_or_insert(keys[:10])                       # one hit each: not admitted
    assert candidates.apply_gradients(keys[:10], grads[:10]) == 0
    assert candidates.counters()["dropped_unadmitted_grads"] == 10


# ---------------------------------------------------------------------------------------------
# 3. Initializer
# ---------------------------------------------------------------------------------------------

INIT_CASES = [
    ("normal", 0.0, 0.01), ("normal", -1.5, 3.0), ("uniform", -0.05, 0.05),
    ("uniform", 2.0, 7.5), ("zeros", 0.0, 0.0),
]


@pytest.mark.parametrize("kind,a,b", INIT_CASES)
@pytest.mark.parametrize("dim", [1, 7, 8])
@pytest.mark.parametrize("seed,table_id", [(0, 0), (2**64 - 1, -3), (123456789, 2**40)])
def test_initial_rows_match_numpy_reference(kind, a, b, dim, seed, table_id):
    keys = np.array(ADVERSARIAL_KEYS + list(range(-50, 50)), dtype=np.int64)
    kw = {"normal": dict(init_mean=a, init_std=b), "uniform": dict(init_low=a, init_high=b),
          "zeros": {}}[kind]
    t = EmbeddingHashTable(dim=dim, initializer=kind, seed=seed, table_id=table_id, **kw)
    expected = ref_initial_rows(keys, dim, kind, seed, table_id, a, b)
    got = t.lookup_or_insert(keys)
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=1e-7 * (abs(a) + abs(b)))
    np.testing.assert_array_equal(initial_rows(keys, dim, kind, seed, table_id, a, b), got)
    if kind == "zeros":
        assert not got.any()


@FAST
@given(perm_seed=st.integers(0, 2**32 - 1),
       hints=st.tuples(st.sampled_from([0, 1, 7, 64, 5000]), st.sampled_from([2, 33, 100000])))
def test_initial_rows_independent_of_order_and_capacity(perm_seed, hints):
    rng = np.random.default_rng(perm_seed)
    keys = np.unique(np.concatenate([np.array(ADVERSARIAL_KEYS, np.int64),
                                     rng.integers(INT64_MIN, INT64_MAX, 200, dtype=np.int64)]))
    tables = []
    for hint, order in zip(hints, (keys, rng.permutation(keys))):
        t = EmbeddingHashTable(dim=5, seed=42, table_id=3, capacity_hint=hint)
        # Insert in chunks in this order, interleaved with some erases of other keys.
        for chunk in np.array_split(order, 4):
            t.lookup_or_insert(chunk)
            t.lookup_or_insert(np.array([7777777, 8888888]))
            t.erase(np.array([7777777, 8888888]))
        tables.append(t)
    a, b = (rows_of(t, keys) for t in tables)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref_initial_rows(keys, 5, seed=42, table_id=3), rtol=1e-6,
                               atol=1e-9)


def test_normal_initializer_rejection_paths_match_the_reference():
    # 4000 rows of 16: about 640 wedge tests and 15 tail draws; every path must agree exactly.
    keys = np.arange(-2000, 2000, dtype=np.int64) * 7919
    before = dict(ZIG_PATHS)
    expected = ref_initial_rows(keys, 16, "normal", seed=11, table_id=4, a=0.0, b=1.0)
    ran = {k: ZIG_PATHS[k] - before[k] for k in ZIG_PATHS}
    assert ran["tail"] > 0 and ran["wedge"] > 100, ran
    got = initial_rows(keys, 16, "normal", 11, 4, 0.0, 1.0)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got).max() > 3.6541528853610088      # some draws came from the tail


def test_initializer_distribution_sanity():
    n, dim = 20000, 8
    keys = np.arange(n, dtype=np.int64)
    mean, std = 0.3, 2.0
    x = EmbeddingHashTable(dim=dim, init_mean=mean, init_std=std, seed=5,
                           capacity_hint=n).lookup_or_insert(keys).astype(np.float64)
    m = x.size
    assert abs(x.mean() - mean) < 4 * std / math.sqrt(m)
    assert abs(x.std() - std) < 4 * std / math.sqrt(2 * m)
    # different elements of a row (consecutive ziggurat draws) are uncorrelated.
    for i, j in [(0, 1), (0, 2), (3, 7)]:
        assert abs(np.corrcoef(x[:, i], x[:, j])[0, 1]) < 4 / math.sqrt(n)
    # Skewness ~0 and kurtosis ~3 (normal shape, not just moments 1-2).
    z = (x - x.mean()) / x.std()
    assert abs((z**3).mean()) < 4 * math.sqrt(6 / m)
    assert abs((z**4).mean() - 3) < 4 * math.sqrt(24 / m)

    low, high = -0.25, 0.75
    u = EmbeddingHashTable(dim=dim, initializer="uniform", init_low=low, init_high=high,
                           seed=5, capacity_hint=n).lookup_or_insert(keys).astype(np.float64)
    assert u.min() >= low and u.max() < high
    width = high - low
    assert abs(u.mean() - (low + high) / 2) < 4 * width / math.sqrt(12 * m)
    assert abs(u.var() - width**2 / 12) < 4 * width**2 * math.sqrt(1 / 180 / m)
    hist, _ = np.histogram(u, bins=10, range=(low, high))
    assert np.all(np.abs(hist - m / 10) < 5 * math.sqrt(m / 10))


def test_different_seed_or_table_id_gives_different_rows():
    keys = np.unique(np.array(ADVERSARIAL_KEYS + list(range(100)), dtype=np.int64))
    base = EmbeddingHashTable(dim=4, seed=1, table_id=1).lookup_or_insert(keys)
    other_seed = EmbeddingHashTable(dim=4, seed=2, table_id=1).lookup_or_insert(keys)
    other_table = EmbeddingHashTable(dim=4, seed=1, table_id=2).lookup_or_insert(keys)
    assert np.all(base != other_seed)
    assert np.all(base != other_table)
    again = EmbeddingHashTable(dim=4, seed=1, table_id=1, capacity_hint=10**4).lookup_or_insert(keys)
    np.testing.assert_array_equal(base, again)
    # Distinct keys get distinct rows.
    assert len({r.tobytes() for r in base}) == len(keys)


# ---------------------------------------------------------------------------------------------
# 4. Admission, hits, eviction, capacity, versions
# ---------------------------------------------------------------------------------------------

def test_admission_min_count_three():
    t = EmbeddingHashTable(dim=3, optimizer="sgd", learning_rate=1.0, min_count=3, seed=8)
    k = np.array([INT64_MIN])
    g = np.ones((1, 3), np.float32)
    ref = ref_initial_rows(k, 3, seed=8)
    ver = np.empty(1, np.int64)
    for hit in (1, 2):
        assert not t.lookup_or_insert(k, step=hit, versions=ver).any()
        assert ver[0] == -1 and t.find(k)[0] == -1
        assert t.size == 0 and t.num_candidates == 1
        assert t.apply_gradients(k, g, step=hit) == 0
        assert t.dropped_unadmitted_grads == hit
        ex = t.export()
        assert list(ex["candidate_keys"]) == [INT64_MIN] and list(ex["candidate_hits"]) == [hit]
    # Third hit: admitted with its key-seeded row (the dropped gradients left no trace).
    np.testing.assert_allclose(t.lookup_or_insert(k, step=3, versions=ver), ref, rtol=1e-6)
    assert ver[0] == 3 and t.size == 1 and t.num_candidates == 0 and t.admitted_keys == 1
    assert t.apply_gradients(k, g, step=4) == 1
    np.testing.assert_allclose(rows_of(t, k), ref - 1.0, rtol=1e-6)
    assert t.dropped_unadmitted_grads == 2


def test_admission_counts_each_occurrence_within_a_batch():
    t = EmbeddingHashTable(dim=2, min_count=3, seed=1)
    keys = np.array([9, 4, 9, 9, 4, 9], dtype=np.int64)
    ver = np.empty(6, np.int64)
    out = t.lookup_or_insert(keys, step=7, versions=ver)
    ref9 = ref_initial_rows([9], 2, seed=1)[0]
    zero = np.zeros(2)
    expected = np.stack([zero, zero, zero, ref9, zero, ref9])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert list(ver) == [-1, -1, -1, 7, -1, 7]
    ex = t.export()
    assert list(ex["keys"]) == [9] and list(ex["hits"]) == [4]
    assert list(ex["candidate_keys"]) == [4] and list(ex["candidate_hits"]) == [2]
    # count_hits=False neither counts nor admits.
    t.lookup_or_insert(np.array([4, 4]), count_hits=False)
    assert t.num_candidates == 1 and t.export()["candidate_hits"][0] == 2
    t.lookup_or_insert(np.array([4]))
    assert t.size == 2


@FAST
@given(batches=st.lists(st.lists(st.sampled_from([0, -1, 5, INT64_MAX, 2**40]), max_size=6),
                        max_size=8))
def test_admission_property_against_hit_model(batches):
    t = EmbeddingHashTable(dim=2, min_count=3, optimizer="sgd", learning_rate=1.0, seed=4)
    hits, rows = {}, {}
    dropped_unadmitted = 0
    for step, batch in enumerate(batches):
        karr = np.array(batch, dtype=np.int64)
        out = t.lookup_or_insert(karr, step=step)
        for i, k in enumerate(batch):
            hits[k] = hits.get(k, 0) + 1
            if hits[k] >= 3 and k not in rows:
                rows[k] = ref_initial_rows([k], 2, seed=4)[0].astype(np.float64)
            np.testing.assert_allclose(out[i], rows.get(k, np.zeros(2)), rtol=1e-6)
        grads = np.full((len(batch), 2), 0.5, np.float32)
        t.apply_gradients(karr, grads, step=step)
        for k in set(batch):
            if k in rows:
                rows[k] = f32(rows[k] - 0.5 * batch.count(k))
        dropped_unadmitted += sum(1 for k in batch if k not in rows)
    assert t.dropped_unadmitted_grads == dropped_unadmitted
    ex = by_key(t.export())
    assert list(ex["keys"]) == sorted(rows)
    assert list(ex["hits"]) == [hits[k] for k in sorted(rows)]
    cands = sorted(k for k in hits if k not in rows)
    assert list(ex["candidate_keys"]) == cands
    assert list(ex["candidate_hits"]) == [hits[k] for k in cands]


def test_evict_stale_by_ttl():
    t = EmbeddingHashTable(dim=2, optimizer="sgd")
    keys = list(range(-6, 6))
    last = {}
    for k in keys:                         # inserted at step k + 6 (0..11)
        t.lookup_or_insert(np.array([k]), step=k + 6)
        last[k] = k + 6
    for step, batch in [(12, [-6, 0]), (14, [-5, 5]), (9, [3]), (11, [-4]), (10, [-3])]:
        t.apply_gradients(np.array(batch), np.zeros((len(batch), 2), np.float32), step=step)
        for k in batch:
            last[k] = step
    now, ttl = 15, 4
    expected_gone = sorted(k for k in keys if now - last[k] > ttl)
    assert 0 < len(expected_gone) < len(keys)
    assert last[-4] == now - ttl and -4 not in expected_gone      # boundary: exactly ttl old
    assert t.evict_stale(now, ttl) == len(expected_gone)
    assert t.evicted_rows == len(expected_gone)
    assert sorted(t.export()["keys"]) == sorted(set(keys) - set(expected_gone))
    assert (t.find(np.array(expected_gone)) == -1).all()
    assert t.evict_stale(now, ttl) == 0
    with pytest.raises(ConfigError):
        t.evict_stale(now, -1)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_evict_to_budget_lfu_lru_ties_by_smaller_key(policy):
    t = EmbeddingHashTable(dim=2)
    rng = np.random.default_rng(3)
    keys = [INT64_MIN, -9, -1, 0, 4, 17, 2**40, INT64_MAX]
    hits, last = {}, {}
    for step in range(1, 9):
        batch = [k for k in keys if rng.random() < 0.5]
        t.lookup_or_insert(np.array(batch + [keys[step - 1]], dtype=np.int64), step=0)
        for k in batch + [keys[step - 1]]:
            hits[k] = hits.get(k, 0) + 1
            last.setdefault(k, 0)
        upd = [k for k in keys if k in last and rng.random() < 0.3]
        if upd:
            t.apply_gradients(np.array(upd), np.zeros((len(upd), 2), np.float32), step=step // 3)
            for k in upd:
                last[k] = step // 3
    score = hits if policy == "lfu" else last
    # Reference: smallest score first, ties by smaller (signed) key.
    ranking = sorted(keys, key=lambda k: (score[k], k))
    assert len({score[k] for k in keys}) < len(keys)           # there are ties
    for budget in (6, 3, 0):
        before = sorted(t.export()["keys"])
        expected_gone = [k for k in ranking if k in before][: len(before) - budget]
        prev = t.evicted_rows
        assert t.evict_to_budget(budget, policy) == len(expected_gone)
        assert t.evicted_rows - prev == len(expected_gone)
        assert sorted(t.export()["keys"]) == sorted(set(before) - set(expected_gone))
    assert t.evict_to_budget(5, policy) == 0
    with pytest.raises(ConfigError, match="lfu"):
        t.evict_to_budget(1, "fifo")


def test_max_rows_refuse():
    t = EmbeddingHashTable(dim=2, max_rows=4, on_full="refuse", seed=6, learning_rate=1.0)
    keys = np.array([10, 11, 12, 13, 14, 15, 10], dtype=np.int64)
    ver = np.empty(7, np.int64)
    out = t.lookup_or_insert(keys, step=2, versions=ver)
    ref = ref_initial_rows(keys, 2, seed=6)
    np.testing.assert_allclose(out[[0, 1, 2, 3, 6]], ref[[0, 1, 2, 3, 6]], rtol=1e-6)
    assert not out[4:6].any()
    assert list(ver) == [2, 2, 2, 2, -1, -1, 2]
    assert t.size == 4 and t.refused_inserts == 2
    assert t.counters()["refused_inserts"] == 2
    assert (t.find(keys[4:6]) == -1).all()
    before = t.export()["values"].copy()
    t.apply_gradients(keys[4:6], np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(t.export()["values"], before)
    assert t.size == 4
    # After eviction makes room, a refused key gets its key-seeded row.
    t.evict_to_budget(3, "lfu")
    np.testing.assert_allclose(t.lookup_or_insert(keys[4:5]), ref[4:5], rtol=1e-6)
    assert t.size == 4


def test_max_rows_raise():
    t = EmbeddingHashTable(dim=2, max_rows=3, on_full="raise")
    t.lookup_or_insert(np.array([1, 2]))
    with pytest.raises(TableFullError) as info:
        t.lookup_or_insert(np.array([2, 3, 4, 5]))
    msg = str(info.value)
    assert "max_rows=3" in msg and "on_full=refuse" in msg and "key 4" in msg
    assert t.size == 3 and sorted(t.export()["keys"]) == [1, 2, 3]
    assert (t.find(np.array([4, 5])) == -1).all()
    # The failing key leaves no trace: not a row, not a (0-hit) candidate.
    assert t.num_candidates == 0 and len(t.export()["candidate_keys"]) == 0
    # Existing keys still read fine; import beyond max_rows raises too.
    assert t.lookup_or_insert(np.array([1, 2, 3])).shape == (3, 2)
    with pytest.raises(TableFullError, match="max_rows"):
        t.import_rows(np.array([8, 9]), np.zeros((2, 2), np.float32))


def test_versions_report_last_update_step():
    t = EmbeddingHashTable(dim=2, min_count=2)
    ver = np.empty(4, np.int64)
    t.lookup_or_insert(np.array([1, 2, 1, 3]), step=5, versions=ver)
    assert list(ver) == [-1, -1, 5, -1]
    t.apply_gradients(np.array([1, 2]), np.ones((2, 2), np.float32), step=9)
    t.lookup_or_insert(np.array([1, 2, 3, 3]), step=10, versions=ver)
    assert list(ver) == [9, 10, 10, 10]     # 2 and 3 admitted on their 2nd hit


# ---------------------------------------------------------------------------------------------
# 5. Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_keys_raise_table_input_error():
    t = EmbeddingHashTable(dim=3)
    with pytest.raises(TableInputError, match=r"int64.*np\.asarray\(keys, dtype=np\.int64\)"):
        t.lookup_or_insert(np.array([1.0, 2.0]))
    with pytest.raises(TableInputError, match="1-D"):
        t.lookup_or_insert(np.array([[1, 2]], dtype=np.int64))
    with pytest.raises(TableInputError, match="int64"):
        t.find(np.array([2**63], dtype=np.uint64))
    with pytest.raises(TableInputError):
        t.erase(np.array(["a", "b"]))
    with pytest.raises(TableInputError):
        mix64(np.array([0.5]))
    with pytest.raises(TableInputError, match="1-D"):
        t.apply_gradients(np.zeros((2, 1), np.int64), np.zeros((2, 3), np.float32))
    assert t.size == 0
    # Narrower int dtypes and lists are fine.
    assert t.lookup_or_insert(np.array([1, 2], dtype=np.int32)).shape == (2, 3)
    assert t.lookup_or_insert([1, 2]).shape == (2, 3)


def test_bad_grads_raise_table_input_error():
    t = EmbeddingHashTable(dim=3)
    keys = np.array([1, 2])
    t.lookup_or_insert(keys)
    before = t.export()["values"].copy()
    with pytest.raises(TableInputError, match="float32"):
        t.apply_gradients(keys, np.zeros((2, 3), np.float64))
    with pytest.raises(TableInputError, match=r"shape \(2, 3\)"):
        t.apply_gradients(keys, np.zeros((2, 4), np.float32))
    with pytest.raises(TableInputError, match=r"shape \(2, 3\)"):
        t.apply_gradients(keys, np.zeros((3, 3), np.float32))
    with pytest.raises(TableInputError, match=r"shape \(2, 3\)"):
        t.apply_gradients(keys, np.zeros(6, np.float32))
    np.testing.assert_array_equal(t.export()["values"], before)
    assert t.applied_row_updates == 0


def test_bad_out_and_versions_arrays():
    t = EmbeddingHashTable(dim=3)
    keys = np.array([1, 2])
    with pytest.raises(TableInputError, match=r"out must .*\(2, 3\)"):
        t.lookup_or_insert(keys, out=np.empty((2, 4), np.float32))
    with pytest.raises(TableInputError, match="float32"):
        t.lookup_or_insert(keys, out=np.empty((2, 3), np.float64))
    with pytest.raises(TableInputError, match="C-contiguous"):
        t.lookup_or_insert(keys, out=np.empty((3, 2), np.float32).T)
    with pytest.raises(TableInputError, match="versions"):
        t.lookup_or_insert(keys, versions=np.empty(3, np.int64))
    with pytest.raises(TableInputError, match="out"):
        t.find(keys, out=np.empty(2, np.int32))
    out = np.full((2, 3), 7.0, np.float32)
    assert t.lookup_or_insert(keys, out=out) is out
    np.testing.assert_allclose(out, ref_initial_rows(keys, 3), rtol=1e-6)
    idx = np.empty(2, np.int64)
    assert t.find(keys, out=idx) is idx and sorted(idx) == [0, 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raise_applies_nothing(bad):
    t = EmbeddingHashTable(dim=2, optimizer="adagrad", nonfinite="raise", table_id=4)
    keys = np.array([1, 2, 3])
    t.lookup_or_insert(keys)
    before = t.export()
    grads = np.ones((3, 2), np.float32)
    grads[2, 1] = bad
    with pytest.raises(NonFiniteGradientError) as info:
        t.apply_gradients(keys, grads, step=1)
    msg = str(info.value)
    assert "key 3" in msg and "nothing was applied" in msg and "nonfinite=skip" in msg
    after = t.export()
    for name in ("values", "slots", "update_count", "last_update_step"):
        np.testing.assert_array_equal(after[name], before[name])
    assert t.applied_row_updates == 0 and t.skipped_nonfinite_grads == 0


def test_nonfinite_skip_skips_row_and_counts():
    t = EmbeddingHashTable(dim=2, optimizer="sgd", learning_rate=1.0, nonfinite="skip",
                           initializer="zeros")
    keys = np.array([1, 2, 1, 3, 4], dtype=np.int64)
    t.lookup_or_insert(np.array([1, 2, 3, 4]))
    grads = np.ones((5, 2), np.float32)
    grads[0, 0] = np.nan          # key 1's summed gradient is NaN -> row 1 skipped
    grads[3, 1] = np.inf          # key 3 skipped
    updated = t.apply_gradients(keys, grads, step=3)
    assert updated == 2
    assert t.skipped_nonfinite_grads == 2 and t.applied_row_updates == 2
    np.testing.assert_array_equal(rows_of(t, [1, 2, 3, 4]),
                                  [[0, 0], [-1, -1], [0, 0], [-1, -1]])
    ex = by_key(t.export())
    assert list(ex["update_count"]) == [0, 1, 0, 1]
    assert list(ex["last_update_step"]) == [0, 3, 0, 3]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(optimizer="rmsprop"), "adagrad"),
    (dict(initializer="glorot"), "uniform"),
    (dict(on_full="evict"), "refuse"),
    (dict(nonfinite="ignore"), "skip"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(min_count=0), "min_count"),
    (dict(max_rows=-1), "max_rows"),
    (dict(initializer="uniform", init_low=1.0, init_high=1.0), "init_low < init_high"),
    (dict(initializer="normal", init_std=-1.0), "init_std"),
    (dict(optimizer="ftrl", initial_accumulator=0.0), "initial_accumulator"),
])
def test_bad_config_raises_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EmbeddingHashTable(dim=4, **kwargs)


def test_bad_dim_and_initial_rows_config():
    with pytest.raises(ConfigError, match="dim"):
        EmbeddingHashTable(dim=0)
    with pytest.raises(ConfigError, match="normal"):
        initial_rows(np.array([1]), 4, initializer="he")


def test_import_rows_bad_shapes():
    t = EmbeddingHashTable(dim=2, optimizer="adam")
    keys = np.array([1, 2])
    with pytest.raises(TableInputError, match=r"slots must be float32 of shape \(2, 2, 2\)"):
        t.import_rows(keys, np.zeros((2, 2), np.float32), slots=np.zeros((2, 1, 2), np.float32))
    with pytest.raises(TableInputError, match="values"):
        t.import_rows(keys, np.zeros((2, 3), np.float32))
    with pytest.raises(TableInputError, match="hits"):
        t.import_rows(keys, np.zeros((2, 2), np.float32), hits=np.zeros(3))
    with pytest.raises(TableInputError, match="hits"):
        t.import_candidates(keys, np.zeros(1))
    assert t.size == 0


# ---------------------------------------------------------------------------------------------
# 6. Export / import round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
def test_export_import_round_trip(optimizer):
    cfg = dict(dim=3, optimizer=optimizer, learning_rate=0.05, min_count=3, seed=11,
               table_id=9, l1=0.01, l2=0.01)
    rng = np.random.default_rng(0)
    src = EmbeddingHashTable(capacity_hint=2, **cfg)
    pool = np.array(ADVERSARIAL_KEYS, np.int64)
    for step in range(1, 8):
        batch = rng.choice(pool, 12)
        src.lookup_or_insert(batch, step=step)
        src.apply_gradients(batch, rng.normal(0, 1, (12, 3)).astype(np.float32), step=step)
    src.erase(pool[:3])
    ex = src.export()
    assert src.size > 3 and set(ex["candidate_hits"]) == {1, 2}
    dst = EmbeddingHashTable(capacity_hint=5000, **cfg)
    dst.import_rows(ex["keys"], ex["values"], ex["slots"], ex["hits"], ex["last_update_step"],
                    ex["update_count"])
    dst.import_candidates(ex["candidate_keys"], ex["candidate_hits"])
    a, b = by_key(ex), by_key(dst.export())
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert dst.size == src.size and dst.num_candidates == src.num_candidates
    # Both tables continue identically (Adam needs update_count; admission needs candidates).
    for step in range(8, 11):
        batch = rng.choice(pool, 10)
        grads = rng.normal(0, 1, (10, 3)).astype(np.float32)
        for t in (src, dst):
            t.lookup_or_insert(batch, step=step)
            t.apply_gradients(batch, grads, step=step)
    a, b = by_key(src.export()), by_key(dst.export())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_import_rows_defaults_and_overwrite():
    t = EmbeddingHashTable(dim=2, optimizer="adagrad", initial_accumulator=0.25, min_count=4)
    t.import_rows(np.array([5, 6]), np.array([[1, 2], [3, 4]], np.float32))
    ex = by_key(t.export())
    np.testing.assert_array_equal(ex["values"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ex["slots"], np.full((2, 1, 2), 0.25, np.float32))
    assert list(ex["hits"]) == [4, 4] and list(ex["update_count"]) == [0, 0]
    assert list(ex["last_update_step"]) == [0, 0]
    # Imported rows are admitted regardless of min_count; overwrite keeps a single row.
    t.import_rows(np.array([6]), np.array([[9, 9]], np.float32), hits=[1])
    assert t.size == 2
    np.testing.assert_array_equal(rows_of(t, [6]), [[9, 9]])


def test_import_candidates_restores_hit_counts():
    t = EmbeddingHashTable(dim=2, min_count=3, seed=2)
    t.import_rows(np.array([1]), np.ones((1, 2), np.float32), hits=[7])
    t.import_candidates(np.array([1, 5, 6, INT64_MIN]), np.array([0, 2, 1, 2]))
    ex = by_key(t.export())
    assert ex["keys"].tolist() == [1] and ex["hits"].tolist() == [7]   # rows untouched
    assert ex["candidate_keys"].tolist() == [INT64_MIN, 5, 6]
    assert ex["candidate_hits"].tolist() == [2, 2, 1]
    # hits=2 -> admitted on the next hit; hits=1 -> still a candidate.
    out = t.lookup_or_insert(np.array([5, 6, INT64_MIN]))
    np.testing.assert_allclose(out[[0, 2]], ref_initial_rows([5, INT64_MIN], 2, seed=2),
                               rtol=1e-6)
    assert not out[1].any()
    assert t.size == 3 and t.num_candidates == 1


# ---------------------------------------------------------------------------------------------
# 7. Memory and capacity
# ---------------------------------------------------------------------------------------------

def test_capacity_power_of_two_load_at_most_half_and_memory_grows():
    t = EmbeddingHashTable(dim=8, optimizer="adam", capacity_hint=1)
    assert t.capacity == 16
    mem, caps = [t.memory_bytes], [t.capacity]
    rng = np.random.default_rng(1)
    for _ in range(40):
        t.lookup_or_insert(rng.integers(INT64_MIN, INT64_MAX, 97, dtype=np.int64))
        assert_load_ok(t)
        mem.append(t.memory_bytes)
        caps.append(t.capacity)
    assert t.size == 40 * 97
    assert all(b >= a for a, b in zip(mem, mem[1:]))
    assert mem[-1] > mem[0]
    # Memory covers at least the live rows: size * (3 * dim floats) plus the slot array.
    assert mem[-1] >= t.size * t.row_width * 4 + t.capacity * 16
    assert t.row_width == 24
    assert t.counters()["memory_bytes"] == t.memory_bytes
    # capacity_hint pre-sizes (no rehash needed for hint rows).
    big = EmbeddingHashTable(dim=8, capacity_hint=1000)
    assert big.capacity == 2048
    cap = big.capacity
    big.insert(np.arange(1000, dtype=np.int64))
    assert big.capacity == cap and big.size == 1000
    # Candidates count towards the load too.
    c = EmbeddingHashTable(dim=1, min_count=5, capacity_hint=1)
    c.lookup_or_insert(np.arange(300, dtype=np.int64))
    assert c.size == 0 and c.num_candidates == 300
    assert_load_ok(c)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
def test_new_rows_in_reused_row_memory_are_fresh(optimizer):
    """Rows freed by eviction (swap-remove leaves old values in the memory behind the last row)
    and then reused by new keys, across growth, read exactly like rows of a fresh table: the
    table skips writing zeros only into memory it has never written (zeros initializer)."""
    dim, rng = 4, np.random.default_rng(3)
    table = EmbeddingHashTable(dim=dim, optimizer=optimizer, initializer="zeros", learning_rate=0.1,
                               capacity_hint=16)
    first = np.arange(1, 41, dtype=np.int64)
    table.lookup_or_insert(first, step=1)
    table.apply_gradients(first, rng.standard_normal((40, dim)).astype(np.float32), step=2)
    table.evict_to_budget(5, "lru")                     # rows 5..39 now hold stale values
    later = np.arange(1000, 1100, dtype=np.int64)       # reuses them, then grows past them
    table.lookup_or_insert(later, step=0)
    fresh = EmbeddingHashTable(dim=dim, optimizer=optimizer, initializer="zeros", learning_rate=0.1)
    fresh.lookup_or_insert(later, step=0)
    got, want = table.export(), fresh.export()
    mine = np.isin(got["keys"], later)
    order, want_order = np.argsort(got["keys"][mine]), np.argsort(want["keys"])
    for name in ("values", "slots", "last_update_step", "update_count"):
        np.testing.assert_array_equal(got[name][mine][order], want[name][want_order], err_msg=name)
    assert not np.any(got["values"][mine]) and got["update_count"][mine].sum() == 0
    # the surviving first keys kept their trained rows
    assert np.any(got["values"][~mine]) and np.all(got["update_count"][~mine] == 1)
