"""Reader of TFRecord files of ``tf.train.Example`` described by a feature schema.

Features are named as the schema's columns: ``int64_list`` or ``bytes_list`` for sparse
features (one value for a single-valued feature, any number for a list feature; no value is
missing), ``float_list`` (or ``int64_list``) of one value for dense features and the label.
A record becomes the same columns a Parquet file gives (hybridps.data.columns), so the same rows
give the same batches. Parts are files: every file goes round-robin to the ranks
(hybridps.data.partitioned); a file's record count is read from its framing at start-up, on
every rank: each record's length field (and, once the framing is found broken, the checksum
(masked CRC-32C) of each length field), so a damaged length is named (file, record, byte
offset) instead of misreading the rest; the records' data checksums are checked by TensorFlow
when the file is read. With
``on_bad_line=skip`` a file of damaged framing is left out on every rank alike and counted.
Parsing runs in TensorFlow's ``tf.io.parse_example`` over whole files.
"""
import os
import struct

import numpy as np

from hybridps.data.partitioned import PartitionedReader
from hybridps.errors import DataError


class TFRecordReader(PartitionedReader):
    """This rank's TFRecord files (see the module docstring and PartitionedReader)."""

    kind = "tfrecord"
    part_name = "file"

    def _list_units(self):
        units = []
        for path in self.paths:
            count, damage = _count_records(path)
            if damage:
                self._unreadable_file(path, damage, count)
            else:
                units.append((path, 0, count))
        return units

    def _read_unit(self, unit):
        import pyarrow as pa
        import tensorflow as tf
        path = unit[0]
        columns = self.converter.required_columns()
        sparse = {f.column: f for f in self.schema.sparse}
        spec = {column: tf.io.VarLenFeature(_kind_of(path, column)) for column in columns}
        records = list(tf.data.TFRecordDataset(path).batch(1 << 30).take(1))
        if not records:
            raise DataError(f"{path}: holds no records")
        parsed = tf.io.parse_example(records[0], spec)
        arrays = {}
        for column in columns:
            values = parsed[column]
            rows = values.indices[:, 0].numpy()
            flat = values.values.numpy()
            lengths = np.bincount(rows, minlength=int(values.dense_shape[0]))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            texts = _texts(flat, rows, path, column) if flat.dtype == object else None
            items = pa.array(texts, pa.string()) if texts is not None else pa.array(flat)
            feature = sparse.get(column)
            if feature is not None and feature.is_list:
                arrays[column] = pa.ListArray.from_arrays(pa.array(offsets), items)
            else:
                if (lengths > 1).any():
                    row = int(np.flatnonzero(lengths > 1)[0])
                    raise DataError(f"{path}, record {row}: feature {column!r} holds "
                                    f"{int(lengths[row])} values; a single-valued feature, a dense "
                                    f"feature or the label holds one")
                missing = lengths == 0
                if texts is not None:             # bytes_list: text, None where missing
                    texts = iter(texts)
                    arrays[column] = pa.array([None if m else next(texts) for m in missing], pa.string())
                else:
                    values = np.zeros(len(lengths), dtype=flat.dtype)
                    values[~missing] = flat
                    arrays[column] = pa.array(values, mask=missing)
        return pa.table(arrays)


def _texts(flat, rows, path, column):
    """The values of a bytes_list feature as text; a value that is not UTF-8 is a DataError
    naming the file, the record and the feature (ids are defined on UTF-8 text, as served)."""
    try:
        return [v.decode("utf-8") for v in flat]
    except UnicodeDecodeError:
        index = next(i for i, v in enumerate(flat) if not _is_utf8(v))
        raise DataError(f"{path}, record {int(rows[index])}: feature {column!r} holds "
                        f"{bytes(flat[index][:40])!r}, which is not UTF-8 text") from None


def _is_utf8(value):
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _kind_of(path, column):
    """The tf dtype of a feature, from the first record that holds it."""
    import tensorflow as tf
    for raw in tf.data.TFRecordDataset(path).take(100):
        example = tf.train.Example.FromString(raw.numpy())
        feature = example.features.feature.get(column)
        if feature is None:
            continue
        kind = feature.WhichOneof("kind")
        if kind:
            return {"int64_list": tf.int64, "float_list": tf.float32, "bytes_list": tf.string}[kind]
    raise DataError(f"{path}: no record among the first 100 holds the feature {column!r} the "
                    f"schema reads; the records' features must be named as the schema's columns")


def _count_records(path):
    """(records, None) of a TFRecord file, from its framing (uint64 length, uint32 masked
    CRC-32C of the length, data, uint32 masked CRC-32C of the data), or (the records before
    the damage, what is damaged) for framing that is not whole. The lengths alone are
    followed first (a damaged one runs past the end of the file, or leaves a torn header);
    only then are the lengths' checksums computed, to name the record whose length is damaged."""
    count, damage = _scan_framing(path, check_lengths=False)
    if damage:
        found = _scan_framing(path, check_lengths=True)
        if found[1] and "checksum" in found[1]:
            return found
    return count, damage


def _scan_framing(path, check_lengths):
    count = 0
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            while True:
                offset = fh.tell()
                head = fh.read(12)
                if not head:
                    return count, None
                if len(head) < 12:
                    return count, (f"record {count} (byte {offset}): truncated (a header of "
                                   f"{len(head)} of 12 bytes); not a complete TFRecord file")
                length, crc = struct.unpack("<QI", head)
                if check_lengths and _masked_crc32c(head[:8]) != crc:
                    return count, (f"record {count} (byte {offset}): damaged length field (its "
                                   f"checksum does not match); not a valid TFRecord file")
                end = offset + 12 + length + 4
                if end > size:
                    return count, (f"record {count} (byte {offset}): truncated (its {length} "
                                   f"data bytes run past the end of the file, {size} bytes); "
                                   f"not a complete TFRecord file")
                fh.seek(end)
                count += 1
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data):
    """The TFRecord checksum of ``data``: CRC-32C (Castagnoli), rotated and offset ("masked")."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
