"""The multihot workload's synthetic data written as Parquet files, and the reader timed on them.

What lives here: :func:`write_criteo_files` (a Criteo-layout TSV and its Parquet copy, for the
criteo workload's file cases), :func:`write_workload_parquet` (the raw ids of hybridps.data.synthetic_schema
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


def workload_columns(schema, raw):
    """The columns of a synthetic raw batch (hybridps.data.synthetic_schema) by schema name:
    the label (several tasks: each task's column, float, NaN where missing), dense floats,
    single ids, and lists as (ids, lengths)."""
    singles, lists, dense, labels = raw
    if schema.labels:
        columns = {t.column: np.ascontiguousarray(labels[:, j], dtype=np.float64)
                   for j, t in enumerate(schema.labels)}
    else:
        columns = {schema.label: labels.astype(np.int64)}
    for i, feature in enumerate(schema.dense):      # float32, as training holds them
        columns[feature.name] = np.ascontiguousarray(dense[:, i], dtype=np.float32)
    for i, feature in enumerate(schema.single_features):
        columns[feature.name] = singles[:, i].astype(np.int64)
    for feature in schema.list_features:
        columns[feature.name] = lists[feature.name]
    return columns


def arrow_table(columns):
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
                table = arrow_table(workload_columns(schema, sources[g % ranks].raw_batch(step, batch_size)))
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


def time_reader(paths, schema, batch_size, batches=20, data_cache=None):
    """Median and mean ms per batch of the ParquetReader over ``batches`` batches of rank 0
    of one rank (one core, Arrow on one thread): from the start (the reader's text id cache
    empty), and in the next pass over the files once every batch has been read (``_seen``: the
    cache holds every text value, as in a training run's later epochs). With ``data_cache``,
    through that cache of parsed parts (hybridps.data.parsed_cache)."""
    from hybridps.data.parquet import ParquetReader
    reader = ParquetReader(paths, schema, rank=0, world_size=1, data_cache=data_cache)
    per_pass = -(-reader.num_rows // batch_size)
    timed = max(batches, per_pass - 1) + batches      # the last ``batches`` come after a whole pass
    stream = reader.iter_batches(batch_size, 1 + timed)
    next(stream)                                              # opens and warms the decoder
    times = []
    for _ in range(timed):
        started = time.perf_counter()
        next(stream)
        times.append((time.perf_counter() - started) * 1000.0)
    first, seen = times[:batches], times[-batches:]
    return {"reader_ms_per_batch_median": float(np.median(first)),
            "reader_ms_per_batch_mean": float(np.mean(first)), "reader_batches_timed": len(first),
            "reader_ms_per_batch_median_seen": float(np.median(seen)),
            "batch_size": batch_size}


CRITEO_FILE_ROWS = 300_000


def criteo_file_features(dim=16):
    """The ``features:`` schema of the Parquet copy of a Criteo TSV: label, I1..I13 (log1p, as
    the Criteo reader transforms them), C1..C26 (text, each its own key space), one table."""
    return {"label": "label",
            "dense": [{"name": f"I{i + 1}", "transform": "log1p"} for i in range(13)],
            "sparse": [{"name": f"C{j + 1}", "table": "ids"} for j in range(26)],
            "tables": {"ids": {"dim": dim}}}


def write_criteo_files(out_dir, rows=CRITEO_FILE_ROWS, vocab_size=100_000, seed=0):
    """A Criteo-layout TSV (label, 13 integer counts, 26 hex tokens; Zipf(1.2) ids over
    ``vocab_size`` per field, as the synthetic workload draws them) and the same rows as one
    Parquet file (row groups of 4096 rows, or 16 of them in a smaller file); returns
    (tsv path, parquet path)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    columns = {"label": (rng.random(rows) < 0.25).astype(np.int64)}
    for i in range(13):
        columns[f"I{i + 1}"] = np.floor(rng.lognormal(1.0, 1.5, rows)).astype(np.int64)
    for j in range(26):
        ids = (rng.zipf(1.2, rows) - 1) % vocab_size
        columns[f"C{j + 1}"] = np.char.mod("%08x", ids ^ ((j * 0x9E3779B1) & 0xFFFFFFFF))
    os.makedirs(out_dir, exist_ok=True)
    tsv, parquet = os.path.join(out_dir, "criteo.tsv"), os.path.join(out_dir, "criteo.parquet")
    pd.DataFrame(columns).to_csv(tsv + ".tmp", sep="\t", header=False, index=False)
    os.replace(tsv + ".tmp", tsv)
    table = pa.table({k: (pa.array(v.tolist(), pa.string()) if k.startswith("C") else pa.array(v))
                      for k, v in columns.items()})
    # row groups are the parts ranks share out: at least 16 of them however small the file
    pq.write_table(table, parquet + ".tmp", row_group_size=max(1, min(4096, rows // 16)),
                   compression="none")
    os.replace(parquet + ".tmp", parquet)
    return tsv, parquet

