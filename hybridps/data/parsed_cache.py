"""ParsedCache: the batches a reader converted from a part of a file, kept on disk as raw arrays.

Decoding a Parquet row group (or parsing a TFRecord file) and turning its columns into keys and
floats costs far more than reading the result back: the Criteo-layout Parquet part of 4096
rows takes 10-16 ms to decode and convert on one core here, and its parsed arrays (1 MB) read
back in well under a millisecond. With ``--data-cache DIR`` a partitioned reader
(hybridps.data.partitioned) looks every part up here first, and stores each part it had to
convert, so the second epoch of a run, and every later run on the same files and schema, skips
the decode. ``hybridps prepare-data`` fills the cache ahead of a job (hybridps.data.prepare).

What lives here: the cache's keys, its file format, and loading and storing one part. What does
not: which parts a rank reads, and in what order (hybridps.data.partitioned); converting
(hybridps.data.columns).

Keys. A part's entry is named by a digest of everything its converted arrays depend on: the
cache format, the hybridps version, the reader kind, what of the schema conversion reads
(:func:`conversion_inputs`: every feature's column, form, key space, transform, fill,
separator and max_len, and the label and group_by columns; not tables, dims or optimizers),
and the source: the file's real path, size and modification time
(ns), the part and its row count. A changed file or schema therefore never reads an old entry;
old entries stay until the directory is deleted (nothing here prunes it).

Files. ``DIR/<schema digest>/<part digest>.parsed``: the magic ``HPSPARSED1``, the JSON header's
length (8 bytes, little-endian), the JSON header (the source it came from, the row count, the
sequences' truncated-id counts, and per array its name, dtype, shape and offset), then the
arrays, each starting at a multiple of 64 bytes. A file is written under a temporary name and
renamed into place, so a crash leaves either no entry or a whole one; an entry whose size or
header does not match is reported once, ignored and rewritten. The arrays carry no checksum
(hashing them on every read would cost a good part of what the cache saves): delete the
directory if the disk under it is suspect.

A cache that cannot be written (disk full, read-only) is reported once and switched off; the
run goes on reading the files.
"""
import hashlib
import json
import os
import sys

import numpy as np

from hybridps.data.batch import Batch
from hybridps.errors import ConfigError

CACHE_FORMAT = 1
MAGIC = b"HPSPARSED1"
_ALIGN = 64
#: Why other data is not cached (the warning of open_data, the error of prepare-data).
ONLY_PARTS_ARE_CACHED = ("only Parquet and TFRecord parts are cached (a Criteo or schema CSV/TSV "
                         "file is parsed once at start-up, into memory; synthetic data and streams "
                         "are not read twice)")


def _digest(value):
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(),
                           digest_size=16).hexdigest()


class ParsedCache:
    """The parsed parts of one schema's data under ``directory`` (see the module docstring).

    Args:
        directory: the cache directory (created if missing).
        schema: hybridps.schema.FeatureSchema the reader converts with.
        kind: the reader's kind ("parquet", "tfrecord"): part numbers mean different things.
    Raises:
        ConfigError: the directory cannot be created or written.
    """

    def __init__(self, directory, schema, kind):
        from hybridps import __version__
        self.schema_digest = _digest({"format": CACHE_FORMAT, "version": __version__, "kind": kind,
                                      "schema": conversion_inputs(schema)})
        self.directory = os.path.join(os.path.abspath(os.fspath(directory)), self.schema_digest)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_cache {directory!r}: cannot create {self.directory} ({exc}); "
                              f"give a writable directory, or leave data_cache unset to read the "
                              f"files every time") from None
        if not os.access(self.directory, os.W_OK):
            raise ConfigError(f"data_cache {directory!r}: {self.directory} is not writable; give "
                              f"a writable directory, or leave data_cache unset")
        self.enabled = True
        self.hits = self.misses = self.bytes_written = self.bytes_read = 0
        self._sources, self._entries = {}, {}
        self._reported = set()

    # ------------------------------------------------------------------ keys
    def _source(self, path):
        """(real path, size, mtime_ns) of a data file, once per file and run."""
        if path not in self._sources:
            st = os.stat(path)
            self._sources[path] = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        return self._sources[path]

    def entry_path(self, unit):
        """The cache file of a part ``(path, part, rows)`` (named once per part and run)."""
        if unit not in self._entries:
            path, part, rows = unit
            real, size, mtime = self._source(path)
            name = _digest({"file": real, "size": size, "mtime_ns": mtime, "part": part, "rows": rows})
            self._entries[unit] = os.path.join(self.directory, name + ".parsed")
        return self._entries[unit]

    # ------------------------------------------------------------------ load / store
    def load(self, unit):
        """The Batch of a part, or None when the cache does not hold it (``row_ids`` unset)."""
        if not self.enabled:
            return None
        entry = self.entry_path(unit)
        try:
            with open(entry, "rb") as fh:
                batch, nbytes = _read_entry(fh, unit)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError) as exc:
            self._report(entry, f"unreadable cache entry {entry} ({exc}); reading the file again "
                                f"and rewriting it")
            self.misses += 1
            return None
        self.hits += 1
        self.bytes_read += nbytes
        return batch

    def store(self, unit, batch):
        """Write a part's converted Batch (atomically: a temporary file renamed into place)."""
        if not self.enabled:
            return
        entry = self.entry_path(unit)
        temporary = f"{entry}.tmp.{os.getpid()}"
        try:
            with open(temporary, "wb") as fh:
                self.bytes_written += _write_entry(fh, unit, batch, self._source(unit[0]))
            os.replace(temporary, entry)
        except OSError as exc:
            self.enabled = False
            try:
                os.unlink(temporary)
            except OSError:
                pass
            self._report("store", f"cannot write to the data cache {self.directory} ({exc}); "
                                  f"the cache is off for the rest of this run (the files are "
                                  f"read as usual)")

    def stats(self):
        return {"directory": self.directory, "hits": self.hits, "misses": self.misses,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "enabled": self.enabled}

    def _report(self, what, message):
        if what not in self._reported:
            self._reported.add(what)
            sys.stderr.write(f"hybridps: warning: {message}\n")


def conversion_inputs(schema):
    """What of a schema the converted arrays depend on: the label and group_by columns, every
    dense feature, and every sparse feature's column, form (one id or a list), max_len,
    separator, key space and hash, in schema order. Not tables, dims, optimizers or the pooling
    of a list: a run that changes only those reads the same entries."""
    inputs = {"label": schema.label, "group_by": schema.group_by,
              "dense": [[f.name, f.column, f.transform, f.fill] for f in schema.dense],
              "sparse": [[f.name, f.column, f.is_list, f.max_len, f.separator, f.key_space, f.hash]
                         for f in schema.sparse]}
    if schema.labels or schema.weight:     # absent for one label: earlier entries stay valid
        inputs["labels"] = [[t.name, t.column, t.kind] + ([t.given] if t.given else [])
                            for t in schema.labels]
        inputs["weight"] = schema.weight
    return inputs


# ---------------------------------------------------------------------- the file format
def _arrays_of(batch):
    arrays = [("dense", batch.dense), ("keys", batch.keys), ("labels", batch.labels)]
    for name, (values, lengths) in batch.lists.items():
        arrays += [(f"lists/{name}/values", values), (f"lists/{name}/lengths", lengths)]
    if batch.groups is not None:
        arrays.append(("groups", batch.groups))
    if batch.weights is not None:
        arrays.append(("weights", batch.weights))
    return [(name, np.ascontiguousarray(a)) for name, a in arrays]


def _write_entry(fh, unit, batch, source):
    arrays = _arrays_of(batch)
    offset, described = 0, []
    for name, a in arrays:
        offset = -(-offset // _ALIGN) * _ALIGN
        described.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += a.nbytes
    header = json.dumps({"source": {"file": source[0], "size": source[1], "mtime_ns": source[2],
                                    "part": unit[1]},
                         "rows": int(batch.size), "truncated": {k: int(v) for k, v in batch.truncated.items()},
                         "lists": list(batch.lists), "arrays": described}).encode()
    start = len(MAGIC) + 8 + len(header)
    start = -(-start // _ALIGN) * _ALIGN
    fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
    fh.write(b"\0" * (start - len(MAGIC) - 8 - len(header)))
    written = 0
    for (name, a), d in zip(arrays, described):
        fh.write(b"\0" * (d["offset"] - written))
        fh.write(memoryview(a).cast("B") if a.size else b"")
        written = d["offset"] + a.nbytes
    return start + written


def _read_entry(fh, unit):
    """(Batch, bytes) of an open cache file; ValueError when it is not a whole entry of ``unit``."""
    head = fh.read(len(MAGIC) + 8)
    if len(head) != len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a hybridps parsed-data cache file")
    length = int.from_bytes(head[len(MAGIC):], "little")
    header = json.loads(fh.read(length))
    if header["rows"] != unit[2] or header["source"]["part"] != unit[1]:
        raise ValueError(f"it holds {header['rows']} rows of part {header['source']['part']}, "
                         f"not {unit[2]} of part {unit[1]}")
    start = -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN
    ends = [d["offset"] + int(np.prod(d["shape"], dtype=np.int64)) * np.dtype(d["dtype"]).itemsize
            for d in header["arrays"]]
    payload = np.empty(max(ends, default=0), dtype=np.uint8)
    fh.seek(start)
    if fh.readinto(payload) != payload.nbytes or fh.read(1):
        raise ValueError("its size does not match its header (a partial or foreign file)")
    arrays = {}
    for d, end in zip(header["arrays"], ends):
        arrays[d["name"]] = payload[d["offset"]:end].view(np.dtype(d["dtype"])).reshape(d["shape"])
    lists = {name: (arrays[f"lists/{name}/values"], arrays[f"lists/{name}/lengths"])
             for name in header["lists"]}
    batch = Batch(dense=arrays["dense"], keys=arrays["keys"], labels=arrays["labels"], lists=lists,
                  truncated=dict(header["truncated"]), groups=arrays.get("groups"),
                  weights=arrays.get("weights"))
    return batch, int(payload.nbytes)
