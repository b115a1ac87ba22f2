# cython: language_level=3
"""The one 64-bit mixer of hybridps: the splitmix64 finalizer (a bijection on uint64).

Everything that hashes a key in C cimports it from here: owner ranks and virtual buckets
(kernels.pyx), hash-table slots and key-seeded initial rows (hashtable.pyx), synthetic feature
keys (synthetic.pyx) and schema feature keys (kernels.pyx). hybridps._hashtable.mix64 is its
numpy-facing wrapper; tests/reference.py re-implements it in plain Python.
"""
from libc.stdint cimport uint64_t


cdef inline uint64_t mix64_c(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)
