"""The multihot workload's synthetic data written as Parquet files, and the reader timed on them.

What lives here: :func:`write_workload_parquet` (the raw ids of hybridps.data.synthetic_schema
per rank and step, as ``label``, float32 dense ``I*``, int64 ``C*`` and ``list<int64>`` columns, one
row group per batch, uncompressed and without dictionary pages, so the file reads at the speed
of the decoder rather than of a codec) and :func:`time_reader` (the ParquetReader's ms per
batch on one core). What does not: the benchmark cases (hybridps.bench.train).

The row groups are laid out so that a run on the files trains every rank on the same samples as
a run on ``--data synthetic`` for as many steps as were written (then the epoch wraps).
"""
import os
import time

import numpy as np


def _columns(schema, raw):
    singles, lists, dense, labels = raw
    columns = {schema.label: labels.astype(np.int64)}
    for i, feature in enumerate(schema.dense):      # float32, as training holds them
        columns[feature.name] = np.ascontiguousarray(dense[:, i], dtype=np.float32)
    for i, feature in enumerate(schema.single_features):
        columns[feature.name] = singles[:, i].astype(np.int64)
    for feature in schema.list_features:
        columns[feature.name] = lists[feature.name]
    return columns


def _arrow_table(columns):
    """The columns as an Arrow table whose fields are declared non-nullable (the generator
    leaves nothing missing), as a writer that knows its data declares them: Parquet then
    stores no definition levels for them, which makes the list columns about 20% cheaper to
    decode (measured: 1.35 against 1.64 ms per 4096 rows)."""
    import pyarrow as pa
    fields, arrays = [], []
    for name, value in columns.items():
        if isinstance(value, tuple):                      # (ids, lengths) -> list<int64>
            ids, lengths = value
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            kind = pa.list_(pa.field("element", pa.int64(), nullable=False))
            array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int64))).cast(kind)
        else:
            array = pa.array(value)
        fields.append(pa.field(name, array.type, nullable=False))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_workload_parquet(out_dir, schema, config, ranks, batches_per_rank, batch_size):
    """Write ``ranks`` files of ``batches_per_rank`` row groups of ``batch_size`` rows; returns
    their paths. Row groups go round-robin to the ranks over the files in order, so row group
    ``g`` of file ``f`` holds rank ``g % ranks``'s synthetic batch of step
    ``(f * batches_per_rank + g) // ranks`` (``batches_per_rank`` is rounded up to a multiple of
    ``ranks`` for that)."""
    import pyarrow.parquet as pq
    from hybridps.data.synthetic_schema import make_schema_synthetic
    per_file = -(-batches_per_rank // ranks) * ranks
    sources = [make_schema_synthetic(schema, config, rank, ranks) for rank in range(ranks)]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for f in range(ranks):
        path = os.path.join(out_dir, f"part-{f:03d}.parquet")
        writer = None
        try:
            for g in range(per_file):
                step = (f * per_file + g) // ranks
                table = _arrow_table(_columns(schema, sources[g % ranks].raw_batch(step, batch_size)))
                if writer is None:
                    writer = pq.ParquetWriter(path + ".tmp", table.schema, compression="none",
                                              use_dictionary=False)
                writer.write_table(table, row_group_size=batch_size)
        finally:
            if writer is not None:
                writer.close()
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def time_reader(paths, schema, batch_size, batches=20):
    """Median and mean ms per batch of the ParquetReader over ``batches`` batches of rank 0
    of one rank (one core, Arrow on one thread)."""
    from hybridps.data.parquet import ParquetReader
    reader = ParquetReader(paths, schema, rank=0, world_size=1)
    times = []
    stream = reader.iter_batches(batch_size, batches + 1)
    next(stream)                                              # opens and warms the decoder
    while True:
        started = time.perf_counter()
        try:
            next(stream)
        except StopIteration:
            break
        times.append((time.perf_counter() - started) * 1000.0)
    return {"reader_ms_per_batch_median": float(np.median(times)),
            "reader_ms_per_batch_mean": float(np.mean(times)), "reader_batches_timed": len(times),
            "batch_size": batch_size}
