"""hybridps.data: where training samples come from.

Every source of samples is a :class:`DataSource` (hybridps.data.source: the batches of one rank
of a world, its schema, its stats, its position and the restore of it) and yields
:class:`Batch` objects (hybridps.data.batch: dense float32 (B, D), the single-valued keys int64
(B, S), the list features as values and lengths, labels float32 (B,), or (B, T) for several
tasks, NaN where missing). A run's schema
(hybridps.schema) says which features a batch holds; :func:`open_data` opens the source a
run's ``data`` names for that schema, through one path:

* ``synthetic``: endless generated data with a planted model (:class:`SyntheticCTR` for the
  Criteo preset, hybridps.data.synthetic_schema for a ``features:`` schema);
* files: the format comes from the spec or the file names (:func:`data_format`) and one reader
  per format reads it: the Criteo preset's ``criteo`` format (:class:`CriteoReader`: the Criteo
  TSV, or CSV with a header such as the bundled :data:`SAMPLE_CRITEO_CSV`, ``sample``), and for
  a ``features:`` schema CSV/TSV (hybridps.data.schema_csv), Parquet and TFRecord
  (hybridps.data.parquet, hybridps.data.tfrecord: partitioned, with a cache of parsed parts);
  each rank reads its own share;
* streams: ``stream:DIR`` and ``redis://HOST:PORT/STREAM`` (hybridps.data.stream), rows that
  keep arriving, every step agreed by every rank.

Also here: :func:`feature_keys` / :func:`integer_feature_keys` (raw categorical values to
stable int64 keys, never Python's salted ``hash()``), :func:`roc_auc`, and
:func:`make_dataset` (the Criteo preset's sources from a spec string, without a config). This
package imports numpy only (a reader imports pyarrow when it is opened; no TensorFlow, no
mpi4py).
"""
from __future__ import annotations

import os
from typing import Union

from hybridps.data.auc import roc_auc
from hybridps.data.batch import Batch
from hybridps.data.criteo import CriteoReader, criteo_schema
from hybridps.data.hashing import feature_keys, integer_feature_keys, missing_key
from hybridps.data.source import DataSource
from hybridps.data.synthetic import SyntheticCTR
from hybridps.errors import ConfigError, DataError

__all__ = ["Batch", "DataSource", "SyntheticCTR", "CriteoReader", "feature_keys",
           "integer_feature_keys", "missing_key", "roc_auc", "SAMPLE_CRITEO_CSV", "make_dataset",
           "open_data", "preset_shape", "data_format", "data_files"]

#: The bundled 200-row Criteo sample (CSV with header; provenance in samples/NOTICE.md).
SAMPLE_CRITEO_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples",
                                 "criteo_sample.csv")

_SAMPLE_SPECS = ("sample", "criteo_sample", "criteo-sample")


def make_dataset(spec: Union[str, os.PathLike], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, on_bad_line: str = "raise",
                 **synthetic_kwargs) -> Union[SyntheticCTR, CriteoReader]:
    """The dataset named by ``spec``.

    Args:
        spec: ``"synthetic"``, ``"sample"`` (the bundled Criteo sample) or a path to a
            Criteo-format file.
        rank, world_size: this process's place in the job (each rank gets its own data).
        seed: the synthetic data seed (the file reader reads in file order and ignores it).
        on_bad_line: ``"raise"`` or ``"skip"``, for files.
        **synthetic_kwargs: further SyntheticCTR arguments (num_fields, vocab_size, zipf_a,
            ...); ``batch_size`` is accepted by both kinds.
    Raises:
        DataError: the path does not exist. ConfigError: synthetic options given for a file.
    """
    spec_str = os.fspath(spec)
    if spec_str == "synthetic":
        return SyntheticCTR(seed=seed, rank=rank, world_size=world_size, **synthetic_kwargs)
    batch_size = synthetic_kwargs.pop("batch_size", None)
    if synthetic_kwargs:
        raise ConfigError(f"options {sorted(synthetic_kwargs)} apply to synthetic data only, "
                          f"not to the data file {spec_str!r}")
    schema = criteo_schema()
    _, (path,) = data_format(spec_str, schema)
    return CriteoReader(path, rank=rank, world_size=world_size, on_bad_line=on_bad_line,
                        batch_size=batch_size, schema=schema)


def _is_file_spec(spec):
    return spec != "synthetic"


def preset_shape(config):
    """(num_fields, num_dense) of the Criteo preset for this run: a Criteo file has 26 and 13
    whatever the config says (a per-field or grouped table layout must then say 26 too);
    synthetic data has the config's."""
    if config.features is not None or not _is_file_spec(config.data):
        return config.num_fields, config.num_dense
    from hybridps.data.criteo import NUM_DENSE, NUM_FIELDS
    if (config.table_groups is not None or config.table_layout != "shared") and config.num_fields != NUM_FIELDS:
        raise ConfigError(f"the data has {NUM_FIELDS} categorical fields but the config says "
                          f"num_fields={config.num_fields}; set num_fields to match")
    return NUM_FIELDS, NUM_DENSE


def open_data(config, schema, *, rank, world_size) -> DataSource:
    """The data source of a run (see the package docstring): synthetic data, the files of a
    format (:func:`data_format`), or a stream (hybridps.data.stream).

    Args:
        config: TrainConfig (``data``, ``seed``, ``on_bad_line``, synthetic and reader options).
        schema: the run's FeatureSchema (the Criteo preset or a ``features:`` schema).
        rank, world_size: this rank's share of the data among the ranks that read it.
    Raises:
        DataError, ConfigError: naming the file or the field.
    """
    spec = os.fspath(config.data)
    from hybridps.data.stream import is_stream_spec
    if config.data_cache and rank == 0 and not is_partitioned_spec(spec, schema):
        import sys
        from hybridps.data.parsed_cache import ONLY_PARTS_ARE_CACHED
        sys.stderr.write(f"hybridps: warning: data_cache {config.data_cache!r} is not used for data "
                         f"{spec!r}: {ONLY_PARTS_ARE_CACHED}\n")
    if is_stream_spec(spec):
        from hybridps.data.merged_stream import open_streams
        return open_streams(spec, schema, rank=rank, world_size=world_size,
                            on_bad_line=config.on_bad_line, retry_seconds=config.stream_retry_seconds)
    if spec == "synthetic":
        from hybridps.data.synthetic_schema import open_synthetic
        return open_synthetic(schema, config, rank, world_size)
    kind, paths = data_format(spec, schema)
    return _READERS[kind](paths, schema, config, rank=rank, world_size=world_size)


def data_format(spec, schema):
    """(format, files) of a file spec of a run: the Criteo preset reads one Criteo-format file
    (``criteo``; ``sample`` names the bundled sample); a ``features:`` schema reads the files
    of :func:`data_files`, one file for ``csv``.

    Raises:
        DataError: nothing there. ConfigError: the sample for a ``features:`` schema, or
        several CSV files.
    """
    if schema.preset == "criteo":
        path = SAMPLE_CRITEO_CSV if spec in _SAMPLE_SPECS else spec
        if not os.path.exists(path):
            raise DataError(f"data spec {spec!r} is neither 'synthetic' nor 'sample' nor an "
                            f"existing file")
        return "criteo", [path]
    if spec in _SAMPLE_SPECS:
        raise ConfigError(f"data {spec!r} is the bundled Criteo sample, which has the Criteo "
                          f"layout; a 'features:' schema needs its own data file")
    kind, paths = data_files(spec)
    if kind == "csv" and len(paths) > 1:
        raise ConfigError(f"data {spec!r}: a CSV/TSV run reads one file, this names "
                          f"{len(paths)}; use Parquet or TFRecord parts for several files")
    return kind, paths


def _criteo_reader(paths, schema, config, **share):
    return CriteoReader(paths[0], on_bad_line=config.on_bad_line, schema=schema, **share)


def _csv_reader(paths, schema, config, **share):
    from hybridps.data.schema_csv import SchemaCSVReader
    return SchemaCSVReader(paths[0], schema, on_bad_line=config.on_bad_line, **share)


def _parquet_reader(paths, schema, config, **share):
    from hybridps.data.parquet import ParquetReader
    return ParquetReader(paths, schema, **_partitioned_options(config), **share)


def _tfrecord_reader(paths, schema, config, **share):
    from hybridps.data.tfrecord import TFRecordReader
    return TFRecordReader(paths, schema, **_partitioned_options(config), **share)


def _partitioned_options(config):
    return dict(on_bad_line=config.on_bad_line, shuffle=config.shuffle,
                shuffle_buffer=config.shuffle_buffer, seed=config.seed, data_cache=config.data_cache)


#: format -> opener (paths, schema, config, rank=, world_size=) of its reader
_READERS = {"criteo": _criteo_reader, "csv": _csv_reader, "parquet": _parquet_reader,
            "tfrecord": _tfrecord_reader}


def is_partitioned_spec(spec, schema):
    """Whether a data spec names Parquet or TFRecord files (the data a parsed cache serves).

    Raises:
        DataError: a file spec that names nothing (:func:`data_files`).
    """
    from hybridps.data.stream import is_stream_spec
    if schema.preset == "criteo" or spec == "synthetic" or spec in _SAMPLE_SPECS or is_stream_spec(spec):
        return False
    return data_files(spec)[0] in ("parquet", "tfrecord")


_SUFFIXES = {"parquet": (".parquet", ".pq"), "tfrecord": (".tfrecord", ".tfrecords", ".tfr"),
             "csv": (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")}


def data_files(spec):
    """(format, files) of a data spec of a schema run: ``parquet:PATHS``, ``tfrecord:PATHS``,
    ``csv:PATH``, or PATHS alone with the format from the file names (PATHS: a file, a
    directory, a glob, or several separated by commas: hybridps.data.files.expand_paths).

    Raises:
        DataError: nothing there, or files of several formats (or of none known) mixed.
    """
    from hybridps.data.files import expand_paths
    kind, _, rest = spec.partition(":")
    if kind in _SUFFIXES and rest:
        return kind, expand_paths(rest, _SUFFIXES[kind])
    paths = expand_paths(spec, sum(_SUFFIXES.values(), ()))
    kinds = {k for p in paths for k, suffixes in _SUFFIXES.items() if p.endswith(suffixes)}
    unknown = [p for p in paths if not any(p.endswith(s) for s in sum(_SUFFIXES.values(), ()))]
    if unknown or len(kinds) != 1:
        raise DataError(f"data {spec!r}: cannot tell the format of "
                        f"{unknown[:3] if unknown else sorted(kinds)}; name it: parquet:PATH, "
                        f"tfrecord:PATH or csv:PATH (files ending in .parquet/.pq, "
                        f".tfrecord/.tfrecords, .csv/.tsv are recognised)")
    return kinds.pop(), paths
