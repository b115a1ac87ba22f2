# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Per-step kernels of the sharded embedding exchange: unique, owner routing, bucketing.

What lives here: the loops that run over every key of every step (docs/design.md, One step) and
must never be per-key Python or a sort: ``unique_inverse`` (hash-based, first-occurrence
order), ``unique_route`` (a step's distinct keys per table, routed and laid out in send order,
with every key's send position: the exchange plan's one pass), ``owner_ranks`` (``(mix64(key) % num_buckets) % world_size``), ``bucket_by_owner`` (a counting
sort of the step's unique keys by (owner rank, table) that yields the send order of the fused
exchange), ``count_staleness`` (the owner's staleness histogram of the rows it serves),
``permute_blocks`` (moves a step's rows between the exchange's (owner, table) order and the TF
step's (dim group, table, owner) order), ``hash_int_ids`` (schema feature keys of integer
ids, hybridps.data.hashing) and the text ids of Arrow string buffers (``text_value_ids``, and
``TextIdCache``, which remembers them across a reader's batches). What does not: MPI (hybridps.comm) and tables
(hybridps._hashtable).
"""

from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t
from mix64 cimport mix64_c
from slots cimport scratch_slots, slot_shift
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memcpy, memcmp

import numpy as np

from hybridps.errors import TableInputError


cdef object _keys_1d(object keys):
    arr = np.ascontiguousarray(keys)
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise TableInputError(f"keys must be a 1-D int64 array, got {arr.dtype} of shape {arr.shape}")
    return arr


def unique_inverse(keys):
    """Distinct keys in first-occurrence order, and each key's index into them.

    Equivalent to ``np.unique(keys, return_inverse=True)`` up to the order of the distinct
    keys (first occurrence here, sorted there), in O(n) with a scratch hash set.

    Args:
        keys: 1-D int64 array.   # IN
    Returns:
        (unique_keys int64 (u,), inverse int32 (n,)) with ``unique_keys[inverse] == keys``.
    """
    keys = _keys_1d(keys)
    cdef const int64_t[::1] k = keys
    cdef Py_ssize_t n = k.shape[0], i
    uniq = np.empty(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int32)
    if n == 0:
        return uniq, inverse
    if n >= 2147483647:
        raise TableInputError("unique_inverse handles fewer than 2**31 keys per call")
    cdef int64_t[::1] u = uniq
    cdef int32_t[::1] inv = inverse
    cdef uint64_t cap = scratch_slots(<uint64_t>n)
    cdef uint64_t mask = cap - 1, h
    cdef int shift = slot_shift(cap)
    # slot holds 1 + index into uniq (0 = empty)
    cdef int32_t* slot = <int32_t*>malloc(cap * sizeof(int32_t))
    if slot == NULL:
        raise MemoryError("unique_inverse: cannot allocate scratch table")
    cdef int32_t n_unique = 0, s
    cdef int64_t key
    with nogil:
        memset(slot, 0, cap * sizeof(int32_t))
        for i in range(n):
            key = k[i]
            h = mix64_c(<uint64_t>key ^ 0x9E3779B97F4A7C15ULL) >> shift
            while True:
                s = slot[h]
                if s == 0:
                    u[n_unique] = key
                    n_unique += 1
                    slot[h] = n_unique
                    inv[i] = n_unique - 1
                    break
                if u[s - 1] == key:
                    inv[i] = s - 1
                    break
                h = (h + 1) & mask
    free(slot)
    return uniq[:n_unique].copy(), inverse


cdef inline int32_t owner_of(int64_t key, uint64_t num_buckets, uint64_t world) noexcept nogil:
    # A key's virtual bucket is mix64(key) % num_buckets (fixed for a model's life: checkpoints
    # store rows grouped by it); a bucket belongs to rank bucket % world_size. So a whole bucket
    # has one owner at every world size and a resharded restore reads only its own buckets.
    return <int32_t>((mix64_c(<uint64_t>key) % num_buckets) % world)


def owner_ranks(keys, int world_size, int64_t num_buckets):
    """Owner rank of each key: ``(mix64(key) % num_buckets) % world_size`` (int32)."""
    keys = _keys_1d(keys)
    if world_size < 1 or num_buckets < 1:
        raise TableInputError(f"world_size and num_buckets must be >= 1, got {world_size}, {num_buckets}")
    cdef const int64_t[::1] k = keys
    cdef Py_ssize_t i, n = k.shape[0]
    out = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] o = out
    cdef uint64_t w = <uint64_t>world_size, nb = <uint64_t>num_buckets
    with nogil:
        for i in range(n):
            o[i] = owner_of(k[i], nb, w)
    return out


def bucket_by_owner(keys, table_offsets, int world_size, int64_t num_buckets):
    """Send order of a step's unique keys, grouped by owner rank, then by table.

    The keys of table ``t`` are ``keys[table_offsets[t]:table_offsets[t+1]]``. A stable
    counting sort on (owner, table) gives the permutation ``send_order`` such that
    ``keys[send_order]`` is the alltoallv send buffer, and ``counts[r, t]`` keys of table t go
    to rank r.

    Args:
        keys: 1-D int64 array of all tables' unique keys, concatenated.    # IN
        table_offsets: int64 array (num_tables + 1,), starting at 0, ending at len(keys). # IN
        world_size: number of ranks (or PS servers).
        num_buckets: virtual buckets of the model (see ``owner_ranks``).
    Returns:
        (send_order int64 (n,), counts int64 (world_size, num_tables)).
    """
    keys = _keys_1d(keys)
    offsets = np.ascontiguousarray(table_offsets, dtype=np.int64)
    cdef Py_ssize_t n = keys.shape[0]
    cdef int num_tables = offsets.shape[0] - 1
    if num_tables < 1 or offsets[0] != 0 or offsets[num_tables] != n or np.any(np.diff(offsets) < 0):
        raise TableInputError(f"table_offsets must rise from 0 to len(keys)={n}, got {offsets}")
    if world_size < 1 or num_buckets < 1:
        raise TableInputError(f"world_size and num_buckets must be >= 1, got {world_size}, {num_buckets}")
    cdef const int64_t[::1] k = keys
    cdef const int64_t[::1] off = offsets
    cdef uint64_t nb = <uint64_t>num_buckets
    counts = np.zeros((world_size, num_tables), dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    owner = np.empty(n, dtype=np.int32)
    cdef int64_t[:, ::1] c = counts
    cdef int64_t[::1] o = order
    cdef int32_t[::1] own = owner
    cdef uint64_t w = <uint64_t>world_size
    cdef Py_ssize_t i
    cdef int t, r
    cdef int64_t running = 0, tmp
    cdef int64_t[:, ::1] start = np.empty((world_size, num_tables), dtype=np.int64)
    with nogil:
        for t in range(num_tables):
            for i in range(off[t], off[t + 1]):
                r = owner_of(k[i], nb, w)
                own[i] = r
                c[r, t] += 1
        for r in range(world_size):
            for t in range(num_tables):
                start[r, t] = running
                running += c[r, t]
        for t in range(num_tables):
            for i in range(off[t], off[t + 1]):
                r = own[i]
                o[start[r, t]] = i
                start[r, t] += 1
    return order, counts


cdef extern from *:
    """
    #define ROUTE_AHEAD 16
    #define route_prefetch(p) __builtin_prefetch((const void*)(p), 1, 3)
    """
    enum: ROUTE_AHEAD
    void route_prefetch(const void* p) noexcept nogil


def unique_route(parts, int world_size, int64_t num_buckets):
    """A step's plan in one pass per key: per table, its distinct keys (first-occurrence
    order), routed to their owners and laid out in send order, and every key's position in
    that send buffer.

    The same result as ``unique_inverse`` of each table's keys, ``bucket_by_owner`` of the
    table-concatenated distinct keys, then ``inverse`` mapped through the send order, without
    the intermediate arrays: ``send_keys[index[i]]`` is the i-th key of the concatenated
    ``parts``, and ``send_keys`` is grouped by owner rank, then table, each (owner, table) block
    in first-occurrence order.

    Args:
        parts: list of 1-D int64 arrays, one per table: that table's keys (duplicates
            allowed).                                                        # IN
        world_size: number of ranks (or PS servers).
        num_buckets: virtual buckets of the model (see ``owner_ranks``).
    Returns:
        (send_keys int64 (U,), counts int64 (world_size, len(parts)), index int32 (N,)) with
        N the total number of keys.
    """
    if world_size < 1 or num_buckets < 1:
        raise TableInputError(f"world_size and num_buckets must be >= 1, got {world_size}, {num_buckets}")
    cdef int num_tables = len(parts)
    if num_tables < 1:
        raise TableInputError("unique_route needs at least one table's keys")
    arrays = [_keys_1d(part) for part in parts]
    lengths = [a.shape[0] for a in arrays]
    cdef Py_ssize_t total = sum(lengths), longest = max(lengths)
    if total >= 2147483647:
        raise TableInputError("unique_route handles fewer than 2**31 keys per call")
    counts = np.zeros((world_size, num_tables), dtype=np.int64)
    index = np.empty(total, dtype=np.int32)
    uniq = np.empty(total, dtype=np.int64)        # distinct keys, table order
    owner = np.empty(total, dtype=np.int32)       # their owners
    cdef int64_t[:, ::1] c = counts
    cdef int32_t[::1] idx = index
    cdef int64_t[::1] u = uniq
    cdef int32_t[::1] own = owner
    cdef uint64_t cap = scratch_slots(<uint64_t>longest)
    cdef uint64_t h, table_cap, table_mask
    cdef uint64_t ring[ROUTE_AHEAD]
    cdef int table_shift
    # slot holds 1 + index into uniq (0 = empty); each table clears and probes a prefix of it
    cdef int32_t* slot = <int32_t*>malloc(cap * sizeof(int32_t))
    if slot == NULL:
        raise MemoryError("unique_route: cannot allocate scratch table")
    cdef uint64_t nb = <uint64_t>num_buckets, w = <uint64_t>world_size
    cdef const int64_t[::1] k
    cdef Py_ssize_t i, n, base = 0
    cdef int32_t n_unique = 0, first, s
    cdef int64_t key
    cdef int t
    cdef int32_t r
    table_firsts = []
    try:
        for t in range(num_tables):
            k = arrays[t]
            n = k.shape[0]
            first = n_unique
            table_firsts.append(first)
            table_cap = scratch_slots(<uint64_t>n)
            table_mask = table_cap - 1
            table_shift = slot_shift(table_cap)
            with nogil:
                memset(slot, 0, table_cap * sizeof(int32_t))
                # the home slots of the next ROUTE_AHEAD keys are hashed and prefetched ahead
                # (ring), so the probes of a table larger than the L2 cache do not wait on it
                for i in range(n if n < ROUTE_AHEAD else ROUTE_AHEAD):
                    ring[i] = mix64_c(<uint64_t>k[i] ^ 0x9E3779B97F4A7C15ULL) >> table_shift
                    route_prefetch(&slot[ring[i]])
                for i in range(n):
                    key = k[i]
                    h = ring[i & (ROUTE_AHEAD - 1)]
                    if i + ROUTE_AHEAD < n:
                        ring[i & (ROUTE_AHEAD - 1)] = mix64_c(
                            <uint64_t>k[i + ROUTE_AHEAD] ^ 0x9E3779B97F4A7C15ULL) >> table_shift
                        route_prefetch(&slot[ring[i & (ROUTE_AHEAD - 1)]])
                    while True:
                        s = slot[h]
                        if s == 0:
                            u[n_unique] = key
                            n_unique += 1
                            slot[h] = n_unique
                            idx[base + i] = n_unique - 1
                            break
                        if u[s - 1] == key:
                            idx[base + i] = s - 1
                            break
                        h = (h + 1) & table_mask
            base += n
    finally:
        free(slot)
    table_firsts.append(n_unique)
    # owners in a loop of their own (independent iterations); with powers of two for both
    # num_buckets and world_size, (m % num_buckets) % world_size is a mask of m
    cdef bint masks = (nb & (nb - 1)) == 0 and (w & (w - 1)) == 0
    cdef uint64_t owner_mask = (nb - 1) & (w - 1)
    cdef int32_t j, j0, j1
    for t in range(num_tables):
        j0, j1 = table_firsts[t], table_firsts[t + 1]
        with nogil:
            if masks:
                for j in range(j0, j1):
                    own[j] = <int32_t>(mix64_c(<uint64_t>u[j]) & owner_mask)
            else:
                for j in range(j0, j1):
                    own[j] = owner_of(u[j], nb, w)
            for j in range(j0, j1):
                c[own[j], t] += 1
    # send order: a stable counting sort of the distinct keys by (owner, table)
    cdef int64_t[:, ::1] start = np.empty((world_size, num_tables), dtype=np.int64)
    cdef int64_t running = 0
    for r in range(world_size):
        for t in range(num_tables):
            start[r, t] = running
            running += c[r, t]
    send_keys = np.empty(n_unique, dtype=np.int64)
    position = np.empty(n_unique, dtype=np.int32)
    cdef int64_t[::1] sk = send_keys
    cdef int32_t[::1] pos = position
    for t in range(num_tables):
        j0, j1 = table_firsts[t], table_firsts[t + 1]
        with nogil:
            for j in range(j0, j1):
                r = own[j]
                pos[j] = <int32_t>start[r, t]
                sk[start[r, t]] = u[j]
                start[r, t] += 1
    with nogil:
        for i in range(total):
            idx[i] = pos[idx[i]]
    return send_keys, counts, index


def count_staleness(versions, int64_t step, int64_t applied_through, histogram):
    """Add the staleness of each read at ``step`` to ``histogram``; returns the largest one.

    A row read at ``step`` with version v (the step of its last applied update, -1: none) is
    current through ``c = max(v, applied_through)``; its staleness is ``max(step - 1 - c, 0)``,
    and 0 for a row created or updated at ``step`` or later (v >= step). Staleness beyond the
    last bin is counted in the last bin.

    Args:
        versions: int64 (n,) versions of the rows served.    # IN
        histogram: int64 (bins,) counts.                      # INOUT
    """
    cdef const int64_t[::1] v = np.ascontiguousarray(versions, dtype=np.int64)
    cdef int64_t[::1] h = histogram
    cdef Py_ssize_t i, n = v.shape[0], bins = h.shape[0]
    if bins < 1:
        raise TableInputError("count_staleness needs a histogram of at least one bin")
    cdef int64_t current, stale, worst = 0
    with nogil:
        for i in range(n):
            if v[i] >= step:
                stale = 0
            else:
                current = v[i] if v[i] > applied_through else applied_through
                stale = step - 1 - current
                if stale < 0:
                    stale = 0
            if stale > worst:
                worst = stale
            h[stale if stale < bins else bins - 1] += 1
    return worst


def permute_blocks(src, src_offsets, dst_offsets, sizes, dst=None):
    """Copy blocks of a flat float32 buffer to other places: a block permutation.

    Block ``b`` is ``src[src_offsets[b]:src_offsets[b] + sizes[b]]`` and goes to
    ``dst[dst_offsets[b]:...]``. The exchange moves a step's unique rows between its send order
    (grouped by owner rank, then table) and the TF step's order (grouped by dim group, then
    table, then owner) with it: one memcpy per block, never a gather per row.

    Args:
        src: 1-D float32 array.                                   # IN
        src_offsets, dst_offsets, sizes: int64 arrays (blocks,).   # IN
        dst: optional 1-D float32 array of the same length.        # OUT
    Returns:
        dst.
    """
    cdef const float[::1] s = np.ascontiguousarray(src, dtype=np.float32)
    if dst is None:
        dst = np.empty(s.shape[0], dtype=np.float32)
    cdef float[::1] d = dst
    cdef const int64_t[::1] so = np.ascontiguousarray(src_offsets, dtype=np.int64)
    cdef const int64_t[::1] do = np.ascontiguousarray(dst_offsets, dtype=np.int64)
    cdef const int64_t[::1] n = np.ascontiguousarray(sizes, dtype=np.int64)
    cdef Py_ssize_t b, blocks = n.shape[0]
    if so.shape[0] != blocks or do.shape[0] != blocks or d.shape[0] != s.shape[0]:
        raise TableInputError("permute_blocks: offsets, sizes and buffers disagree in length")
    for b in range(blocks):
        if n[b] < 0 or so[b] < 0 or do[b] < 0 or so[b] + n[b] > s.shape[0] or do[b] + n[b] > d.shape[0]:
            raise TableInputError(f"permute_blocks: block {b} lies outside the buffers")
    with nogil:
        for b in range(blocks):
            if n[b]:
                memcpy(&d[do[b]], &s[so[b]], n[b] * sizeof(float))
    return dst


cdef uint64_t ID_GOLDEN = 0x9E3779B97F4A7C15ULL

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    /* Schema feature keys of n integer ids: mix64(mix64(id + golden) ^ seed), the formula of
       mix64.pxd written out so the compiler vectorizes it. On x86-64 with GCC the
       loop is compiled twice and picked at load time (GCC 12's target_clones): for x86-64-v4
       (AVX-512, whose 64-bit multiply handles 8 ids per instruction) and for any x86-64.
       Same bits either way; other compilers and CPUs build the plain loop. */
    #if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    #define HPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
    #else
    #define HPS_CLONES
    #endif
    HPS_CLONES
    static void hps_hash_ids(const int64_t* restrict in, int64_t* restrict out, size_t n,
                             uint64_t golden, uint64_t seed) {
        for (size_t i = 0; i < n; i++) {
            uint64_t z = (uint64_t)in[i] + golden;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            z = (z ^ (z >> 31)) ^ seed;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            out[i] = (int64_t)(z ^ (z >> 31));
        }
    }
    """
    void hps_hash_ids(const int64_t* ids, int64_t* out, size_t n, uint64_t golden,
                      uint64_t seed) noexcept nogil


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* BLAKE2b (RFC 7693) of one message with a precomputed parameter block state (digest 8
       bytes, no key, a personalization): the first 64-bit word of the state after the last
       block is the 8-byte digest read little-endian, as hashlib.blake2b(...).digest() gives. */
    static const uint64_t hps_b2_iv[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
        0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
    static const uint8_t hps_b2_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
        {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
        {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
        {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
        {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};
    #define HPS_ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
    #define HPS_B2G(a, b, c, d, x, y) do { \
        a = a + b + (x); d = HPS_ROTR64(d ^ a, 32); c = c + d; b = HPS_ROTR64(b ^ c, 24); \
        a = a + b + (y); d = HPS_ROTR64(d ^ a, 16); c = c + d; b = HPS_ROTR64(b ^ c, 63); } while (0)
    static uint64_t hps_load64(const uint8_t* p) {
        uint64_t w = 0;
        for (int i = 7; i >= 0; i--) w = (w << 8) | p[i];
        return w;
    }
    static void hps_b2_compress(uint64_t h[8], const uint8_t* block, uint64_t t, int last) {
        uint64_t v[16], m[16];
        for (int i = 0; i < 16; i++) m[i] = hps_load64(block + 8 * i);
        for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = hps_b2_iv[i]; }
        v[12] ^= t;
        if (last) v[14] = ~v[14];
        for (int r = 0; r < 12; r++) {
            const uint8_t* s = hps_b2_sigma[r];
            HPS_B2G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
            HPS_B2G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
            HPS_B2G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
            HPS_B2G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
            HPS_B2G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
            HPS_B2G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
            HPS_B2G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
            HPS_B2G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
        }
        for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
    }
    static int64_t hps_blake2b64(const uint8_t* data, size_t n, const uint64_t* h0) {
        uint64_t h[8];
        uint8_t block[128];
        size_t off = 0;
        memcpy(h, h0, sizeof(h));
        while (n - off > 128) { hps_b2_compress(h, data + off, off + 128, 0); off += 128; }
        memset(block, 0, sizeof(block));
        memcpy(block, data + off, n - off);
        hps_b2_compress(h, block, n, 1);
        return (int64_t)h[0];
    }
    /* hybridps.data.hashing._canonical_int: optional '-', ASCII digits, no leading zero,
       not "-0", at most 20 characters, within int64. */
    static int hps_canonical_int(const uint8_t* s, size_t n, int64_t* out) {
        size_t i = 0, k;
        uint64_t mag = 0;
        int neg = 0;
        if (n == 0 || n > 20) return 0;
        if (s[0] == '-') { neg = 1; i = 1; }
        if (n == i) return 0;
        for (k = i; k < n; k++) if (s[k] < '0' || s[k] > '9') return 0;
        if (s[i] == '0' && n - i > 1) return 0;
        if (neg && n - i == 1 && s[i] == '0') return 0;
        for (k = i; k < n; k++) {
            uint64_t d = (uint64_t)(s[k] - '0');
            if (mag > (UINT64_MAX - d) / 10) return 0;
            mag = mag * 10 + d;
        }
        if (!neg && mag > (uint64_t)INT64_MAX) return 0;
        if (neg && mag > (uint64_t)INT64_MAX + 1) return 0;
        *out = neg ? (int64_t)(0 - mag) : (int64_t)mag;
        return 1;
    }
    """
    int64_t hps_blake2b64(const unsigned char* data, size_t n, const uint64_t* h0) noexcept nogil
    int hps_canonical_int(const unsigned char* s, size_t n, int64_t* out) noexcept nogil


cdef void _blake2b_start(uint64_t* h0, object person):
    """BLAKE2b's state before the first block: 8-byte digest, no key, ``person`` (16 bytes)."""
    words = np.frombuffer(bytes(person), dtype="<u8")
    cdef uint64_t iv[8]
    iv[:] = [0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
             0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179]
    cdef int i
    for i in range(8):
        h0[i] = iv[i]
    h0[0] ^= 0x01010008                     # digest 8 bytes, no key, fanout 1, depth 1
    h0[6] ^= <uint64_t>int(words[0])
    h0[7] ^= <uint64_t>int(words[1])


cdef inline int64_t _text_id_c(const unsigned char* s, size_t length, const uint64_t* h0) noexcept nogil:
    cdef int64_t number
    if length == 0:
        return -1
    if hps_canonical_int(s, length, &number):
        return number
    return hps_blake2b64(s, length, h0)


def text_value_ids(offsets, data, person):
    """hybridps.data.hashing.text_id of n UTF-8 values packed Arrow-style (value i is
    ``data[offsets[i]:offsets[i + 1]]``), in one C loop: empty -> -1 (missing), canonical
    decimal text -> its int, other text -> BLAKE2b-64 with the ``person`` personalization read
    little-endian and signed. (The Python text_id stays the reference; the tests compare.)

    Args:
        offsets: int64 (n + 1,), non-decreasing.          # IN
        data: uint8 bytes of the values.                  # IN
        person: 16 bytes.
    Returns:
        int64 (n,).
    """
    if len(person) != 16:
        raise TableInputError(f"text_value_ids: the personalization must be 16 bytes, got {len(person)}")
    off, raw = _packed_values("text_value_ids", offsets, data)
    cdef const int64_t[::1] o_ = off
    cdef const unsigned char[::1] r_ = raw
    cdef Py_ssize_t i, n = o_.shape[0] - 1
    cdef uint64_t h0[8]
    _blake2b_start(h0, person)
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef const unsigned char* base = &r_[0] if r_.shape[0] else NULL
    with nogil:
        for i in range(n):
            o[i] = _text_id_c(base + o_[i], <size_t>(o_[i + 1] - o_[i]), h0)
    return out


cdef tuple _packed_values(str caller, object offsets, object data):
    """(offsets int64, data uint8), both contiguous, checked: n + 1 offsets, non-decreasing,
    inside the data."""
    off = np.ascontiguousarray(offsets, dtype=np.int64)
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    n = off.shape[0] - 1
    if off.ndim != 1 or n < 0:
        raise TableInputError(f"{caller}: offsets must hold n + 1 entries")
    if n and (off[0] < 0 or off[n] > raw.shape[0] or np.any(np.diff(off) < 0)):
        raise TableInputError(f"{caller}: offsets out of the data's range or decreasing")
    return off, raw


cdef struct TextSlot:
    uint64_t hash        # of the bytes, never 0 (0 marks an empty slot)
    int64_t id           # the text id
    uint32_t start       # the bytes: arena[start:start + length] (the arena stays < 4 GiB)
    uint32_t length


cdef inline uint64_t _bytes_hash(const unsigned char* s, size_t n) noexcept nogil:
    """A fast 64-bit hash of a byte string for the cache's own table (not a feature id):
    8-byte words folded through mix64, the length mixed in; never 0."""
    cdef uint64_t h = 0x9e3779b97f4a7c15ULL ^ <uint64_t>n, w
    cdef size_t i = 0
    while i + 8 <= n:
        memcpy(&w, s + i, 8)
        h = mix64_c(h ^ w)
        i += 8
    if i < n:
        w = 0
        memcpy(&w, s + i, n - i)
        h = mix64_c(h ^ w ^ 0xff51afd7ed558ccdULL)
    return h | 1


cdef class TextIdCache:
    """text ids (as :func:`text_value_ids` computes them) remembered across calls.

    A reader's text columns repeat the same values batch after batch (a Zipf vocabulary); this
    cache maps each value's bytes to its id, so a value costs one probe of an open-addressing
    table (a fast hash of its bytes, then a byte compare) instead of BLAKE2b, and a column
    needs no Arrow dictionary encoding first. Ids come out exactly as ``text_value_ids`` gives
    them (the tests compare), whatever the cache holds: it only stops remembering new values
    once it holds ``max_values`` of them or ``max_bytes`` of their text.

    Not shared between threads: each reader owns one (``ids`` keeps the GIL, so a misuse
    serializes rather than corrupts).
    """
    cdef TextSlot* slots
    cdef uint64_t capacity, mask, count
    cdef unsigned char* arena
    cdef int64_t arena_used, arena_capacity
    cdef readonly int64_t max_values, max_bytes, hits, misses
    cdef uint64_t h0[8]

    def __cinit__(self, person, int64_t max_values=1 << 20, int64_t max_bytes=32 << 20):
        if len(person) != 16:
            raise TableInputError(f"TextIdCache: the personalization must be 16 bytes, got {len(person)}")
        if max_values < 1 or not 0 < max_bytes < (1 << 32):
            raise TableInputError("TextIdCache: max_values must be positive and max_bytes in [1, 2**32)")
        _blake2b_start(self.h0, person)
        self.max_values, self.max_bytes = max_values, max_bytes
        self.capacity = 1024
        self.mask = self.capacity - 1
        self.slots = <TextSlot*>calloc(self.capacity, sizeof(TextSlot))
        self.arena_capacity = 1 << 16
        self.arena = <unsigned char*>malloc(self.arena_capacity)
        if self.slots == NULL or self.arena == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)

    def __len__(self):
        return self.count

    def ids(self, offsets, data):
        """Text ids of n values packed Arrow-style (value i is ``data[offsets[i]:offsets[i+1]]``):
        int64 (n,), equal to ``text_value_ids(offsets, data, person)``."""
        off, raw = _packed_values("TextIdCache.ids", offsets, data)
        cdef const int64_t[::1] o_ = off
        cdef const unsigned char[::1] r_ = raw
        cdef Py_ssize_t i, n = o_.shape[0] - 1
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        cdef const unsigned char* base = &r_[0] if r_.shape[0] else NULL
        for i in range(n):
            o[i] = self._id(base + o_[i], <size_t>(o_[i + 1] - o_[i]))
        return out

    cdef int64_t _id(self, const unsigned char* s, size_t length) except? -2:
        cdef uint64_t h, j
        cdef TextSlot* slot
        cdef int64_t value
        if length == 0:
            return -1
        h = _bytes_hash(s, length)
        j = h & self.mask
        while True:
            slot = &self.slots[j]
            if slot.hash == 0:
                break
            if slot.hash == h and slot.length == length and \
                    memcmp(self.arena + slot.start, s, length) == 0:
                self.hits += 1
                return slot.id
            j = (j + 1) & self.mask
        self.misses += 1
        value = _text_id_c(s, length, self.h0)
        if <int64_t>self.count < self.max_values and self.arena_used + <int64_t>length <= self.max_bytes:
            if not self._reserve_bytes(length):
                return value
            memcpy(self.arena + self.arena_used, s, length)
            slot.hash, slot.id, slot.start, slot.length = h, value, <uint32_t>self.arena_used, <uint32_t>length
            self.arena_used += <int64_t>length
            self.count += 1
            if 2 * self.count > self.capacity:        # load at most 1/2
                self._grow()
        return value

    cdef bint _reserve_bytes(self, size_t length) except -1:
        cdef int64_t wanted = self.arena_used + <int64_t>length, new_capacity = self.arena_capacity
        cdef unsigned char* grown
        if wanted <= self.arena_capacity:
            return True
        while new_capacity < wanted:
            new_capacity *= 2
        grown = <unsigned char*>realloc(self.arena, new_capacity)
        if grown == NULL:
            return False                              # keep computing, stop remembering
        self.arena, self.arena_capacity = grown, new_capacity
        return True

    cdef int _grow(self) except -1:
        cdef uint64_t new_capacity = self.capacity * 2, i, j, new_mask = new_capacity - 1
        cdef TextSlot* grown = <TextSlot*>calloc(new_capacity, sizeof(TextSlot))
        if grown == NULL:
            raise MemoryError()
        for i in range(self.capacity):
            if self.slots[i].hash != 0:
                j = self.slots[i].hash & new_mask
                while grown[j].hash != 0:
                    j = (j + 1) & new_mask
                grown[j] = self.slots[i]
        free(self.slots)
        self.slots, self.capacity, self.mask = grown, new_capacity, new_mask
        return 0


def hash_int_id_columns(columns, seeds):
    """Keys (N, S) of S id columns, column j in key space seed ``seeds[j]``: the formula of
    :func:`hash_int_ids` per column, in one C loop that reads the S columns side by side and
    writes the key matrix row by row (the columns straight from Arrow, no (N, S) copy of the
    ids first).

    Args:
        columns: S int64 arrays of N ids each (views of a reader's columns).     # IN
        seeds: uint64 (S,).                                                     # IN
    Returns:
        int64 (N, S).
    """
    cdef const uint64_t[::1] sd = np.ascontiguousarray(seeds, dtype=np.uint64)
    cdef Py_ssize_t i, j, start, stop, m = len(columns), n
    if sd.shape[0] != m:
        raise TableInputError(f"hash_int_id_columns: {m} columns but {sd.shape[0]} seeds")
    arrays = [np.ascontiguousarray(c, dtype=np.int64).reshape(-1) for c in columns]
    n = arrays[0].shape[0] if m else 0
    for j in range(m):
        if arrays[j].shape[0] != n:
            raise TableInputError(f"hash_int_id_columns: column {j} holds {arrays[j].shape[0]} "
                                  f"ids, column 0 {n}")
    out = np.empty((n, m), dtype=np.int64)
    if n == 0 or m == 0:
        return out
    cdef int64_t[:, ::1] o = out
    cdef const int64_t[::1] column
    cdef const int64_t** ptrs = <const int64_t**>malloc(m * sizeof(int64_t*))
    cdef int64_t block[256]
    if ptrs == NULL:
        raise MemoryError()
    try:
        for j in range(m):
            column = arrays[j]
            ptrs[j] = &column[0]
        with nogil:     # blocks of rows: each column hashed in order (vectorized), the
            for start in range(0, n, 256):      # block's keys then stored into their rows
                stop = min(start + 256, n)
                for j in range(m):
                    hps_hash_ids(ptrs[j] + start, block, stop - start, ID_GOLDEN, sd[j])
                    for i in range(start, stop):
                        o[i, j] = block[i - start]
    finally:
        free(ptrs)
    return out


def hash_int_ids(ids, uint64_t space_seed):
    """Schema feature keys of integer ids: ``mix64(mix64(uint64(id) + GOLDEN) ^ space_seed)``.

    The formula of hybridps.data.hashing.feature_keys (which documents ``space_seed``), as one
    C loop (vectorized with AVX-512 where the CPU has it).

    Args:
        ids: int64 array of any shape.     # IN
        space_seed: the key space's seed.
    Returns:
        int64 keys of the same shape.
    """
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    shape = arr.shape
    cdef const int64_t[::1] v = arr.reshape(-1)
    out = np.empty(v.shape[0], dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef Py_ssize_t n = v.shape[0]
    if n:
        with nogil:
            hps_hash_ids(&v[0], &o[0], n, ID_GOLDEN, space_seed)
    return out.reshape(shape)
