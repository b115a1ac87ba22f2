"""hybridps.data.hashing's formulas in TensorFlow ops, for the exported SavedModel.

What lives here: the functions that turn raw values into embedding keys inside a graph, so a
SavedModel (and TF Serving running it) takes text and integer values and computes the keys
the readers compute, with no custom op and no ``py_function``:

* :func:`blake2b_64`: BLAKE2b with ``digest_size=8`` and a personalisation (RFC 7693), in
  uint64 adds, xors, shifts; the bytes come from ``tf.io.decode_raw`` (little-endian words of
  each value padded with zeros). Messages of any length: a ``tf.while_loop`` runs one
  compression per 128-byte block, up to the longest value of the batch (a batch is padded to
  that length, so one very long value costs memory for every row of its batch).
* :func:`text_ids`: ``hybridps.data.hashing.text_id`` of text values: "" is the missing id
  -1, the canonical decimal form of an int64 is that integer, other text is BLAKE2b with
  personalisation ``hybridps-value-1``.
* :func:`space_keys`: the keys of int64 ids in a key space (splitmix64 finalizer, twice).
* :func:`criteo_keys`: ``hybridps.data.hashing.feature_keys`` of the Criteo preset's text
  values (BLAKE2b of ``field 0x1F value`` with personalisation ``hybridps-feat-v1``; "" is the
  field's missing key).

Values are bytes as TensorFlow holds them: text is hashed as its UTF-8 bytes, as the readers
hash it. What does not live here: the formulas' definition and their Python implementation
(hybridps.data.hashing, the reference the tests compare with), the serving module
(hybridps.export.saved_model).
"""
import numpy as np

from hybridps.data.hashing import (GOLDEN, HASH_PERSON, MISSING_ID, VALUE_PERSON, missing_key,
                                   space_seed)

_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_IV = (0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
       0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179)
_SIGMA = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
          (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
          (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
          (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
          (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
          (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
          (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
          (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
          (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0))
_BLOCK = 128                      # bytes per BLAKE2b block
_INT64_MAX_HEAD = 922337203685477580     # int64 max (9223372036854775807) without its last digit


def _u64(tf, value):
    """A uint64 constant of an int or a list of ints (through numpy: a list of Python ints
    above 2**63 would otherwise be converted through float64 in a graph, losing bits)."""
    return tf.constant(np.array(value, dtype=np.uint64))


def _rotr(tf, x, n):
    return tf.bitwise.bitwise_or(tf.bitwise.right_shift(x, _u64(tf, n)),
                                 tf.bitwise.left_shift(x, _u64(tf, 64 - n)))


def _compress(tf, h, m, counter, last_mask):
    """One BLAKE2b compression of every row: ``h`` (B, 8) and ``m`` (B, 16) uint64, ``counter``
    the bytes hashed so far (uint64 (B,)), ``last_mask`` all ones on the last block. The 16
    working words are four (B, 4) rows a, b, c, d: G runs on the four columns at once, then on
    the four diagonals (b, c, d rotated by 1, 2, 3 lanes)."""
    xor = tf.bitwise.bitwise_xor
    zeros = tf.zeros_like(counter)
    a, b = h[:, :4], h[:, 4:]
    c = tf.broadcast_to(_u64(tf, _IV[:4]), tf.shape(a))
    d = xor(_u64(tf, _IV[4:]), tf.stack([counter, zeros, last_mask, zeros], axis=1))

    def g(a, b, c, d, x, y):
        a = a + b + x
        d = _rotr(tf, xor(d, a), 32)
        c = c + d
        b = _rotr(tf, xor(b, c), 24)
        a = a + b + y
        d = _rotr(tf, xor(d, a), 16)
        c = c + d
        b = _rotr(tf, xor(b, c), 63)
        return a, b, c, d

    def lanes(x, order):
        return tf.gather(x, order, axis=1)

    for r in range(12):
        s = _SIGMA[r % 10]
        a, b, c, d = g(a, b, c, d, lanes(m, s[0:8:2]), lanes(m, s[1:8:2]))
        b, c, d = lanes(b, [1, 2, 3, 0]), lanes(c, [2, 3, 0, 1]), lanes(d, [3, 0, 1, 2])
        a, b, c, d = g(a, b, c, d, lanes(m, s[8:16:2]), lanes(m, s[9:16:2]))
        b, c, d = lanes(b, [3, 0, 1, 2]), lanes(c, [2, 3, 0, 1]), lanes(d, [1, 2, 3, 0])
    return xor(xor(h, tf.concat([a, b], axis=1)), tf.concat([c, d], axis=1))


def _mask(tf, condition):
    """uint64 all ones where ``condition``, else 0."""
    return tf.bitcast(-tf.cast(condition, tf.int64), tf.uint64)


def blake2b_64(tf, messages, person):
    """BLAKE2b(message, digest_size=8, person=person) of each string of a 1-D string tensor,
    as uint64 (B,): the 8 digest bytes read little-endian (``int.from_bytes(digest, "little")``)."""
    # plain TensorFlow ops: autograph would only spend time converting the unrolled rounds
    return tf.autograph.experimental.do_not_convert(_blake2b_64)(tf, messages, person)


def _blake2b_64(tf, messages, person):
    if len(person) > 16:
        raise ValueError(f"a BLAKE2b personalisation holds at most 16 bytes, got {person!r}")
    person = person.ljust(16, b"\0")
    lengths = tf.cast(tf.strings.length(messages), tf.int64)
    blocks = tf.maximum((lengths + _BLOCK - 1) // _BLOCK, 1)            # "" is one zero block
    max_blocks = tf.reduce_max(tf.concat([blocks, tf.ones([1], tf.int64)], 0))
    words = tf.io.decode_raw(messages, tf.int64, little_endian=True,
                             fixed_length=tf.cast(max_blocks * _BLOCK, tf.int32))
    words = tf.reshape(words, [-1, max_blocks * 16])                    # (B, blocks * 16)
    rows = tf.shape(messages, out_type=tf.int64)[0]
    first = [_IV[0] ^ 0x01010008, _IV[1], _IV[2], _IV[3], _IV[4], _IV[5],
             _IV[6] ^ int.from_bytes(person[:8], "little"), _IV[7] ^ int.from_bytes(person[8:], "little")]
    h0 = tf.broadcast_to(_u64(tf, first), tf.stack([rows, tf.constant(8, tf.int64)]))

    def body(block, h):
        block_words = tf.slice(words, tf.stack([tf.constant(0, tf.int64), block * 16]),
                               tf.stack([rows, tf.constant(16, tf.int64)]))
        counter = tf.bitcast(tf.minimum(lengths, (block + 1) * _BLOCK), tf.uint64)
        compressed = _compress(tf, h, tf.bitcast(block_words, tf.uint64), counter,
                               _mask(tf, tf.equal(block, blocks - 1)))
        keep = _mask(tf, tf.less(block, blocks))[:, None]              # rows still hashing
        xor = tf.bitwise.bitwise_xor
        return block + 1, xor(h, tf.bitwise.bitwise_and(xor(h, compressed), keep))

    _, h = tf.while_loop(lambda block, h: tf.less(block, max_blocks), body,
                         [tf.constant(0, tf.int64), h0],
                         shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, 8])])
    return h[:, 0]


def _canonical_int64(tf, text):
    """(the int64 a text is the canonical decimal form of, whether it is one) of a 1-D string
    tensor: no "+", no leading zeros, no "-0", within int64 (hybridps.data.hashing._canonical_int)."""
    candidate = tf.strings.regex_full_match(text, "0|-?[1-9][0-9]{0,18}")
    text = tf.where(candidate, text, tf.fill(tf.shape(text), "0"))    # substr needs 1+ bytes
    negative = tf.equal(tf.strings.substr(text, 0, 1), "-")
    body = tf.where(negative, tf.strings.substr(text, 1, 19), text)
    digits = tf.strings.length(body)
    head = tf.where(digits > 1, tf.strings.substr(body, tf.zeros_like(digits), digits - 1),
                    tf.fill(tf.shape(text), "0"))
    head = tf.strings.to_number(head, tf.int64)                        # at most 18 digits: fits
    last = tf.strings.to_number(tf.strings.substr(body, digits - 1, tf.ones_like(digits)), tf.int64)
    fits = tf.logical_or(head < _INT64_MAX_HEAD,
                         tf.logical_and(tf.equal(head, _INT64_MAX_HEAD),
                                        last <= 7 + tf.cast(negative, tf.int64)))
    head = tf.where(fits, head, tf.zeros_like(head))
    magnitude_head = head * 10
    value = tf.where(negative, -magnitude_head - last, magnitude_head + last)
    is_number = tf.logical_and(candidate, fits)
    return tf.where(is_number, value, tf.zeros_like(value)), is_number


def text_ids(tf, text):
    """hybridps.data.hashing.text_id of every value of a string tensor (any shape), int64."""
    flat = tf.reshape(text, [-1])
    hashed = tf.bitcast(blake2b_64(tf, flat, VALUE_PERSON), tf.int64)
    number, is_number = _canonical_int64(tf, flat)
    ids = tf.where(is_number, number, hashed)
    ids = tf.where(tf.equal(flat, ""), tf.fill(tf.shape(ids), tf.constant(MISSING_ID, tf.int64)), ids)
    return tf.reshape(ids, tf.shape(text))


def _mix64(tf, z):
    xor, shift = tf.bitwise.bitwise_xor, tf.bitwise.right_shift
    z = xor(z, shift(z, _u64(tf, 30))) * _u64(tf, _M1)
    z = xor(z, shift(z, _u64(tf, 27))) * _u64(tf, _M2)
    return xor(z, shift(z, _u64(tf, 31)))


def space_keys(tf, ids, key_space):
    """hybridps.data.hashing.space_keys of int64 ids (any shape): mix64(mix64(id + GOLDEN) ^ seed)."""
    u = tf.bitcast(ids, tf.uint64)
    seed = _u64(tf, space_seed(key_space))
    return tf.bitcast(_mix64(tf, tf.bitwise.bitwise_xor(_mix64(tf, u + _u64(tf, GOLDEN)), seed)), tf.int64)


def criteo_keys(tf, columns):
    """hybridps.data.hashing.feature_keys(f, value) of the Criteo preset's text values:
    ``columns`` a list of string (B,) tensors, field 0, 1, ...; int64 (B, fields)."""
    fields = len(columns)
    prefixes = tf.constant([f"{f}\x1f".encode("ascii") for f in range(fields)])
    values = tf.stack(columns, axis=1)                                  # (B, fields)
    joined = tf.strings.join([tf.broadcast_to(prefixes, tf.shape(values)), values])
    hashed = tf.bitcast(blake2b_64(tf, tf.reshape(joined, [-1]), HASH_PERSON), tf.int64)
    hashed = tf.reshape(hashed, tf.shape(values))
    missing = tf.broadcast_to(tf.constant(np.array([missing_key(f) for f in range(fields)], np.int64)),
                              tf.shape(values))
    return tf.where(tf.equal(values, ""), missing, hashed)
