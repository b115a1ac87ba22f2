"""``hybridps prepare-data``: fill the cache of parsed parts (hybridps.data.parsed_cache) ahead of a job.

``hybridps prepare-data --config my.yaml --data parquet:day1/ --data-cache /scratch/cache``
decodes and converts every part of the data (every Parquet row group, every TFRecord file) once
and stores it under the cache directory, so that every epoch of the training runs that follow
with the same ``--data``, ``--data-cache`` and schema reads parsed arrays instead of decoding.
Parts already cached are checked (their header and size) and left as they are. The cache
serves any number of ranks: a part's entry does not depend on which rank reads it.

One process, no MPI; it prints its progress every few seconds and a summary line (JSON) at the
end. What does not live here: the cache itself (hybridps.data.parsed_cache), the readers.
"""
import json
import sys
import time

from hybridps.errors import ConfigError

_PROGRESS_EVERY_S = 5.0


def add_arguments(parser):
    parser.add_argument("--config", help="YAML file of TrainConfig fields: its 'features:' schema")
    parser.add_argument("--data", required=True, help="Parquet or TFRecord files, as hybridps train takes them")
    parser.add_argument("--data-cache", required=True, metavar="DIR", help="the cache directory")
    parser.add_argument("--on-bad-line", choices=["raise", "skip"],
                        help="a part that cannot be read: stop (raise, default) or skip it")
    parser.set_defaults(func=main)


def prepare(config, out=sys.stderr):
    """Convert every part of ``config.data`` into ``config.data_cache``; returns the summary dict."""
    from hybridps.data import is_partitioned_spec, open_data, preset_shape
    from hybridps.data.parsed_cache import ONLY_PARTS_ARE_CACHED
    from hybridps.schema import build_schema
    schema = build_schema(config, *preset_shape(config))
    spec = str(config.data)
    if not is_partitioned_spec(spec, schema):
        raise ConfigError(f"prepare-data: data {config.data!r} is not Parquet or TFRecord files: "
                          f"{ONLY_PARTS_ARE_CACHED}")
    reader = open_data(config, schema, rank=0, world_size=1)
    started = last = time.monotonic()
    total = len(reader.units)
    for done, _ in enumerate(reader.fill_cache(), start=1):
        now = time.monotonic()
        if now - last >= _PROGRESS_EVERY_S:
            out.write(f"prepare-data: {done}/{total} parts, {reader.rows_read:,} rows, "
                      f"{now - started:.0f} s\n")
            out.flush()
            last = now
    cache = reader.cache.stats()
    return {"parts": total, "rows": reader.rows_read, "already_cached": cache["hits"],
            "converted": cache["misses"], "bytes_written": cache["bytes_written"],
            "bad_parts": reader.bad_parts, "seconds": round(time.monotonic() - started, 3),
            "cache_directory": cache["directory"], "cache_enabled": cache["enabled"]}


def main(args):
    from hybridps.config import make_config
    overrides = {"data": args.data, "data_cache": args.data_cache, "on_bad_line": args.on_bad_line}
    config = make_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    summary = prepare(config)
    print(json.dumps(summary))
    if not summary["cache_enabled"]:
        sys.stderr.write("prepare-data: the cache could not be written (see the warning above)\n")
        return 1
    return 0
