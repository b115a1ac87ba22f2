"""Reader of TFRecord files of ``tf.train.Example`` described by a feature schema.

Features are named as the schema's columns: ``int64_list`` or ``bytes_list`` for sparse
features (one value for a single-valued feature, any number for a list feature; no value is
missing), ``float_list`` (or ``int64_list``) of one value for dense features and the label.
A record becomes the same columns a Parquet file gives (hybridps.data.columns), so the same rows
give the same batches. Parts are files: every file goes round-robin to the ranks
(hybridps.data.partitioned); a file's record count is read from its framing (lengths only) at
start-up. Parsing runs in TensorFlow's ``tf.io.parse_example`` over whole files.
"""
import struct

import numpy as np

from hybridps.data.partitioned import PartitionedReader
from hybridps.errors import DataError


class TFRecordReader(PartitionedReader):
    """This rank's TFRecord files (see the module docstring and PartitionedReader)."""

    kind = "tfrecord"
    part_name = "file"

    def _list_units(self):
        return [(path, 0, _count_records(path)) for path in self.paths]

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
            items = pa.array([v.decode("utf-8") for v in flat]) if flat.dtype == object else pa.array(flat)
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
                if flat.dtype == object:          # bytes_list: text, None where missing
                    texts = iter(v.decode("utf-8") for v in flat)
                    arrays[column] = pa.array([None if m else next(texts) for m in missing], pa.string())
                else:
                    values = np.zeros(len(lengths), dtype=flat.dtype)
                    values[~missing] = flat
                    arrays[column] = pa.array(values, mask=missing)
        return pa.table(arrays)


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
    """Records of a TFRecord file, from its framing: uint64 length, uint32 crc, data, uint32 crc."""
    count = 0
    try:
        with open(path, "rb") as fh:
            while True:
                head = fh.read(8)
                if not head:
                    return count
                if len(head) < 8:
                    raise DataError(f"{path}, record {count}: truncated (a length field of "
                                    f"{len(head)} bytes); not a complete TFRecord file")
                (length,) = struct.unpack("<Q", head)
                fh.seek(4 + length + 4, 1)
                count += 1
                if fh.tell() > _size(fh):
                    raise DataError(f"{path}, record {count - 1}: truncated (its data runs past "
                                    f"the end of the file); not a complete TFRecord file")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _size(fh):
    here = fh.tell()
    fh.seek(0, 2)
    end = fh.tell()
    fh.seek(here)
    return end
