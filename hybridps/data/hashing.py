"""Stable 64-bit feature hashing: (field, raw value) -> int64 embedding key.

Every function here is a fixed, documented formula: the same input gives the same key in every
process, on every machine and in every Python version. Python's salted ``hash()`` is never used.
All fields may share one embedding table because the field index is part of every hash.

String values (``feature_keys``)
--------------------------------
::

    key(field, value) = int64_le( BLAKE2b(ascii(str(field)) + b"\\x1f" + utf8(value),
                                          digest_size=8, person=b"hybridps-feat-v1") )

i.e. the field index in decimal ASCII, the unit-separator byte 0x1F, then the UTF-8 bytes of the
value (``bytes`` values are used as they are, so ``"ab"`` and ``b"ab"`` give the same key); the
8-byte BLAKE2b digest with personalisation ``hybridps-feat-v1`` is read as a little-endian
signed int64. A *missing* value (``None``, ``""``, ``b""`` or a float NaN) maps to the
field's reserved missing key::

    missing_key(field) = int64_le( BLAKE2b(ascii(str(field)) + b"\\x1e",
                                           digest_size=8, person=b"hybridps-feat-v1") )

(record separator 0x1E instead of 0x1F: no real value hashes the same input). The byte string
before the first 0x1F/0x1E identifies the field, so distinct (field, value) pairs are distinct
hash inputs; their keys collide only by a 64-bit hash collision. Each distinct value is hashed
once per call (values repeat a lot in CTR data), about 0.4 us per distinct value.

Integer IDs (``integer_feature_keys``)
--------------------------------------
::

    key(field, id) = int64( splitmix64_finalizer( uint64(id) + (field << 48) + GOLDEN ) )

with wrapping uint64 arithmetic, ``GOLDEN = 0x9E3779B97F4A7C15`` and the splitmix64 finalizer
``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``
(the same mixer as ``hybridps._hashtable.mix64``). Negative ids are taken modulo 2**64. The
finalizer is a bijection, so: distinct ids of one field never collide (for any int64 ids), and
ids of different fields never collide as long as ids lie in [0, 2**48) (field < 2**16).
These two formulas are the Criteo preset's and the synthetic generator's.

Schema features (``space_keys``, ``text_ids``)
----------------------------------------------
A feature of a ``features:`` schema hashes its values by its *key space* (its table's name
unless it sets ``key_space:``), so features that share a key space share rows for equal values.
Every value is first an int64 *id*: an integer is itself; text that is the canonical decimal
form of an int64 (``"42"``, ``"-7"``, ``"0"``; no sign ``+``, no leading zeros, no spaces) is that
integer, so a CSV and a Parquet file of the same data give the same keys; other text is ::

    text_id(s) = int64_le( BLAKE2b(utf8(s), digest_size=8, person=b"hybridps-value-1") )

A missing value (an empty CSV cell, a Parquet null) is the id -1. Then ::

    space_seed(space) = uint64_le( BLAKE2b(utf8(space), digest_size=8, person=b"hybridps-space-1") )
    key(space, id)    = int64( mix64( mix64(uint64(id) + GOLDEN) ^ space_seed(space) ) )

(``hybridps._kernels.hash_int_ids``, about 1 ns per id). The exported SavedModel computes
``text_id``, ``space_keys`` and ``feature_keys`` in TensorFlow ops (hybridps.export.tf_hashing),
so TF Serving takes the raw values and hashes them itself.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Iterable, Union

import numpy as np

from hybridps.errors import ConfigError, DataError

try:  # the C loop is ~7x faster than numpy; both compute the same splitmix64 finalizer
    from hybridps._hashtable import mix64 as _mix64_c
except ImportError:  # pragma: no cover - the package is always built with its extensions
    _mix64_c = None

__all__ = ["feature_keys", "missing_key", "integer_feature_keys", "splitmix64", "space_keys",
           "space_seed", "text_ids", "MISSING_ID", "HASH_PERSON", "MAX_FIELDS", "FIELD_SHIFT",
           "GOLDEN"]

HASH_PERSON = b"hybridps-feat-v1"
VALUE_SEP = b"\x1f"
MISSING_SEP = b"\x1e"
FIELD_SHIFT = 48
MAX_FIELDS = 1 << 16
GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK64 = (1 << 64) - 1


def _check_field(field) -> int:
    try:
        if isinstance(field, bool):
            raise TypeError
        f = operator.index(field)
    except TypeError:
        raise ConfigError(f"field index must be an integer, got {field!r}") from None
    if not 0 <= f < MAX_FIELDS:
        raise ConfigError(f"field index must be in [0, {MAX_FIELDS}), got {f}")
    return f


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of a uint64 (or int64, reinterpreted) array, as a new uint64 array.

    Uses ``hybridps._hashtable.mix64`` (C loop) when available, else numpy uint64 arithmetic;
    both give identical results.
    """
    a = np.asarray(z)
    if a.dtype == np.int64:
        a = a.view(np.uint64)
    elif a.dtype != np.uint64:
        raise DataError(f"splitmix64 needs a uint64 or int64 array, got dtype {a.dtype}")
    shape = a.shape
    if _mix64_c is not None:
        return _mix64_c(np.ascontiguousarray(a).reshape(-1).view(np.int64)).reshape(shape)
    return _splitmix64_numpy(a)


def _splitmix64_numpy(a: np.ndarray) -> np.ndarray:
    z = a.astype(np.uint64, copy=True)
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _field_prefix(field: int) -> bytes:
    return str(field).encode("ascii")


def _base_hasher(field: int):
    h = hashlib.blake2b(digest_size=8, person=HASH_PERSON)
    h.update(_field_prefix(field) + VALUE_SEP)
    return h


def _missing_digest(field: int) -> bytes:
    return hashlib.blake2b(_field_prefix(field) + MISSING_SEP, digest_size=8,
                           person=HASH_PERSON).digest()


def missing_key(field: int) -> np.int64:
    """The reserved key of a missing value (None / empty) of ``field``."""
    f = _check_field(field)
    return np.frombuffer(_missing_digest(f), dtype="<i8")[0].astype(np.int64)


def _is_scalar_value(v) -> bool:
    return v is None or isinstance(v, (str, bytes, float))


def _hash_values(field: int, flat: list) -> np.ndarray:
    """Keys of a flat list of values; hashes each distinct value once."""
    try:
        uniq = dict.fromkeys(flat)
    except TypeError:
        bad = next(v for v in flat if not isinstance(v, (str, bytes, float, type(None))))
        raise DataError(f"feature_keys(field={field}): values must be str or bytes "
                        f"(None or '' for missing), got {type(bad).__name__}") from None
    base = _base_hasher(field)
    missing = _missing_digest(field)
    digests = []
    for v in uniq:
        if isinstance(v, str):
            if not v:
                digests.append(missing)
                continue
            try:
                b = v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"feature_keys(field={field}): value {v!r} is not valid "
                                f"text ({exc.reason})") from None
        elif isinstance(v, bytes):
            if not v:
                digests.append(missing)
                continue
            b = v
        elif v is None or (isinstance(v, float) and v != v):
            digests.append(missing)
            continue
        else:
            raise DataError(
                f"feature_keys(field={field}): values must be str or bytes (None or '' for "
                f"missing), got {type(v).__name__} {v!r}; hash integer IDs with "
                f"integer_feature_keys")
        h = base.copy()
        h.update(b)
        digests.append(h.digest())
    ukeys = np.frombuffer(b"".join(digests), dtype="<i8").astype(np.int64)
    if len(uniq) == len(flat):
        # all values distinct: dict order is the input order
        return ukeys
    pos = dict(zip(uniq, range(len(uniq))))
    idx = np.fromiter(map(pos.__getitem__, flat), dtype=np.intp, count=len(flat))
    return ukeys[idx]


def feature_keys(field: int, values: Union[str, bytes, None, Iterable, np.ndarray]):
    """Stable int64 keys of categorical values of one field (formula in the module docstring).

    Args:
        field: the field index (0 <= field < 2**16), part of every hash.
        values: one value (str, bytes or None) or a list/tuple/numpy array of them. ``None``,
            empty strings and float NaN are *missing* and map to ``missing_key(field)``.
    Returns:
        An int64 array with the shape of ``values`` (a numpy int64 scalar for one value).
    Raises:
        ConfigError: bad field index. DataError: a value that is not str/bytes/missing.
    """
    f = _check_field(field)
    if _is_scalar_value(values):
        return _hash_values(f, [values])[0]
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "USO":
            raise DataError(f"feature_keys(field={f}): values must be strings, got a numpy "
                            f"array of dtype {values.dtype}; hash integer IDs with "
                            f"integer_feature_keys")
        shape = values.shape
        flat = values.ravel().tolist()
    else:
        flat = list(values)
        shape = (len(flat),)
    if not flat:
        return np.empty(shape, dtype=np.int64)
    return _hash_values(f, flat).reshape(shape)


def _field_offset(field: int) -> np.uint64:
    return np.uint64(((field << FIELD_SHIFT) + GOLDEN) & _MASK64)


def integer_feature_keys(field: int, ids) -> np.ndarray:
    """Stable int64 keys of integer IDs of one field (formula in the module docstring).

    Vectorized (no Python loop). Args: ``field`` (0 <= field < 2**16) and ``ids``, an integer
    array-like of any shape (or one integer). Returns int64 keys of the same shape.
    """
    f = _check_field(field)
    try:
        a = np.asarray(ids)
    except OverflowError:
        raise DataError(f"integer_feature_keys(field={f}): ids do not fit in 64 bits") from None
    if a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind in "fO":
            a = a.astype(np.int64)
        else:
            raise DataError(f"integer_feature_keys(field={f}): ids must be integers, got "
                            f"dtype {a.dtype}")
    shape = a.shape
    flat = a.reshape(-1)
    if flat.dtype == np.uint64:
        u = flat
    else:
        u = flat.astype(np.int64, copy=False).view(np.uint64)
    out = splitmix64(u + _field_offset(f)).view(np.int64).reshape(shape)
    if out.ndim == 0:
        return out[()]
    return out


# ---------------------------------------------------------------------------- schema features
SPACE_PERSON = b"hybridps-space-1"
VALUE_PERSON = b"hybridps-value-1"
MISSING_ID = -1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def space_seed(key_space: str) -> int:
    """The uint64 seed of a key space (module docstring), as a Python int."""
    if not isinstance(key_space, str) or not key_space:
        raise ConfigError(f"a key space must be a non-empty string, got {key_space!r}")
    digest = hashlib.blake2b(key_space.encode("utf-8"), digest_size=8, person=SPACE_PERSON).digest()
    return int.from_bytes(digest, "little")


def space_keys(key_space: str, ids) -> np.ndarray:
    """Keys of int64 ``ids`` (any shape) in ``key_space``: ``mix64(mix64(id + GOLDEN) ^ seed)``."""
    from hybridps._kernels import hash_int_ids
    return hash_int_ids(np.asarray(ids, dtype=np.int64), space_seed(key_space))


def _canonical_int(text: str):
    """The int a text is the canonical decimal form of, or None."""
    if not text or len(text) > 20:
        return None
    body = text[1:] if text[0] == "-" else text
    if not body.isdigit() or not body.isascii() or (body[0] == "0" and len(body) > 1) \
            or text == "-0":
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def text_id(value) -> int:
    """The int64 id of one value: an int, canonical decimal text, other text (BLAKE2b), or
    missing (None, "", NaN: -1)."""
    if value is None or (isinstance(value, float) and value != value):
        return MISSING_ID
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise DataError(f"a categorical value must be an integer or text, got "
                        f"{type(value).__name__} {value!r}")
    if value == "":
        return MISSING_ID
    number = _canonical_int(value)
    if number is not None:
        return number
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=VALUE_PERSON).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_ids(values) -> np.ndarray:
    """int64 ids of a sequence of values (text_id of each; each distinct value computed once)."""
    values = list(values)
    distinct = dict.fromkeys(values)
    ids = {v: text_id(v) for v in distinct}
    return np.fromiter((ids[v] for v in values), dtype=np.int64, count=len(values))
