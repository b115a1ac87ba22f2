# cython: language_level=3
"""Sizing of hybridps's open-addressing tables (all powers of two, probed from a hash's top bits).

The scratch tables of one call (distinct keys and owners in kernels.pyx, duplicate row
gradients summed in hashtable.pyx) take :func:`scratch_slots`; every table, the embedding
tables' slot arrays too, maps a 64-bit hash to its home slot with ``hash >> slot_shift(cap)``.
"""
from libc.stdint cimport uint64_t


cdef inline uint64_t scratch_slots(uint64_t n) noexcept nogil:
    """Slots of a scratch table for ``n`` keys: the smallest power of two >= max(16, 2 n), so
    its load stays at most one half."""
    cdef uint64_t cap = 16
    while cap < 2 * n:
        cap <<= 1
    return cap


cdef inline int slot_shift(uint64_t cap) noexcept nogil:
    """The right shift that turns a 64-bit hash into a slot of a table of ``cap`` slots (a power
    of two >= 2): its top log2(cap) bits."""
    cdef int shift = 64
    while (1ULL << (64 - shift)) < cap:
        shift -= 1
    return shift
