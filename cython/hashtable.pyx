# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The embedding hash table of one rank shard: int64 key -> embedding row + optimizer slots.

What lives here: the open-addressing table, key-seeded row initializers, the lazy sparse
optimizers (SGD, Adagrad, Adam, FTRL), admission by hit count, eviction primitives, and
export/import of every row with its slots and metadata. What does not: MPI, routing of keys to
ranks, TensorFlow. This module never imports mpi4py.

Layout
------
* ``slots``: a power-of-two array of 16-byte records ``{key, row, hits}``, linear probing.
  The start slot is the *high* bits of ``mix64(key ^ SLOT_SALT)``. The owner rank of a key is
  ``mix64(key) % world_size`` (see hybridps.embedding.routing), so every key a shard holds
  shares the low bits of ``mix64(key)`` when the world size is a power of two; a salted hash
  and its high bits keep the shard's own table evenly spread.
  ``row >= 0`` is an admitted key, ``ROW_EMPTY`` an empty slot, ``ROW_CANDIDATE`` a key that
  was counted but not yet admitted (``min_count``): it has no row, reads zeros, gets no update.
  Deletion shifts the following cluster back (no tombstones), so probe chains stay valid and
  lookups never slow down after many erases.
* ``rows``: one contiguous float32 block, ``row_width = dim * (1 + n_optimizer_slots)`` floats
  per row: ``[value | slot_0 | slot_1]``. The value and its optimizer slots therefore live in
  the same row and are always exported together. Rows are compact: erasing a row moves the
  last row into the hole, so ``export()`` is a copy of the first ``size`` rows.
* per-row metadata: key, step of the last update (the row's *version*, used by SSP/ASP
  staleness measurement and TTL eviction) and the row's own update count (Adam bias correction).

Key-seeded initialization
-------------------------
Element ``j`` of a new key's row is drawn from a counter-based generator:
``base = mix64(mix64(seed ^ mix64(table_id + INIT_SALT)) ^ key)`` and the row's stream
``u_k = mix64(base + (k + 1) * GOLDEN)``, k = 0, 1, 2, ... ``uniform`` maps the top 53 bits of
``u_j`` to [0, 1) for element j. ``normal`` draws the elements in order from the stream with the
256-layer ziggurat (Marsaglia and Tsang 2000, in the 64-bit form numpy uses): for a draw u, layer
``i = u & 255``, sign bit ``(u >> 8) & 1``, ``m = (u >> 9) & (2**52 - 1)`` and ``x = m * w[i]``
(negated by the sign bit); ``x`` is accepted at once when ``m < k[i]`` (99% of draws). Otherwise,
for layer 0 the tail beyond r = 3.6541528853610088 is sampled (``xx = -log1p(-U) / r``,
``yy = -log1p(-U)``, repeated until ``2 yy > xx^2``; ``x = ±(r + xx)`` by bit 8 of ``m``), and for
other layers ``x`` is kept when ``f[i] + U (f[i-1] - f[i]) < exp(-x^2 / 2)``, else a new draw
starts; each U is the next stream value's top 53 bits in [0, 1). The tables ``k, w, f`` follow the
usual recursion from r and the layer area v = 4.92867323399e-3 (``_ziggurat_tables``). About 1.01
stream values per element instead of Box-Muller's log, sqrt, cos and sin per pair: a new row
costs about a sixth as much. The row is therefore a pure function of (seed, table_id, key):
independent of rank count, owner, order of arrival and table capacity.

Optimizers (lazy: only rows whose key appears in a gradient batch change; duplicates summed)
--------------------------------------------------------------------------------------------
* sgd:      w -= lr * g
* adagrad:  a += g^2;  w -= lr * g / (sqrt(a) + eps)           (a starts at initial_accumulator)
* adam:     t = row's own update count + 1; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
            w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
            Bias correction uses the row's own count t, not the global step: a rare key's first
            update is then a full-size step, as it would be for a dense parameter seen at step 1.
* adam with adam_catch_up (Keras's Adam on a dense table, computed lazily): t = step + 1
            (the global update number; steps count from 0) and Keras's form
            w -= alpha_t m / (sqrt(v) + eps), alpha_t = lr sqrt(1 - b2^t) / (1 - b1^t).
            A row last updated at step s and touched again at step > s + 1 first applies the
            k = step - s - 1 steps it skipped, as Keras does to a row whose gradient is zero:
            for i = 1..k, w -= alpha_(s+1+i) b1^i m / (b2^(i/2) sqrt(v) + eps), then
            m *= b1^k, v *= b2^k. The moves shrink by b1 / sqrt(b2) per skipped step: the first
            ``catch_up_terms`` (198 for the default betas, where that factor reaches 1e-9) are
            applied exactly, later ones dropped (at most 1024). Same slots as lazy Adam: the
            steps of the last update are the rows' versions, which checkpoints already hold.
            Rows not touched since their last update wait with their skipped steps until their
            next update (a read or export sees them as of that update).
* ftrl:     TensorFlow's FTRL-proximal (lr_power = -0.5), slots (accumulator n, linear z):
            n' = n + g^2;  z += g - (sqrt(n') - sqrt(n)) / lr * w;
            w = (sign(z) l1 - z) / (sqrt(n') / lr + 2 l2)  if |z| > l1 else 0
"""

from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t
from mix64 cimport mix64_c
from slots cimport scratch_slots, slot_shift
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memcpy
from libc.math cimport sqrt, log, log1p, exp, pow, fabs, isfinite

cimport cython
import numpy as np

from hybridps.errors import TableFullError, TableInputError, NonFiniteGradientError, ConfigError

cdef extern from *:
    """
    #include <sys/mman.h>
    #include <stdlib.h>
    #include <string.h>
    /* Every block starts zeroed and is never written by the allocator, so a new table costs
       no writes. Blocks of HPS_MAP_MIN bytes or more are anonymous mappings of their own
       (fresh zero pages, advised as transparent huge pages: random slot probes then miss the
       TLB far less, and filling a table faults in 512x fewer pages) and grow with mremap: the
       kernel moves the pages, nothing is copied, and the old and the new block never both
       exist, so a table can grow by small steps (HPS_GROWTH) without a transient peak of old
       plus new. Smaller blocks come from calloc. A 64-byte header in front of each block says
       which (the block stays cache-line aligned); release with hps_free only. */
    #define HPS_HEADER 64
    #define HPS_MAP_MIN ((size_t)1 << 20)
    typedef struct { size_t mapped; size_t is_mapping; } hps_header;
    static void hps_advise(void* p, size_t nbytes) {
    #ifdef MADV_HUGEPAGE
        if (nbytes >= ((size_t)2 << 20)) madvise(p, nbytes, MADV_HUGEPAGE);
    #endif
    }
    static void* hps_calloc(size_t nbytes) {
        char* p;
        if (nbytes < HPS_MAP_MIN) {
            p = (char*)calloc(1, nbytes + HPS_HEADER);
            if (p == NULL) return NULL;
            ((hps_header*)p)->is_mapping = 0;
        } else {
            size_t total = nbytes + HPS_HEADER;
            p = (char*)mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == (char*)MAP_FAILED) return NULL;
            hps_advise(p, total);
            ((hps_header*)p)->is_mapping = 1;
            ((hps_header*)p)->mapped = total;
        }
        return p + HPS_HEADER;
    }
    static void hps_free(void* block) {
        if (block == NULL) return;
        char* p = (char*)block - HPS_HEADER;
        if (((hps_header*)p)->is_mapping) munmap(p, ((hps_header*)p)->mapped);
        else free(p);
    }
    /* A larger zeroed block holding the first used_bytes of old (the bytes of old beyond them
       must be zeros: nobody has written them). */
    static void* hps_grow_zeroed(void* old, size_t used_bytes, size_t new_bytes) {
        if (old != NULL) {
            char* p = (char*)old - HPS_HEADER;
            hps_header* h = (hps_header*)p;
            if (h->is_mapping && new_bytes + HPS_HEADER > h->mapped) {
                size_t total = new_bytes + HPS_HEADER;
                char* q = (char*)mremap(p, h->mapped, total, MREMAP_MAYMOVE);
                if (q == (char*)MAP_FAILED) return NULL;      /* old is still valid */
                ((hps_header*)q)->mapped = total;
                hps_advise(q, total);
                return q + HPS_HEADER;
            }
        }
        void* fresh = hps_calloc(new_bytes);
        if (fresh == NULL) return NULL;
        if (old != NULL && used_bytes) memcpy(fresh, old, used_bytes < new_bytes ? used_bytes : new_bytes);
        hps_free(old);
        return fresh;
    }
    #define HPS_PREFETCH(p) __builtin_prefetch((const void*)(p), 1, 3)
    /* The hot optimizer loops (SGD, Adagrad) in float32 over restrict pointers, so the compiler
       vectorizes them (a row's weights, its accumulator and the summed gradient never
       overlap). float32 is the arithmetic of the Keras optimizers these rows are compared with. */
    static void hps_sgd_row(float* restrict w, const float* restrict g, int dim, float lr) {
        for (int j = 0; j < dim; j++) w[j] -= lr * g[j];
    }
    static void hps_adagrad_row(float* restrict w, float* restrict acc, const float* restrict g,
                                int dim, float lr, float eps) {
        for (int j = 0; j < dim; j++) {
            float a = acc[j] + g[j] * g[j];
            acc[j] = a;
            w[j] -= lr * g[j] / (sqrtf(a) + eps);
        }
    }
    /* Adam in the form of Keras's update: m += (g - m)(1-b1); v += (g^2 - v)(1-b2);
       w -= alpha m / (sqrt(v) + eps). The bias correction is folded into alpha (and, for the
       lazy Adam's m_hat / (sqrt(v_hat) + eps), into eps), so no pow and no double here.
       c1 = 1 - b1 and c2 = 1 - b2 come rounded from double (1 - 0.999f is 1.3e-5 off). */
    static void hps_adam_row(float* restrict w, float* restrict m, float* restrict v,
                             const float* restrict g, int dim, float c1, float c2,
                             float alpha, float eps) {
        for (int j = 0; j < dim; j++) {
            float mj = m[j] + (g[j] - m[j]) * c1;
            float vj = v[j] + (g[j] * g[j] - v[j]) * c2;
            m[j] = mj;
            v[j] = vj;
            w[j] -= alpha * mj / (sqrtf(vj) + eps);
        }
    }
    /* The skipped steps of a catch-up Adam row: n steps of Keras's update with a zero
       gradient, w -= a[i] m / (c[i] sqrt(v) + eps) where a[i] is that step's alpha times
       b1^(i+1) and c[i] = b2^((i+1)/2) (the decayed moments, from the row's m and v); then the
       moments decay by d1 = b1^gap, d2 = b2^gap. s: scratch for sqrt(v), dim floats. */
    static void hps_adam_catch_up_row(float* restrict w, float* restrict m, float* restrict v,
                                      float* restrict s, int dim, int n, const float* restrict a,
                                      const float* restrict c, float eps, float d1, float d2) {
        for (int j = 0; j < dim; j++) s[j] = sqrtf(v[j]);
        for (int i = 0; i < n; i++) {
            float ai = a[i], ci = c[i];
            for (int j = 0; j < dim; j++) w[j] -= ai * m[j] / (ci * s[j] + eps);
        }
        for (int j = 0; j < dim; j++) {
            m[j] *= d1;
            v[j] *= d2;
        }
    }
    """
    void HPS_PREFETCH(const void* p) noexcept nogil
    void* hps_grow_zeroed(void* old, size_t used_bytes, size_t new_bytes) noexcept nogil
    void* hps_calloc(size_t nbytes) noexcept nogil
    void hps_free(void* block) noexcept nogil
    void hps_sgd_row(float* w, const float* g, int dim, float lr) noexcept nogil
    void hps_adagrad_row(float* w, float* acc, const float* g, int dim, float lr, float eps) noexcept nogil
    void hps_adam_row(float* w, float* m, float* v, const float* g, int dim, float c1, float c2,
                      float alpha, float eps) noexcept nogil
    void hps_adam_catch_up_row(float* w, float* m, float* v, float* s, int dim, int n,
                               const float* a, const float* c, float eps, float d1, float d2) noexcept nogil

ctypedef struct Slot:
    int64_t key
    int32_t ref      # ~row: read and write only through slot_row / set_slot_row
    uint32_t hits


# A slot's row is stored bit-inverted so that an all-zero slot is empty (~ROW_EMPTY == 0):
# tables are allocated with calloc and never written slot by slot before use.
cdef inline int32_t slot_row(const Slot* s) noexcept nogil:
    return ~s.ref


cdef inline void set_slot_row(Slot* s, int32_t row) noexcept nogil:
    s.ref = ~row

cdef enum:
    ROW_EMPTY = -1
    ROW_CANDIDATE = -3
    PREFETCH_DISTANCE = 16        # a power of two (the ring of home slots is indexed by a mask)
    ROW_PREFETCH_DISTANCE = 8     # < PREFETCH_DISTANCE: the ring still holds that key's home
    RUN_DONE = 0
    RUN_NEED_SLOTS = 1
    RUN_NEED_ROWS = 2
    RUN_TABLE_FULL = 3

cdef uint64_t SLOT_SALT = 0x5851F42D4C957F2DULL
cdef uint64_t INIT_SALT = 0x2545F4914F6CDD1DULL
cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL
# Linear probing over 16-byte slots (4 per cache line): at a load of 0.7 a hit probes 2.2
# slots on average, mostly in the same line; the slots then cost 23-46 bytes per row.
cdef double MAX_LOAD = 0.7
cdef int64_t ROW_GROWTH_DOUBLING_BELOW = 1 << 16
cdef int64_t MAX_ROWS_INT32 = 2147483647
# Adam: alpha(t) and sqrt(1 - beta2^t) are tabulated for t below the step where beta1^t and
# beta2^t fall under ADAM_TABLE_TOLERANCE (at most ADAM_TABLE_MAX entries; beyond, computed).
cdef double ADAM_TABLE_TOLERANCE = 1e-9
cdef int64_t ADAM_TABLE_MAX = 1 << 16
# Catch-up Adam: a skipped step's move shrinks by beta1 / sqrt(beta2) per step (0.9 / sqrt(0.999)
# = 0.90045 by default); the skipped steps are applied one by one until that factor falls under
# CATCH_UP_TOLERANCE (198 steps by default), at most CATCH_UP_MAX_TERMS; later ones are dropped.
cdef double CATCH_UP_TOLERANCE = 1e-9
cdef int CATCH_UP_MAX_TERMS = 1024

OPTIMIZERS = {"sgd": 0, "adagrad": 1, "adam": 2, "ftrl": 3}
OPTIMIZER_SLOT_NAMES = {"sgd": (), "adagrad": ("accumulator",), "adam": ("m", "v"),
                        "ftrl": ("accumulator", "linear")}
INITIALIZERS = {"zeros": 0, "normal": 1, "uniform": 2}
ON_FULL = ("raise", "refuse")
NONFINITE = ("raise", "skip")


def mix64(keys):
    """splitmix64 of int64 keys, as uint64 (the mixer behind owner ranks and buckets).

    Args:
        keys: array-like of int64.
    Returns:
        uint64 array of the same length.
    """
    cdef const int64_t[::1] k = _as_keys(keys, "keys")
    out = np.empty(k.shape[0], dtype=np.uint64)
    cdef uint64_t[::1] o = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(k.shape[0]):
            o[i] = mix64_c(<uint64_t>k[i])
    return out


cdef inline double unit_double(uint64_t u) noexcept nogil:
    return <double>(u >> 11) * (1.0 / 9007199254740992.0)


# The 256-layer ziggurat of the standard normal (see the module docstring), filled at import.
cdef double ZIG_R = 3.6541528853610088
cdef double ZIG_AREA = 4.92867323399e-3
cdef uint64_t zig_k[256]
cdef double zig_w[256]
cdef double zig_f[256]


def _ziggurat_tables():
    """(k, w, f) of the 256-layer ziggurat for 52-bit magnitudes (Marsaglia and Tsang's
    recursion, as in numpy's ziggurat_constants.h): lists of 256 ints / floats."""
    import math
    m = 2.0 ** 52
    k, w, f = [0] * 256, [0.0] * 256, [0.0] * 256
    dn = tn = ZIG_R
    q = ZIG_AREA / math.exp(-0.5 * dn * dn)
    k[0] = int((dn / q) * m)
    k[1] = 0
    w[0] = q / m
    w[255] = dn / m
    f[0] = 1.0
    f[255] = math.exp(-0.5 * dn * dn)
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(ZIG_AREA / dn + math.exp(-0.5 * dn * dn)))
        k[i + 1] = int((dn / tn) * m)
        tn = dn
        f[i] = math.exp(-0.5 * dn * dn)
        w[i] = dn / m
    return k, w, f


def _fill_ziggurat():
    k, w, f = _ziggurat_tables()
    for i in range(256):
        zig_k[i] = k[i]
        zig_w[i] = w[i]
        zig_f[i] = f[i]


_fill_ziggurat()


cdef inline double stream_unit(uint64_t base, uint64_t* counter) noexcept nogil:
    counter[0] += 1
    return unit_double(mix64_c(base + counter[0] * GOLDEN))


cdef inline double ziggurat_normal(uint64_t base, uint64_t* counter) noexcept nogil:
    # One standard normal from the row's stream; counter[0] counts the values used so far.
    cdef uint64_t u, magnitude
    cdef int layer
    cdef double x, xx, yy
    while True:
        counter[0] += 1
        u = mix64_c(base + counter[0] * GOLDEN)
        layer = <int>(u & 0xFF)
        magnitude = (u >> 9) & 0x000FFFFFFFFFFFFFULL
        # the sign bit as a factor, not a branch: a coin flip is mispredicted half the time
        x = <double>magnitude * zig_w[layer] * <double>(1 - 2 * <int>((u >> 8) & 1))
        if magnitude < zig_k[layer]:
            return x
        if layer == 0:       # the tail beyond ZIG_R
            while True:
                xx = -log1p(-stream_unit(base, counter)) / ZIG_R
                yy = -log1p(-stream_unit(base, counter))
                if yy + yy > xx * xx:
                    return -(ZIG_R + xx) if (magnitude >> 8) & 1 else ZIG_R + xx
        elif zig_f[layer] + stream_unit(base, counter) * (zig_f[layer - 1] - zig_f[layer]) < exp(-0.5 * x * x):
            return x


cdef void init_row(float* row, int dim, int kind, uint64_t seed, int64_t table_id,
                   int64_t key, double a, double b) noexcept nogil:
    # a, b: (mean, std) for normal, (low, high) for uniform.
    cdef uint64_t base
    cdef uint64_t counter = 0
    cdef int j
    if kind == 0:
        memset(row, 0, dim * sizeof(float))
        return
    base = mix64_c(mix64_c(seed ^ mix64_c(<uint64_t>table_id + INIT_SALT)) ^ <uint64_t>key)
    if kind == 2:
        for j in range(dim):
            row[j] = <float>(a + (b - a) * unit_double(mix64_c(base + <uint64_t>(j + 1) * GOLDEN)))
    else:
        for j in range(dim):
            row[j] = <float>(a + b * ziggurat_normal(base, &counter))


cdef object _as_keys(object keys, str name):
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise TableInputError(f"{name} must be a 1-D array of int64 keys, got shape {arr.shape}")
    if arr.dtype != np.int64:
        if arr.size == 0 or arr.dtype.kind == "i":
            arr = arr.astype(np.int64)
        else:
            raise TableInputError(
                f"{name} must hold int64 keys, got dtype {arr.dtype}; convert with "
                f"np.asarray(keys, dtype=np.int64) (hash strings with hybridps.data.hashing)")
    return np.ascontiguousarray(arr)


cdef object _as_rows(object values, Py_ssize_t n, int width, str name):
    arr = np.asarray(values)
    if arr.dtype != np.float32:
        raise TableInputError(f"{name} must be float32, got dtype {arr.dtype}; "
                              f"convert with np.asarray({name}, dtype=np.float32)")
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] != width:
        raise TableInputError(f"{name} must have shape ({n}, {width}) to match the keys and the "
                              f"table's dim, got {arr.shape}")
    return np.ascontiguousarray(arr)


cdef object _as_meta(object values, Py_ssize_t n, str name):
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.int64))
    if arr.shape != (n,):
        raise TableInputError(f"{name} must have shape ({n},) to match the keys, got {arr.shape}")
    return arr


@cython.final      # cdef methods are then called directly (and inlined), not through a vtable
cdef class EmbeddingHashTable:
    """One rank's shard of an embedding table: int64 key -> float32 row with optimizer slots.

    Example::

        table = EmbeddingHashTable(dim=16, optimizer="adagrad", learning_rate=0.05)
        rows = table.lookup_or_insert(np.array([7, 42, 7]))       # (3, 16) float32
        table.apply_gradients(np.array([7, 42]), grads, step=1)   # lazy Adagrad on 2 rows

    Row indices (from ``find``) are valid until the next call that erases rows.
    Not thread-safe: callers that share a table between threads hold their own lock.
    """
    cdef Slot* slots
    cdef uint64_t n_slots
    cdef uint64_t mask
    cdef int shift
    cdef int64_t used_slots
    cdef float* rows
    cdef int64_t* row_keys
    cdef int64_t* row_last_update
    cdef int64_t* row_update_count
    cdef int64_t n_rows
    cdef int64_t row_capacity
    # Rows [rows_written, row_capacity) have never been written since their (calloc'd) memory
    # was allocated: they are all zeros, so a new row there skips writing zeros (values of the
    # zeros initializer, Adam's and FTRL's zero slots, update count 0, version 0). The pages are
    # then first touched by the row's first update instead of by the insert.
    cdef int64_t rows_written
    cdef readonly int dim
    cdef readonly int row_width
    cdef readonly int n_optimizer_slots
    cdef readonly int64_t table_id
    cdef readonly uint64_t seed
    cdef int optimizer_kind
    cdef int initializer_kind
    cdef readonly str optimizer
    cdef readonly str initializer
    cdef double lr, beta1, beta2, epsilon, initial_accumulator, l1, l2
    cdef double init_a, init_b
    cdef readonly bint adam_catch_up
    cdef readonly int catch_up_terms      # skipped steps applied one by one (catch-up Adam)
    cdef int64_t adam_table_len
    cdef bint adam_table_complete         # beyond the table, alpha(t) = lr within its tolerance
    cdef float* adam_alpha                # alpha(t) = lr sqrt(1 - beta2^t) / (1 - beta1^t)
    cdef float* adam_sqrt_bias2           # sqrt(1 - beta2^t)
    cdef float* catch_up_a                # scratch: each skipped step's alpha * beta1^(i+1)
    cdef float* catch_up_c                # beta2^((i+1)/2), i < catch_up_terms
    cdef float* catch_up_s                # scratch: sqrt(v) of a row (dim floats)
    cdef readonly int64_t min_count
    cdef readonly int64_t max_rows
    cdef readonly str on_full
    cdef readonly str nonfinite
    cdef bint skip_nonfinite
    # counters: every refused, dropped, skipped or evicted thing is counted here
    cdef readonly int64_t admitted_keys
    cdef readonly int64_t refused_inserts
    cdef readonly int64_t evicted_rows
    cdef readonly int64_t dropped_unadmitted_grads
    cdef readonly int64_t dropped_missing_grads
    cdef readonly int64_t skipped_nonfinite_grads
    cdef readonly int64_t applied_row_updates
    cdef object evicted_log            # None, or key arrays erased by eviction (tombstones)

    def __cinit__(self, int dim, str optimizer="sgd", double learning_rate=0.01,
                  str initializer="normal", double init_mean=0.0, double init_std=0.01,
                  double init_low=-0.05, double init_high=0.05, uint64_t seed=0,
                  int64_t table_id=0, double beta1=0.9, double beta2=0.999,
                  double epsilon=1e-7, double initial_accumulator=0.1, double l1=0.0,
                  double l2=0.0, int64_t min_count=1, int64_t max_rows=0,
                  str on_full="raise", str nonfinite="raise", int64_t capacity_hint=1024,
                  bint adam_catch_up=False):
        if dim <= 0:
            raise ConfigError(f"dim must be a positive integer, got {dim}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if initializer not in INITIALIZERS:
            raise ConfigError(f"initializer must be one of {sorted(INITIALIZERS)}, got {initializer!r}")
        if on_full not in ON_FULL:
            raise ConfigError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        if nonfinite not in NONFINITE:
            raise ConfigError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
        if adam_catch_up and optimizer != "adam":
            raise ConfigError(f"adam_catch_up applies to the adam optimizer, got {optimizer!r}")
        if optimizer == "adam" and not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ConfigError(f"adam needs 0 <= beta1 < 1 and 0 <= beta2 < 1, got {beta1}, {beta2}")
        if optimizer == "ftrl" and initial_accumulator <= 0:
            raise ConfigError("ftrl needs initial_accumulator > 0")
        if min_count < 1:
            raise ConfigError(f"min_count must be >= 1, got {min_count}")
        if max_rows < 0 or max_rows > MAX_ROWS_INT32:
            raise ConfigError(f"max_rows must be in [0, {MAX_ROWS_INT32}] (0 = unlimited), got {max_rows}")
        if initializer == "uniform" and not init_low < init_high:
            raise ConfigError(f"uniform initializer needs init_low < init_high, got {init_low}, {init_high}")
        if initializer == "normal" and init_std < 0:
            raise ConfigError(f"normal initializer needs init_std >= 0, got {init_std}")
        self.dim = dim
        self.optimizer = optimizer
        self.optimizer_kind = OPTIMIZERS[optimizer]
        self.n_optimizer_slots = len(OPTIMIZER_SLOT_NAMES[optimizer])
        self.row_width = dim * (1 + self.n_optimizer_slots)
        self.initializer = initializer
        self.initializer_kind = INITIALIZERS[initializer]
        self.init_a, self.init_b = (init_mean, init_std) if initializer == "normal" else (init_low, init_high)
        self.seed = seed
        self.table_id = table_id
        self.lr = learning_rate
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.initial_accumulator, self.l1, self.l2 = initial_accumulator, l1, l2
        self.min_count, self.max_rows = min_count, max_rows
        self.on_full, self.nonfinite = on_full, nonfinite
        self.skip_nonfinite = nonfinite == "skip"
        self.adam_catch_up = adam_catch_up
        if optimizer == "adam":
            self._make_adam_tables()
        cdef uint64_t cap = 16
        while cap * MAX_LOAD < capacity_hint:
            cap <<= 1
        self._alloc_slots(cap)
        self._reserve_rows(max(16, min(capacity_hint, max_rows if max_rows else capacity_hint)))

    def __dealloc__(self):
        hps_free(self.slots)
        hps_free(self.rows)
        hps_free(self.row_keys)
        hps_free(self.row_last_update)
        hps_free(self.row_update_count)
        free(self.adam_alpha)
        free(self.adam_sqrt_bias2)
        free(self.catch_up_a)
        free(self.catch_up_c)
        free(self.catch_up_s)

    cdef void _make_adam_tables(self) except *:
        import math
        cdef int64_t t, n = 2
        cdef int i
        for beta in (self.beta1, self.beta2):
            if beta > 0:
                n = max(n, <int64_t>math.ceil(math.log(ADAM_TABLE_TOLERANCE) / math.log(beta)) + 2)
        self.adam_table_len = min(n, ADAM_TABLE_MAX)
        self.adam_table_complete = n <= ADAM_TABLE_MAX
        self.adam_alpha = <float*>malloc(self.adam_table_len * sizeof(float))
        self.adam_sqrt_bias2 = <float*>malloc(self.adam_table_len * sizeof(float))
        if self.adam_alpha == NULL or self.adam_sqrt_bias2 == NULL:
            raise MemoryError("cannot allocate the Adam tables")
        self.adam_alpha[0] = self.adam_sqrt_bias2[0] = 0.0          # t = 0 is never used
        for t in range(1, self.adam_table_len):
            self.adam_alpha[t] = <float>self._adam_alpha_of(t)
            self.adam_sqrt_bias2[t] = <float>sqrt(1.0 - pow(self.beta2, <double>t))
        if not self.adam_catch_up:
            return
        ratio = self.beta1 / math.sqrt(self.beta2) if self.beta2 > 0 else 0.0
        self.catch_up_terms = CATCH_UP_MAX_TERMS if ratio >= 1 else max(1, min(
            CATCH_UP_MAX_TERMS, math.ceil(math.log(CATCH_UP_TOLERANCE) / math.log(ratio)) if ratio > 0 else 1))
        self.catch_up_a = <float*>malloc(self.catch_up_terms * sizeof(float))
        self.catch_up_c = <float*>malloc(self.catch_up_terms * sizeof(float))
        self.catch_up_s = <float*>malloc(self.dim * sizeof(float))
        if self.catch_up_a == NULL or self.catch_up_c == NULL or self.catch_up_s == NULL:
            raise MemoryError("cannot allocate the catch-up Adam tables")
        for i in range(self.catch_up_terms):
            self.catch_up_c[i] = <float>pow(self.beta2, 0.5 * (i + 1))

    cdef inline double _adam_alpha_of(self, int64_t t) noexcept nogil:
        # The step size at update number t >= 1: lr sqrt(1 - beta2^t) / (1 - beta1^t). Catch-up
        # Adam takes the betas as float32 here, as Keras does (its cast of the Python floats
        # goes through float32: 1 - 0.999f is 1.3e-5 off 0.001, so the first steps differ by
        # 6.6e-6 relative from the real-number formula).
        cdef double b1 = <float>self.beta1 if self.adam_catch_up else self.beta1
        cdef double b2 = <float>self.beta2 if self.adam_catch_up else self.beta2
        return self.lr * sqrt(1.0 - pow(b2, <double>t)) / (1.0 - pow(b1, <double>t))

    cdef inline float _adam_alpha(self, int64_t t) noexcept nogil:
        if t < self.adam_table_len:
            return self.adam_alpha[t]
        return <float>self.lr if self.adam_table_complete else <float>self._adam_alpha_of(t)

    cdef inline float _adam_sqrt_bias2(self, int64_t t) noexcept nogil:
        return self.adam_sqrt_bias2[t] if t < self.adam_table_len else \
            <float>sqrt(1.0 - pow(self.beta2, <double>t))

    # ------------------------------------------------------------------ memory management
    cdef void _alloc_slots(self, uint64_t cap) except *:
        # Zeroed memory is all-empty slots (see slot_row), so a new table costs no writes.
        cdef Slot* fresh = <Slot*>hps_calloc(cap * sizeof(Slot))
        if fresh == NULL:
            raise MemoryError(f"cannot allocate {cap} hash slots ({cap * sizeof(Slot)} bytes)")
        self.slots = fresh
        self.n_slots = cap
        self.mask = cap - 1
        self.shift = slot_shift(cap)
        self.used_slots = 0

    cdef void _rehash(self, uint64_t new_cap) except *:
        cdef Slot* old = self.slots
        cdef uint64_t old_cap = self.n_slots, i, j
        self._alloc_slots(new_cap)
        with nogil:
            for i in range(old_cap):
                if slot_row(&old[i]) != ROW_EMPTY:
                    j = self._home(old[i].key)
                    while slot_row(&self.slots[j]) != ROW_EMPTY:
                        j = (j + 1) & self.mask
                    self.slots[j] = old[i]
                    self.used_slots += 1
        hps_free(old)

    cdef void _reserve_slots(self, int64_t extra) except *:
        cdef uint64_t cap = self.n_slots
        while (self.used_slots + extra) > cap * MAX_LOAD:
            cap <<= 1
        if cap != self.n_slots:
            self._rehash(cap)

    cdef void _reserve_rows(self, int64_t needed) except *:
        if self.max_rows and needed > self.max_rows:
            needed = self.max_rows
        if needed <= self.row_capacity:
            return
        # small tables double; large ones (mremap: nothing copied) grow by an eighth, so a
        # table holds at most 12.5% of its row memory unused (and never touches those pages)
        cdef int64_t step = self.row_capacity if self.row_capacity < ROW_GROWTH_DOUBLING_BELOW \
            else self.row_capacity // 8
        cdef int64_t cap = max(needed, self.row_capacity + step)
        if self.max_rows and cap > self.max_rows:
            cap = self.max_rows
        if cap > MAX_ROWS_INT32:
            cap = MAX_ROWS_INT32
        cdef int64_t used = self.rows_written    # rows beyond it are zeros in both blocks
        cdef float* rows = <float*>hps_grow_zeroed(self.rows, used * self.row_width * sizeof(float),
                                                   cap * self.row_width * sizeof(float))
        if rows != NULL: self.rows = rows
        cdef int64_t* keys = <int64_t*>hps_grow_zeroed(self.row_keys, used * 8, cap * 8)
        if keys != NULL: self.row_keys = keys
        cdef int64_t* last = <int64_t*>hps_grow_zeroed(self.row_last_update, used * 8, cap * 8)
        if last != NULL: self.row_last_update = last
        cdef int64_t* count = <int64_t*>hps_grow_zeroed(self.row_update_count, used * 8, cap * 8)
        if count != NULL: self.row_update_count = count
        if rows == NULL or keys == NULL or last == NULL or count == NULL:
            raise MemoryError(f"cannot grow the embedding table to {cap} rows of {self.row_width} floats")
        self.row_capacity = cap

    # ------------------------------------------------------------------ probing
    cdef inline uint64_t _home(self, int64_t key) noexcept nogil:
        return mix64_c(<uint64_t>key ^ SLOT_SALT) >> self.shift

    cdef inline uint64_t _probe(self, int64_t key) noexcept nogil:
        # The slot holding `key`, or the empty slot where it would be inserted.
        return self._probe_from(key, self._home(key))

    cdef inline uint64_t _probe_from(self, int64_t key, uint64_t home) noexcept nogil:
        # _probe when the key's home slot is already known.
        cdef uint64_t i = home
        while True:
            if slot_row(&self.slots[i]) == ROW_EMPTY or self.slots[i].key == key:
                return i
            i = (i + 1) & self.mask

    # Batched loops prefetch in two stages: the slot of the key PREFETCH_DISTANCE ahead, then,
    # ROW_PREFETCH_DISTANCE ahead (its slot has arrived by then), the per-row data the loop
    # will touch, when the key sits in its home slot (most keys do: about 65% at the maximum load of 0.7). Rows live
    # in random places of a large block, so without the second stage every row and metadata
    # access is a cache miss the loop waits for.
    # The loops keep the home slots of the keys ahead in a ring of PREFETCH_DISTANCE entries,
    # so each key is hashed once (``_ring_start`` / ``_ring_next``).
    cdef inline int32_t _home_row(self, int64_t key, uint64_t home) noexcept nogil:
        cdef Slot* s = &self.slots[home]
        return slot_row(s) if s.key == key else -1

    cdef inline void _prefetch_row_for_lookup(self, int64_t key, uint64_t home) noexcept nogil:
        cdef int32_t r = self._home_row(key, home)
        if r >= 0:
            HPS_PREFETCH(self.rows + <int64_t>r * self.row_width)
            HPS_PREFETCH(&self.row_last_update[r])

    cdef inline void _ring_start(self, const int64_t[::1] k, Py_ssize_t start,
                                 uint64_t* ring) noexcept nogil:
        # Hash and prefetch the first PREFETCH_DISTANCE keys from ``start``.
        cdef Py_ssize_t j
        cdef Py_ssize_t n = k.shape[0]
        for j in range(start, start + PREFETCH_DISTANCE if start + PREFETCH_DISTANCE < n else n):
            ring[j & (PREFETCH_DISTANCE - 1)] = self._home(k[j])
            HPS_PREFETCH(&self.slots[ring[j & (PREFETCH_DISTANCE - 1)]])

    cdef inline uint64_t _ring_next(self, const int64_t[::1] k, Py_ssize_t i,
                                    uint64_t* ring) noexcept nogil:
        # The home slot of key i; hashes and prefetches key i + PREFETCH_DISTANCE in its place.
        cdef uint64_t home = ring[i & (PREFETCH_DISTANCE - 1)]
        cdef Py_ssize_t ahead = i + PREFETCH_DISTANCE
        if ahead < k.shape[0]:
            ring[ahead & (PREFETCH_DISTANCE - 1)] = self._home(k[ahead])
            HPS_PREFETCH(&self.slots[ring[ahead & (PREFETCH_DISTANCE - 1)]])
        return home

    cdef void _delete_slot(self, uint64_t i) noexcept nogil:
        # Backward-shift deletion for linear probing: pull later members of the cluster back
        # into the hole when their home slot lies cyclically at or before it.
        cdef uint64_t j = i, home
        while True:
            j = (j + 1) & self.mask
            if slot_row(&self.slots[j]) == ROW_EMPTY:
                break
            home = self._home(self.slots[j].key)
            if ((j - home) & self.mask) >= ((j - i) & self.mask):
                self.slots[i] = self.slots[j]
                i = j
        set_slot_row(&self.slots[i], ROW_EMPTY)
        self.used_slots -= 1

    cdef void _remove_row(self, int64_t r) noexcept nogil:
        # Swap-remove: move the last row into r and repoint its slot.
        cdef int64_t last = self.n_rows - 1
        if r != last:
            memcpy(self.rows + r * self.row_width, self.rows + last * self.row_width,
                   self.row_width * sizeof(float))
            self.row_keys[r] = self.row_keys[last]
            self.row_last_update[r] = self.row_last_update[last]
            self.row_update_count[r] = self.row_update_count[last]
            set_slot_row(&self.slots[self._probe(self.row_keys[r])], <int32_t>r)
        self.n_rows -= 1

    cdef void _init_row(self, int64_t r, int64_t key, int64_t step) noexcept nogil:
        cdef float* row = self.rows + r * self.row_width
        cdef int j
        cdef bint zeroed = r >= self.rows_written     # never written: all zeros already
        if zeroed:
            self.rows_written = r + 1
        if not (zeroed and self.initializer_kind == 0):
            init_row(row, self.dim, self.initializer_kind, self.seed, self.table_id, key,
                     self.init_a, self.init_b)
        if self.optimizer_kind == 1 or self.optimizer_kind == 3:   # adagrad, ftrl: accumulator
            for j in range(self.dim):
                row[self.dim + j] = <float>self.initial_accumulator
            if self.optimizer_kind == 3 and not zeroed:
                memset(row + 2 * self.dim, 0, self.dim * sizeof(float))
        elif self.optimizer_kind == 2 and not zeroed:               # adam: m, v
            memset(row + self.dim, 0, 2 * self.dim * sizeof(float))
        self.row_keys[r] = key
        if step != 0 or not zeroed:
            self.row_last_update[r] = step
        if not zeroed:
            self.row_update_count[r] = 0

    # ------------------------------------------------------------------ batched operations
    def find(self, keys, out=None):
        """Row index of each key, -1 where the key is absent or not yet admitted.

        Args:
            keys: 1-D int64 array.
            out: optional int64 array of the same length to fill.
        Returns:
            int64 array of row indices (valid until the next erase or eviction).
        """
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0], i
        if out is None:
            out = np.empty(n, dtype=np.int64)
        else:
            _check_int64_out(out, n, "out")
        cdef const int64_t[::1] k = keys
        cdef int64_t[::1] o = out
        cdef int32_t row
        cdef uint64_t ring[PREFETCH_DISTANCE]
        with nogil:
            self._ring_start(k, 0, ring)
            for i in range(n):
                row = slot_row(&self.slots[self._probe_from(k[i], self._ring_next(k, i, ring))])
                o[i] = row if row >= 0 else -1
        return out

    def read(self, keys, out=None):
        """Rows (embedding values) of the keys the table holds, zeros for any other key; the
        table is not changed (no insert, no hit counted, no admission): the read of evaluation
        and prediction, which reads what an exported model reads for an unseen key.

        Args:
            keys: 1-D int64 array (duplicates allowed).     # IN
            out: optional float32 array (len(keys), dim).    # OUT
        Returns:
            the float32 array of rows, shape (len(keys), dim).
        """
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0], i
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float32)
        else:
            _check_out(out, n, self.dim)
        cdef const int64_t[::1] k = keys
        cdef float[:, ::1] o = out
        cdef int32_t row
        cdef uint64_t ring[PREFETCH_DISTANCE]
        with nogil:
            self._ring_start(k, 0, ring)
            for i in range(n):
                row = slot_row(&self.slots[self._probe_from(k[i], self._ring_next(k, i, ring))])
                if row >= 0:
                    memcpy(&o[i, 0], self.rows + <int64_t>row * self.row_width, self.dim * sizeof(float))
                else:
                    memset(&o[i, 0], 0, self.dim * sizeof(float))
        return out

    def lookup_or_insert(self, keys, out=None, int64_t step=0, versions=None, bint count_hits=True):
        """Rows (embedding values) of the keys, inserting new keys with their key-seeded row.

        Each occurrence of a key counts one hit. A key whose hit count is below ``min_count``
        is kept as a candidate: it reads zeros and has no row. When the table holds
        ``max_rows`` rows, a new row is refused (counted, reads zeros) or raises, by ``on_full``.

        Args:
            keys: 1-D int64 array (duplicates allowed).
            out: optional float32 array (len(keys), dim) to fill; a new one when None.
            step: training step, recorded as the version of newly inserted rows.
            versions: optional int64 array (len(keys),) filled with each row's last-update
                step (-1 for keys that read zeros).
            count_hits: count this call towards admission and LFU (default True).
        Returns:
            the float32 array of rows, shape (len(keys), dim).
        Raises:
            TableInputError: bad dtype or shape. TableFullError: max_rows reached, on_full=raise
            (keys before the failing one were inserted).
        """
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0]
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float32)
        else:
            _check_out(out, n, self.dim)
        self._run_lookup_insert(keys, out, step, versions, count_hits, True)
        return out

    def insert(self, keys, int64_t step=0, bint count_hits=True):
        """Insert keys (key-seeded rows, admission and capacity as in lookup_or_insert)
        without gathering their rows: the way to pre-populate a table.

        Returns:
            number of rows the table holds afterwards.
        """
        keys = _as_keys(keys, "keys")
        self._run_lookup_insert(keys, np.empty((1, self.dim), dtype=np.float32), step, None,
                                count_hits, False)
        return self.n_rows

    cdef _run_lookup_insert(self, keys, out, int64_t step, versions, bint count_hits, bint gather):
        cdef Py_ssize_t n = keys.shape[0]
        cdef int64_t[::1] ver
        cdef bint want_versions = versions is not None
        if want_versions:
            _check_int64_out(versions, n, "versions")
            ver = versions
        else:
            ver = np.empty(1, dtype=np.int64)   # never written: want_versions is False
        cdef const int64_t[::1] k = keys
        cdef float[:, ::1] o = out
        cdef bint refuse = self.on_full == "refuse"
        cdef Py_ssize_t done = 0, failed_at = -1
        cdef int status = RUN_DONE
        # The nogil run stops before a key that needs a slot or row the table cannot hold yet;
        # the table grows (with the GIL) and the run resumes at that key.
        while True:
            with nogil:
                done = self._lookup_insert_run(k, o, ver, want_versions, done, step, count_hits,
                                               refuse, gather, &status)
            if status == RUN_DONE:
                break
            elif status == RUN_NEED_SLOTS:
                self._rehash(self.n_slots * 2)
            elif status == RUN_NEED_ROWS:
                self._reserve_rows(self.n_rows + 1)
            else:
                failed_at = done
                break
        if failed_at >= 0:
            raise TableFullError(
                f"embedding table {self.table_id} is full: max_rows={self.max_rows} rows are in "
                f"use and key {k[failed_at]} (position {failed_at} of {n}) needs a new row. Raise "
                f"max_rows, configure eviction (max_rows with lfu/lru, ttl_steps), or set "
                f"on_full=refuse to read zeros for keys that do not fit (counted as refused_inserts).")

    cdef Py_ssize_t _lookup_insert_run(self, const int64_t[::1] k, float[:, ::1] o,
                                       int64_t[::1] ver, bint want_versions, Py_ssize_t start,
                                       int64_t step, bint count_hits, bint refuse,
                                       bint gather, int* status) noexcept nogil:
        cdef Py_ssize_t i, n = k.shape[0]
        cdef Slot* s
        cdef int64_t key
        cdef uint32_t hits
        cdef bint fresh
        cdef int64_t slot_limit = <int64_t>(self.n_slots * MAX_LOAD)
        cdef int64_t row_limit = self.max_rows if self.max_rows else MAX_ROWS_INT32
        cdef uint64_t ring[PREFETCH_DISTANCE]
        cdef uint64_t home
        self._ring_start(k, start, ring)
        for i in range(start, n):
            home = self._ring_next(k, i, ring)
            if gather and i + ROW_PREFETCH_DISTANCE < n:
                self._prefetch_row_for_lookup(
                    k[i + ROW_PREFETCH_DISTANCE], ring[(i + ROW_PREFETCH_DISTANCE) & (PREFETCH_DISTANCE - 1)])
                HPS_PREFETCH(&o[i + ROW_PREFETCH_DISTANCE, 0])
            key = k[i]
            s = &self.slots[self._probe_from(key, home)]
            fresh = slot_row(s) == ROW_EMPTY
            if fresh:
                if self.used_slots >= slot_limit:
                    status[0] = RUN_NEED_SLOTS
                    return i
                s.key = key
                set_slot_row(s, ROW_CANDIDATE)
                s.hits = 0
                self.used_slots += 1
            hits = s.hits + 1 if (count_hits and s.hits < 0xFFFFFFFFU) else s.hits
            if slot_row(s) == ROW_CANDIDATE and (hits >= self.min_count or self.min_count <= 1):
                if self.n_rows >= self.row_capacity and self.row_capacity < row_limit:
                    status[0] = RUN_NEED_ROWS
                    return i
                if self.n_rows >= row_limit:
                    if not refuse:
                        if fresh:   # the failing key leaves no trace (no 0-hit candidate)
                            self._delete_slot(<uint64_t>(s - self.slots))
                        status[0] = RUN_TABLE_FULL
                        return i
                    self.refused_inserts += 1
                else:
                    set_slot_row(s, <int32_t>self.n_rows)
                    self.n_rows += 1
                    self._init_row(slot_row(s), key, step)
                    self.admitted_keys += 1
            s.hits = hits
            if not gather:
                continue
            if slot_row(s) >= 0:
                memcpy(&o[i, 0], self.rows + <int64_t>slot_row(s) * self.row_width,
                       self.dim * sizeof(float))
                if want_versions:
                    ver[i] = self.row_last_update[slot_row(s)]
            else:
                memset(&o[i, 0], 0, self.dim * sizeof(float))
                if want_versions:
                    ver[i] = -1
        status[0] = RUN_DONE
        return n

    def apply_gradients(self, keys, grads, int64_t step=0):
        """Apply the table's optimizer to the rows of the keys (lazy; duplicates summed first).

        Gradients for keys that are absent or not admitted are dropped and counted
        (``dropped_missing_grads``, ``dropped_unadmitted_grads``).

        Args:
            keys: 1-D int64 array.
            grads: float32 array (len(keys), dim).
            step: training step, stored as the version of every updated row.
        Returns:
            number of distinct rows updated.
        Raises:
            NonFiniteGradientError: a gradient holds NaN/Inf and nonfinite=raise (nothing is
            applied). With nonfinite=skip the row is skipped and counted.
        """
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0], i, bad = -1
        grads = _as_rows(grads, n, self.dim, "grads")
        cdef const int64_t[::1] k = keys
        cdef const float[:, ::1] g = grads
        cdef int dim = self.dim, j
        if self.nonfinite == "raise":
            with nogil:
                for i in range(n):
                    for j in range(dim):
                        if not isfinite(g[i, j]):
                            bad = i
                            break
                    if bad >= 0:
                        break
            if bad >= 0:
                raise NonFiniteGradientError(
                    f"gradient for key {k[bad]} (position {bad}) in table {self.table_id} holds "
                    f"NaN or Inf at step {step}; nothing was applied. Lower the learning rate or "
                    f"clip gradients, or set nonfinite=skip (hybridps train --nonfinite skip, "
                    f"config nonfinite: skip) to skip such rows (counted as "
                    f"skipped_nonfinite_grads).")
        # Pass 1: find each key's row and sum duplicate keys into one accumulator per row. The
        # accumulator of a row is found in a scratch table keyed by row (1 + its accumulator,
        # 0 = none; 2n slots or more, which stay in cache), not in per-row memory of the table,
        # whose random reads would miss the cache once per key.
        accum = np.empty((n, dim), dtype=np.float32)
        touched = np.empty(n, dtype=np.int64)
        cdef uint64_t acc_cap = scratch_slots(<uint64_t>n)
        cdef uint64_t acc_mask = acc_cap - 1, h
        cdef int acc_shift = slot_shift(acc_cap)
        if n >= 2147483647:
            raise TableInputError("apply_gradients takes fewer than 2**31 keys per call")
        cdef int32_t* acc_of_row = <int32_t*>calloc(acc_cap, sizeof(int32_t))
        if acc_of_row == NULL:
            raise MemoryError(f"cannot allocate the scratch table of {n} row gradients")
        cdef float[:, ::1] acc = accum
        cdef int64_t[::1] rows_touched = touched
        cdef int64_t n_touched = 0, n_applied = 0, r, a
        cdef int32_t row_of_key
        cdef bint skip_bad
        cdef uint64_t ring[PREFETCH_DISTANCE]
        cdef uint64_t home
        with nogil:
            self._ring_start(k, 0, ring)
            for i in range(n):
                home = self._ring_next(k, i, ring)
                row_of_key = slot_row(&self.slots[self._probe_from(k[i], home)])
                if row_of_key < 0:
                    if row_of_key == ROW_CANDIDATE:
                        self.dropped_unadmitted_grads += 1
                    else:
                        self.dropped_missing_grads += 1
                    continue
                r = row_of_key
                h = ((<uint64_t>r + 1) * GOLDEN) >> acc_shift
                while acc_of_row[h] != 0 and rows_touched[acc_of_row[h] - 1] != r:
                    h = (h + 1) & acc_mask
                a = acc_of_row[h] - 1
                if a < 0:
                    a = n_touched
                    n_touched += 1
                    acc_of_row[h] = <int32_t>(a + 1)
                    rows_touched[a] = r
                    memcpy(&acc[a, 0], &g[i, 0], dim * sizeof(float))
                else:
                    for j in range(dim):
                        acc[a, j] += g[i, j]
            # Pass 2: one optimizer update per distinct row.
            for a in range(n_touched):
                if a + PREFETCH_DISTANCE < n_touched:     # the row ahead and its metadata
                    r = rows_touched[a + PREFETCH_DISTANCE]
                    HPS_PREFETCH(self.rows + r * self.row_width)
                    HPS_PREFETCH(self.rows + r * self.row_width + 16)
                    if self.row_width > 32:            # Adam, FTRL: a third cache line
                        HPS_PREFETCH(self.rows + r * self.row_width + 32)
                    HPS_PREFETCH(&self.row_update_count[r])
                    HPS_PREFETCH(&self.row_last_update[r])
                r = rows_touched[a]
                skip_bad = False
                if self.skip_nonfinite:
                    for j in range(dim):
                        if not isfinite(acc[a, j]):
                            skip_bad = True
                            break
                if skip_bad:
                    self.skipped_nonfinite_grads += 1
                    continue
                self._update_row(r, &acc[a, 0], step)
                n_applied += 1
        free(acc_of_row)
        self.applied_row_updates += n_applied
        return n_applied

    cdef void _update_row(self, int64_t r, const float* g, int64_t step) noexcept nogil:
        cdef float* w = self.rows + r * self.row_width
        cdef float* s0 = w + self.dim
        cdef float* s1 = w + 2 * self.dim
        cdef int j, dim = self.dim
        cdef double lr = self.lr, gj, n_new, z, sigma
        cdef int kind = self.optimizer_kind
        cdef int64_t last = self.row_last_update[r], t
        self.row_update_count[r] += 1
        self.row_last_update[r] = step
        if kind == 0:
            hps_sgd_row(w, g, dim, <float>lr)
        elif kind == 1:
            hps_adagrad_row(w, s0, g, dim, <float>lr, <float>self.epsilon)
        elif kind == 2:
            if self.adam_catch_up:
                # Keras's Adam on a dense table: the skipped steps first, then this one; bias
                # correction by the global update number step + 1 (steps count from 0).
                if step - last > 1 and self.row_update_count[r] > 1:
                    self._adam_catch_up(w, s0, s1, last, step)
                t = step + 1 if step >= 0 else 1
                hps_adam_row(w, s0, s1, g, dim, <float>(1.0 - self.beta1), <float>(1.0 - self.beta2),
                             self._adam_alpha(t), <float>self.epsilon)
            else:
                # Lazy: bias correction by the row's own update count t:
                # m_hat / (sqrt(v_hat) + eps) = (alpha(t) / lr) m / (sqrt(v) + eps sqrt(1 - beta2^t)).
                t = self.row_update_count[r]
                hps_adam_row(w, s0, s1, g, dim, <float>(1.0 - self.beta1), <float>(1.0 - self.beta2),
                             self._adam_alpha(t), <float>(self.epsilon * self._adam_sqrt_bias2(t)))
        else:
            for j in range(dim):
                gj = g[j]
                n_new = s0[j] + gj * gj
                sigma = (sqrt(n_new) - sqrt(<double>s0[j])) / lr
                z = s1[j] + gj - sigma * w[j]
                s0[j] = <float>n_new
                s1[j] = <float>z
                if fabs(z) > self.l1:
                    w[j] = <float>(((self.l1 if z > 0 else -self.l1) - z) /
                                   (sqrt(n_new) / lr + 2.0 * self.l2))
                else:
                    w[j] = 0.0

    cdef void _adam_catch_up(self, float* w, float* m, float* v, int64_t last, int64_t step) noexcept nogil:
        # The gap - 1 steps between the row's last update (at ``last``) and ``step`` moved it in
        # Keras's dense Adam with a zero gradient: apply the first catch_up_terms of them exactly
        # (the moves of later ones are below CATCH_UP_TOLERANCE of the first), then decay the
        # moments by all of them. Skipped step i (0-based) is Keras update number last + 2 + i.
        cdef int64_t skipped = step - last - 1
        cdef int n = <int>(skipped if skipped < self.catch_up_terms else self.catch_up_terms), i
        cdef double b1_power = 1.0
        for i in range(n):
            b1_power *= self.beta1
            self.catch_up_a[i] = self._adam_alpha(last + 2 + i) * <float>b1_power
        hps_adam_catch_up_row(w, m, v, self.catch_up_s, self.dim, n, self.catch_up_a,
                              self.catch_up_c, <float>self.epsilon,
                              <float>pow(self.beta1, <double>skipped),
                              <float>pow(self.beta2, <double>skipped))

    def erase(self, keys):
        """Remove keys (rows and candidates). Absent keys are ignored.

        Returns:
            number of keys removed.
        """
        keys = _as_keys(keys, "keys")
        cdef const int64_t[::1] k = keys
        cdef Py_ssize_t i, n = keys.shape[0]
        cdef uint64_t si
        cdef int64_t removed = 0
        with nogil:
            for i in range(n):
                si = self._probe(k[i])
                if slot_row(&self.slots[si]) == ROW_EMPTY:
                    continue
                if slot_row(&self.slots[si]) >= 0:
                    self._remove_row(slot_row(&self.slots[si]))   # moves rows, never slots
                self._delete_slot(si)
                removed += 1
        return removed

    # ------------------------------------------------------------------ eviction
    def evict_stale(self, int64_t step, int64_t ttl_steps):
        """Erase rows not updated for more than ``ttl_steps`` steps before ``step``.

        Returns:
            number of rows evicted (also added to ``evicted_rows``).
        """
        if ttl_steps < 0:
            raise ConfigError(f"ttl_steps must be >= 0, got {ttl_steps}")
        meta = self.export(values=False)
        stale = meta["keys"][step - meta["last_update_step"] > ttl_steps]
        removed = self.erase(stale)
        self.evicted_rows += removed
        self._log_evicted(stale)
        return removed

    def evict_to_budget(self, int64_t max_rows, str policy="lfu"):
        """Erase rows until at most ``max_rows`` remain.

        ``lfu`` evicts the fewest hits first, ``lru`` the oldest last update first; ties go to
        the smaller key, so the choice is deterministic.

        Returns:
            number of rows evicted (also added to ``evicted_rows``).
        """
        if policy not in ("lfu", "lru"):
            raise ConfigError(f"eviction policy must be 'lfu' or 'lru', got {policy!r}")
        if max_rows < 0:
            raise ConfigError(f"max_rows must be >= 0, got {max_rows}")
        excess = self.n_rows - max_rows
        if excess <= 0:
            return 0
        meta = self.export(values=False)
        score = meta["hits"] if policy == "lfu" else meta["last_update_step"]
        order = np.lexsort((meta["keys"], score))
        evicted = meta["keys"][order[:excess]]
        removed = self.erase(evicted)
        self.evicted_rows += removed
        self._log_evicted(evicted)
        return removed

    def _log_evicted(self, keys):
        if self.evicted_log is not None and len(keys):
            self.evicted_log.append(keys)

    def record_evictions(self, bint enabled=True):
        """Start (or stop) recording the keys the eviction policies erase: the tombstones of a
        delta export (hybridps.export.delta). Starting clears what was recorded."""
        self.evicted_log = [] if enabled else None

    def take_evicted(self):
        """The distinct keys ``evict_stale`` / ``evict_to_budget`` erased since the last call (or
        since ``record_evictions``), sorted, and forget them. A key evicted, re-inserted and
        evicted again is listed once; one re-inserted since is listed too (it is a row again).

        Returns:
            int64 array (empty when recording is off).
        """
        if not self.evicted_log:
            return np.empty(0, dtype=np.int64)
        keys = np.unique(np.concatenate(self.evicted_log))
        self.evicted_log = []
        return keys

    # ------------------------------------------------------------------ export / import
    def export(self, bint values=True):
        """Every row with its slots and metadata, and every candidate key with its hits.

        Returns:
            dict with ``keys`` (n,), ``values`` (n, dim), ``slots`` (n, n_optimizer_slots, dim),
            ``hits``, ``last_update_step``, ``update_count`` (n,), ``candidate_keys`` and
            ``candidate_hits`` (m,). Rows come in the table's internal order.
        """
        cdef int64_t n = self.n_rows, r
        out = {}
        keys = np.empty(n, dtype=np.int64)
        last = np.empty(n, dtype=np.int64)
        count = np.empty(n, dtype=np.int64)
        hits = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] kv = keys, lv = last, cv = count, hv = hits
        for r in range(n):
            kv[r] = self.row_keys[r]
            lv[r] = self.row_last_update[r]
            cv[r] = self.row_update_count[r]
        n_cand = self.used_slots - self.n_rows
        cand_keys = np.empty(n_cand, dtype=np.int64)
        cand_hits = np.empty(n_cand, dtype=np.int64)
        cdef int64_t[::1] ckv = cand_keys, chv = cand_hits
        cdef int64_t c = 0
        cdef uint64_t i
        cdef float[:, ::1] bv
        for i in range(self.n_slots):
            if slot_row(&self.slots[i]) >= 0:
                hv[slot_row(&self.slots[i])] = self.slots[i].hits
            elif slot_row(&self.slots[i]) == ROW_CANDIDATE:
                ckv[c] = self.slots[i].key
                chv[c] = self.slots[i].hits
                c += 1
        out.update(keys=keys, hits=hits, last_update_step=last, update_count=count,
                   candidate_keys=cand_keys, candidate_hits=cand_hits)
        if values:
            block = np.empty((n, self.row_width), dtype=np.float32)
            if n:
                bv = block
                memcpy(&bv[0, 0], self.rows, n * self.row_width * sizeof(float))
            out["values"] = block[:, :self.dim].copy()
            out["slots"] = block[:, self.dim:].reshape(n, self.n_optimizer_slots, self.dim).copy()
        return out

    def import_rows(self, keys, values, slots=None, hits=None, last_update_step=None,
                    update_count=None):
        """Insert or overwrite rows exactly as given (values, optimizer slots, metadata).

        Missing ``slots`` start at the optimizer's initial slot values, missing ``hits`` at
        ``min_count``, missing steps and counts at 0. Admission does not apply to imported rows.
        """
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0], i
        values = _as_rows(values, n, self.dim, "values")
        cdef int ns = self.n_optimizer_slots
        if slots is not None:
            slots = np.ascontiguousarray(slots)
            if slots.dtype != np.float32 or slots.shape != (n, ns, self.dim):
                raise TableInputError(f"slots must be float32 of shape ({n}, {ns}, {self.dim}) for "
                                      f"optimizer {self.optimizer}, got {slots.dtype} {slots.shape}")
        hits = _as_meta(np.full(n, self.min_count) if hits is None else hits, n, "hits")
        last = _as_meta(np.zeros(n) if last_update_step is None else last_update_step, n, "last_update_step")
        count = _as_meta(np.zeros(n) if update_count is None else update_count, n, "update_count")
        if self.max_rows and self.n_rows + n > self.max_rows:
            existing = int((self.find(keys) >= 0).sum())
            if self.n_rows + n - existing > self.max_rows:
                raise TableFullError(f"importing {n} rows into table {self.table_id} would exceed "
                                     f"max_rows={self.max_rows}; raise max_rows")
        self._reserve_slots(n)
        self._reserve_rows(self.n_rows + n)
        cdef const int64_t[::1] k = keys
        cdef const float[:, ::1] v = values
        cdef const float[:, :, ::1] sl
        if slots is not None:
            sl = slots
        cdef const int64_t[::1] hv = hits, lv = last, cv = count
        cdef Slot* s
        cdef float* row
        for i in range(n):
            s = &self.slots[self._probe(k[i])]
            if slot_row(s) == ROW_EMPTY:
                s.key = k[i]
                set_slot_row(s, ROW_CANDIDATE)
                self.used_slots += 1
            if slot_row(s) == ROW_CANDIDATE:
                set_slot_row(s, <int32_t>self.n_rows)
                self.n_rows += 1
                self._init_row(slot_row(s), k[i], 0)
            s.hits = <uint32_t>min(max(hv[i], 0), 0xFFFFFFFF)
            row = self.rows + <int64_t>slot_row(s) * self.row_width
            memcpy(row, &v[i, 0], self.dim * sizeof(float))
            if slots is not None and ns:
                memcpy(row + self.dim, &sl[i, 0, 0], ns * self.dim * sizeof(float))
            self.row_last_update[slot_row(s)] = lv[i]
            self.row_update_count[slot_row(s)] = cv[i]

    def import_candidates(self, keys, hits):
        """Restore not-yet-admitted keys with their hit counts (the other half of export)."""
        keys = _as_keys(keys, "keys")
        cdef Py_ssize_t n = keys.shape[0], i
        hits = _as_meta(hits, n, "hits")
        self._reserve_slots(n)
        cdef Slot* s
        for i in range(n):
            s = &self.slots[self._probe(keys[i])]
            if slot_row(s) == ROW_EMPTY:
                s.key = keys[i]
                set_slot_row(s, ROW_CANDIDATE)
                self.used_slots += 1
            if slot_row(s) == ROW_CANDIDATE:
                s.hits = <uint32_t>min(max(hits[i], 0), 0xFFFFFFFF)

    # ------------------------------------------------------------------ introspection
    @property
    def size(self):
        """Number of admitted rows."""
        return self.n_rows

    @property
    def num_candidates(self):
        """Number of keys counted but not yet admitted (min_count)."""
        return self.used_slots - self.n_rows

    @property
    def capacity(self):
        """Number of hash slots (a power of two; grows to keep the load <= 0.7)."""
        return self.n_slots

    @property
    def memory_bytes(self):
        """Bytes of C memory held: hash slots plus row storage with metadata."""
        return (self.n_slots * sizeof(Slot)
                + self.row_capacity * (self.row_width * sizeof(float) + 3 * sizeof(int64_t)))

    @property
    def optimizer_slot_names(self):
        return OPTIMIZER_SLOT_NAMES[self.optimizer]

    def counters(self):
        """Every admission, refusal, drop, skip and eviction this table has counted."""
        return {"rows": self.n_rows, "candidates": self.used_slots - self.n_rows,
                "admitted_keys": self.admitted_keys, "refused_inserts": self.refused_inserts,
                "evicted_rows": self.evicted_rows,
                "dropped_unadmitted_grads": self.dropped_unadmitted_grads,
                "dropped_missing_grads": self.dropped_missing_grads,
                "skipped_nonfinite_grads": self.skipped_nonfinite_grads,
                "applied_row_updates": self.applied_row_updates,
                "memory_bytes": self.memory_bytes}

    def restore_counters(self, counters):
        """Set the event counters (admissions, refusals, drops, skips, evictions, updates) from a
        ``counters()`` dict, e.g. when a checkpoint is restored; other keys are ignored."""
        self.admitted_keys = counters.get("admitted_keys", self.admitted_keys)
        self.refused_inserts = counters.get("refused_inserts", self.refused_inserts)
        self.evicted_rows = counters.get("evicted_rows", self.evicted_rows)
        self.dropped_unadmitted_grads = counters.get("dropped_unadmitted_grads", self.dropped_unadmitted_grads)
        self.dropped_missing_grads = counters.get("dropped_missing_grads", self.dropped_missing_grads)
        self.skipped_nonfinite_grads = counters.get("skipped_nonfinite_grads", self.skipped_nonfinite_grads)
        self.applied_row_updates = counters.get("applied_row_updates", self.applied_row_updates)

    def __len__(self):
        return self.n_rows

    def __repr__(self):
        return (f"EmbeddingHashTable(table_id={self.table_id}, dim={self.dim}, "
                f"optimizer={self.optimizer!r}, rows={self.n_rows}, capacity={self.n_slots})")


cdef _check_out(object out, Py_ssize_t n, int dim):
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n, dim) \
            or not out.flags.c_contiguous:
        raise TableInputError(f"out must be a C-contiguous float32 array of shape ({n}, {dim}), got "
                              f"{getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}")


cdef _check_int64_out(object arr, Py_ssize_t n, str name):
    if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 \
            or arr.shape != (n,) or not arr.flags.c_contiguous:
        raise TableInputError(f"{name} must be a C-contiguous int64 array of shape ({n},)")


def initial_rows(keys, int dim, str initializer="normal", uint64_t seed=0, int64_t table_id=0,
                 double a=0.0, double b=0.01):
    """The key-seeded initial rows of ``keys`` (what a table inserts), without a table.

    ``a, b`` are (mean, std) for ``normal`` and (low, high) for ``uniform``.
    """
    if initializer not in INITIALIZERS:
        raise ConfigError(f"initializer must be one of {sorted(INITIALIZERS)}, got {initializer!r}")
    cdef const int64_t[::1] k = _as_keys(keys, "keys")
    out = np.empty((k.shape[0], dim), dtype=np.float32)
    cdef float[:, ::1] o = out
    cdef int kind = INITIALIZERS[initializer]
    cdef Py_ssize_t i
    if dim > 0:
        with nogil:
            for i in range(k.shape[0]):
                init_row(&o[i, 0], dim, kind, seed, table_id, k[i], a, b)
    return out
