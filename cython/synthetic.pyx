# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Per-batch kernels of the synthetic CTR generator (hybridps.data.synthetic).

What lives here: the two loops that run over every (sample, field) of a synthetic batch and
were most of its cost as numpy expressions (about 3 of 5 ms per 4096 x 26 batch):
``pick_keys`` (Walker alias pick of the Zipf IDs fused with the integer feature hashing) and
``planted_logits`` (the planted model's logit of each sample). The formulas are the ones the
module docstring of hybridps.data.synthetic states; the random numbers themselves still come
from numpy's PCG64 Generator, so the batches stay a pure function of (seed, rank, step).
What does not: anything random, and the bias calibration (Python, once per dataset).
"""

from libc.stdint cimport int64_t, uint64_t, int32_t, uint16_t
from mix64 cimport mix64_c

import numpy as np

from hybridps.errors import DataError

ctypedef fused index_t:
    int32_t
    int64_t




def pick_keys(const index_t[:, ::1] candidates, const float[:, ::1] coins,
              const float[::1] accept, const index_t[::1] alias,
              const int64_t[::1] columns, const uint64_t[::1] field_offsets,
              int64_t[:, ::1] keys):
    """Alias-method Zipf IDs of some fields, written as their integer feature keys.

    For sample i and the j-th of ``columns`` (field f = columns[j]):
    ``id = c if coins[i, j] < accept[c] else alias[c]`` with ``c = candidates[i, j]``, and
    ``keys[i, f] = splitmix64(uint64(id) + field_offsets[f])``
    (hybridps.data.hashing.integer_feature_keys).

    Args:
        candidates: (B, J) uniform draws in [0, vocab).                     # IN
        coins: (B, J) uniform float32 draws in [0, 1).                      # IN
        accept, alias: the alias table of the fields' vocabulary (vocab,).   # IN
        columns: (J,) field index of each column.                           # IN
        field_offsets: (F,) uint64 offset of each field.                    # IN
        keys: (B, F) int64 keys.                                            # OUT (columns only)
    """
    cdef Py_ssize_t n = candidates.shape[0], width = candidates.shape[1], i, j
    cdef Py_ssize_t vocab = accept.shape[0]
    if coins.shape[0] != n or coins.shape[1] != width or columns.shape[0] != width:
        raise DataError("pick_keys: candidates, coins and columns disagree in shape")
    if alias.shape[0] != vocab or keys.shape[0] != n:
        raise DataError("pick_keys: alias table or key array has the wrong length")
    for j in range(width):
        if not 0 <= columns[j] < keys.shape[1] or columns[j] >= field_offsets.shape[0]:
            raise DataError(f"pick_keys: column {columns[j]} is not a field of the key array")
    cdef index_t c
    cdef int64_t f
    with nogil:
        for i in range(n):
            for j in range(width):
                c = candidates[i, j]
                if c < 0 or c >= vocab:     # cannot happen for draws in [0, vocab); keeps memory safe
                    c = 0
                if not coins[i, j] < accept[c]:
                    c = alias[c]
                f = columns[j]
                keys[i, f] = <int64_t>mix64_c(<uint64_t>c + field_offsets[f])


def planted_logits(const int64_t[:, ::1] keys, const float[:, ::1] dense,
                   const double[::1] dense_weights, double bias, uint64_t salt_w,
                   double w_scale, const uint64_t[::1] salt_v, double v_scale,
                   int planted_dim):
    """The planted model's logit of each sample (float64, shape (B,)).

    ``logit = bias + field_term + dense . dense_weights + interaction`` where, with
    ``h = splitmix64(key ^ salt_w)`` and ``z`` the sum over fields of the four 16-bit chunks of
    ``h``: ``field_term = (z / 65536 - 2 F) * sqrt(3) * w_scale``; and, with ``v(key)_j`` the
    16-bit chunk ``j % 4`` (low bits first) of ``splitmix64(key ^ salt_v[j // 4])`` mapped to
    ``chunk * 2 v_scale / 65536 - v_scale``: ``interaction = sum_{f<g} <v(key_f), v(key_g)>
    = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2``. Sums in float64.

    Args:
        keys: (B, F) int64 feature keys.                  # IN
        dense: (B, D) float32 dense features.             # IN
        dense_weights: (D,) float64 planted dense weights. # IN
        salt_v: (ceil(planted_dim / 4),) uint64 salts.     # IN
    """
    cdef Py_ssize_t n = keys.shape[0], fields = keys.shape[1], num_dense = dense.shape[1]
    cdef Py_ssize_t i, f, d, j
    if dense.shape[0] != n or dense_weights.shape[0] != num_dense:
        raise DataError(f"planted_logits: dense {dense.shape[0]}x{dense.shape[1]} does not fit "
                        f"keys {n}x{fields} and {dense_weights.shape[0]} dense weights")
    if planted_dim < 0 or planted_dim > 64 or salt_v.shape[0] * 4 < planted_dim:
        raise DataError(f"planted_logits: planted_dim {planted_dim} needs "
                        f"{(planted_dim + 3) // 4} salts, got {salt_v.shape[0]}")
    out = np.empty(n, dtype=np.float64)
    cdef double[::1] logit = out
    cdef double field_scale = 1.7320508075688772 * w_scale
    cdef double v_mul = 2.0 * v_scale / 65536.0
    cdef double s[64]
    cdef double sq, acc, v
    cdef uint64_t h, z, key
    cdef int q, c, width
    cdef int groups = (planted_dim + 3) // 4 if v_scale > 0.0 else 0
    with nogil:
        for i in range(n):
            z = 0
            sq = 0.0
            for j in range(planted_dim):
                s[j] = 0.0
            for f in range(fields):
                key = <uint64_t>keys[i, f]
                h = mix64_c(key ^ salt_w)
                z += (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48)
                for q in range(groups):          # one hash gives 4 components of v(key)
                    h = mix64_c(key ^ salt_v[q])
                    width = planted_dim - 4 * q if planted_dim - 4 * q < 4 else 4
                    for c in range(width):
                        v = <double>((h >> (16 * c)) & 0xFFFF) * v_mul - v_scale
                        s[4 * q + c] += v
                        sq += v * v
            acc = bias + (<double>z * (1.0 / 65536.0) - 2.0 * fields) * field_scale
            for d in range(num_dense):
                acc += <double>dense[i, d] * dense_weights[d]
            if groups:
                for j in range(planted_dim):
                    acc += 0.5 * s[j] * s[j]
                acc -= 0.5 * sq
            logit[i] = acc
    return out


def alias_ids(const index_t[::1] candidates, const float[::1] coins, const float[::1] accept,
              const index_t[::1] alias):
    """Walker alias picks: ``id = c if coins[i] < accept[c] else alias[c]``, c = candidates[i].

    Args:
        candidates: (N,) uniform draws in [0, vocab).     # IN
        coins: (N,) uniform float32 draws in [0, 1).      # IN
        accept, alias: the alias table (vocab,).          # IN
    Returns:
        int64 ids (N,).
    """
    cdef Py_ssize_t n = candidates.shape[0], i, vocab = accept.shape[0]
    if coins.shape[0] != n or alias.shape[0] != vocab:
        raise DataError("alias_ids: candidates, coins and the alias table disagree in shape")
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef index_t c
    with nogil:
        for i in range(n):
            c = candidates[i]
            if c < 0 or c >= vocab:
                c = 0
            if not coins[i] < accept[c]:
                c = alias[c]
            o[i] = c
    return out


def key_weights(const int64_t[::1] keys, uint64_t salt_w, double w_scale):
    """The planted weight of each key: ``(z / 65536 - 2) * sqrt(3) * w_scale`` with ``z`` the
    sum of the four 16-bit chunks of ``splitmix64(key ^ salt_w)`` (the per-key term of
    ``planted_logits``), float64 (N,)."""
    cdef Py_ssize_t n = keys.shape[0], i
    out = np.empty(n, dtype=np.float64)
    cdef double[::1] o = out
    cdef uint64_t h
    cdef double scale = 1.7320508075688772 * w_scale
    with nogil:
        for i in range(n):
            h = mix64_c(<uint64_t>keys[i] ^ salt_w)
            o[i] = (<double>((h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48))
                    * (1.0 / 65536.0) - 2.0) * scale
    return out
