"""Reader of Criteo-format click logs (the Display Advertising Challenge layout).

Accepted layouts (detected from the first non-empty line of the file):

* the original training file: tab-separated, no header, 40 columns per line:
  ``label, I1..I13, C1..C26``;
* CSV with a header naming the columns ``label, I1..I13, C1..C26`` (in any order, names
  case-insensitive), e.g. the bundled ``samples/criteo_sample.csv``;
* also tab-separated with a header, or comma-separated without one.

The delimiter is a tab if the first line contains one, else a comma; the first line is a header
if its first column is not a number and it names at least one Criteo column. Files ending in ``.gz`` are decompressed on the fly.
A UTF-8 byte-order mark at the start of the file (spreadsheet exports) is ignored.
Quoting is not supported (Criteo data never quotes).

Values
------
* label: ``0`` or ``1`` (``0.0``/``1.0`` accepted).
* I1..I13 (integer counts, possibly written as floats such as ``260.0``, possibly negative):
  ``dense = log1p(max(x, 0))`` as float32; an empty (missing) value gives 0, the same as a
  zero count. This is the usual Criteo transform: it tames the heavy tails of the counts and
  maps the few negative values (``-1``) to 0.
* C1..C26: ``feature_keys(field, value)`` with field index 0..25 (C1 is field 0); an empty
  value maps to the field's reserved missing key (see :mod:`hybridps.data.hashing`).

Sharding across ranks
---------------------
Data lines are numbered 0, 1, 2, ... in file order (the header and blank lines are not data
lines). Line ``i`` belongs to rank ``i % world_size``: shares differ by at most one line, and
batch ``k`` of every rank (each of size B) together hold exactly the lines ``[k*B*W,
(k+1)*B*W)`` of the file, i.e. the same samples as batch ``k`` of a one-rank run with batch
``B*W`` (as long as no line is skipped and no epoch wraps). Each rank parses only its own lines,
so a malformed line is reported (or skipped and counted) by the rank that owns it.

Malformed lines (wrong column count, a non-numeric or non-finite integer column, a label other
than 0/1, text that is not UTF-8, a line longer than hybridps.data.files.MAX_LINE_BYTES) raise :class:`~hybridps.errors.DataError` naming the file, the 1-based line number and
the problem, or with ``on_bad_line="skip"`` are skipped and counted (``bad_lines``, ``stats()``).

The whole share is held in memory: dense float32 (N, 13), keys int64 (N, 26), labels float32.
The reader is the ``criteo`` format of the Criteo preset schema (hybridps.schema.criteo_preset,
:func:`criteo_schema`): it serves that schema's batches as every reader serves its schema's
(hybridps.data.source.DataSource).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Iterator, List, Optional

import numpy as np

from hybridps.data.files import MAX_LINE_BYTES, damaged_lines, read_bytes
from hybridps.data.share import InMemoryShare
from hybridps.data.batch import Batch, check_int, resolve_batch_size
from hybridps.data.hashing import feature_keys
from hybridps.errors import ConfigError, DataError

__all__ = ["CriteoReader", "NUM_DENSE", "NUM_FIELDS", "CRITEO_COLUMNS", "criteo_schema"]

NUM_DENSE = 13
NUM_FIELDS = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_FIELDS
CRITEO_COLUMNS = (["label"] + [f"I{i}" for i in range(1, NUM_DENSE + 1)]
                  + [f"C{i}" for i in range(1, NUM_FIELDS + 1)])
ON_BAD_LINE = ("raise", "skip")
_MAX_EXAMPLES = 10
_UTF8_BOM = b"\xef\xbb\xbf"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _BadLine(Exception):
    pass


def criteo_schema(num_fields: int = NUM_FIELDS, num_dense: int = NUM_DENSE):
    """The Criteo preset schema with the default table settings (one shared table)."""
    from hybridps.config import make_config
    from hybridps.schema import criteo_preset
    return criteo_preset(make_config(), num_fields, num_dense)


def check_criteo_schema(schema, what):
    """Raise ConfigError unless ``schema`` is the Criteo preset of ``num_fields`` 26 and
    ``num_dense`` 13 (the layout of a Criteo file)."""
    if schema.preset != "criteo" or (len(schema.sparse), schema.num_dense) != (NUM_FIELDS, NUM_DENSE):
        raise ConfigError(f"{what} has the Criteo layout ({NUM_FIELDS} categorical fields, "
                          f"{NUM_DENSE} dense); the schema given has {len(schema.sparse)} and "
                          f"{schema.num_dense}: read it with the Criteo preset (no 'features:', "
                          f"num_fields {NUM_FIELDS}, num_dense {NUM_DENSE})")


class CriteoReader(InMemoryShare):
    """This rank's share of a Criteo-format file, in memory, served as batches.

    Args:
        path: the file (TSV without header, or CSV/TSV with a header; ``.gz`` allowed).
        rank, world_size: line ``i`` of the file's data lines goes to rank ``i % world_size``.
        on_bad_line: ``"raise"`` (DataError naming file and line) or ``"skip"`` (count it).
        batch_size: default batch size of :meth:`batches` and :meth:`iter_batches`.
        schema: the run's Criteo preset schema (default: :func:`criteo_schema`; its tables do
            not change what is read).

    Attributes:
        num_rows: rows of this rank's share (valid lines only).
        bad_lines: malformed lines skipped in this rank's share.
        epoch, offset: the position: the next row served is row ``offset`` of epoch ``epoch``.
        dense, keys, labels: the whole share (float32 (N, 13), int64 (N, 26), float32 (N,)).
    """

    kind = "criteo"
    num_dense = NUM_DENSE
    num_fields = NUM_FIELDS

    def __init__(self, path: str, rank: int = 0, world_size: int = 1,
                 on_bad_line: str = "raise", batch_size: Optional[int] = None, schema=None):
        self.path = os.fspath(path)
        self.schema = criteo_schema() if schema is None else schema
        check_criteo_schema(self.schema, f"data file {self.path!r}")
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size ({self.world_size}), got {rank}")
        if on_bad_line not in ON_BAD_LINE:
            raise ConfigError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.default_batch_size = (None if batch_size is None
                                   else check_int("batch_size", batch_size, 1))
        self.bad_lines = 0
        self.bad_line_examples: List[str] = []
        self.epoch = 0
        self.offset = 0
        t0 = time.perf_counter()
        self._load()
        self.parse_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ parsing
    def _read_lines(self) -> List[str]:
        raw = read_bytes(self.path)
        if raw.startswith(_UTF8_BOM):    # a byte-order mark (spreadsheet exports): not part of the header
            raw = raw[len(_UTF8_BOM):]
        self.content_bytes = len(raw)
        self.content_hash = hashlib.blake2b(raw, digest_size=16).hexdigest()
        self._damaged = {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.on_bad_line == "raise":
                line = raw.count(b"\n", 0, exc.start) + 1
                raise DataError(f"{self.path}, line {line}: not valid UTF-8 text "
                                f"({exc.reason} at byte {exc.start})") from None
            # skip: those lines are bad lines (of the rank that owns them), the rest is read
            self._damaged = damaged_lines(raw)
            text = raw.decode("utf-8", "replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines

    def _detect(self, lines: List[str]):
        """(first data line index, delimiter, column permutation or None, format name)."""
        first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
        if first is None:
            raise DataError(f"data file {self.path!r} is empty")
        line = lines[first].rstrip("\r")
        delim = "\t" if "\t" in line else ","
        cols = line.split(delim)
        names = [c.strip().lower() for c in cols]
        expected = [c.lower() for c in CRITEO_COLUMNS]
        if _is_number(cols[0]) or not set(names) & set(expected):
            # a data line (a malformed one is reported by the rank that owns it)
            fmt = "tsv" if delim == "\t" else "csv"
            return first, delim, None, fmt
        missing = [CRITEO_COLUMNS[i] for i, c in enumerate(expected) if c not in names]
        extra = [cols[i] for i, c in enumerate(names) if c not in expected]
        if missing or extra or len(names) != NUM_COLUMNS:
            raise DataError(
                f"{self.path}, line {first + 1}: header does not name the Criteo columns "
                f"label, I1..I13, C1..C26 (missing: {missing or 'none'}; unexpected: "
                f"{extra or 'none'}; {len(names)} columns)")
        perm = [names.index(c) for c in expected]
        if perm == list(range(NUM_COLUMNS)):
            perm = None
        fmt = ("tsv" if delim == "\t" else "csv") + "-header"
        return first + 1, delim, perm, fmt

    def _load(self) -> None:
        lines = self._read_lines()
        start, delim, perm, fmt = self._detect(lines)
        self.format = fmt
        self.delimiter = delim
        self.header = fmt.endswith("-header")
        rank, world = self.rank, self.world_size
        labels: List[float] = []
        dense_rows: List[list] = []
        cat_rows: List[list] = []
        data_index = 0
        isfinite = math.isfinite
        row_ids: List[int] = []
        for lineno in range(start, len(lines)):
            line = lines[lineno]
            if not line or line.isspace():
                continue
            mine = data_index % world == rank
            data_index += 1
            if not mine:
                continue
            if line[-1] == "\r":
                line = line[:-1]
            cols = line.split(delim)
            try:
                if self._damaged and lineno in self._damaged:
                    raise _BadLine(self._damaged[lineno])
                if len(line) > MAX_LINE_BYTES:      # as the schema CSV reader (characters here)
                    raise _BadLine(f"the line is {len(line)} characters long; a line may hold at "
                                   f"most {MAX_LINE_BYTES}")
                if len(cols) != NUM_COLUMNS:
                    raise _BadLine(f"expected {NUM_COLUMNS} {'tab' if delim == chr(9) else 'comma'}"
                                   f"-separated columns (label, I1..I13, C1..C26), found "
                                   f"{len(cols)}")
                if perm is not None:
                    cols = [cols[j] for j in perm]
                lab = cols[0]
                if lab == "0" or lab == "1":
                    y = float(lab)
                else:
                    y = _parse_label(lab)
                try:
                    row = [float(s) if s else 0.0 for s in cols[1:1 + NUM_DENSE]]
                except ValueError:
                    row = _parse_dense_slow(cols[1:1 + NUM_DENSE])
                if not isfinite(sum(row)):
                    row = _parse_dense_slow(cols[1:1 + NUM_DENSE])
            except _BadLine as exc:
                msg = f"{self.path}, line {lineno + 1}: {exc}"
                if self.on_bad_line == "raise":
                    raise DataError(f"malformed line in {msg}") from None
                self.bad_lines += 1
                if len(self.bad_line_examples) < _MAX_EXAMPLES:
                    self.bad_line_examples.append(msg)
                continue
            labels.append(y)
            dense_rows.append(row)
            cat_rows.append(cols[1 + NUM_DENSE:])
            row_ids.append(data_index - 1)
        self.data_lines = data_index
        n = len(labels)
        self.labels = np.array(labels, dtype=np.float32)
        raw = np.array(dense_rows, dtype=np.float64).reshape(n, NUM_DENSE)
        self.dense = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
        keys = np.empty((n, NUM_FIELDS), dtype=np.int64)
        if n:
            for f, column in enumerate(zip(*cat_rows)):
                keys[:, f] = feature_keys(f, column)
        self.keys = keys
        self.share = Batch(dense=self.dense, keys=self.keys, labels=self.labels,
                           row_ids=np.array(row_ids, dtype=np.int64))

    # ------------------------------------------------------------------ serving
    # iter_batches, rows, state and restore: hybridps.data.share.InMemoryShare

    def batches(self, batch_size: Optional[int] = None, epochs: Optional[int] = 1,
                drop_remainder: bool = False) -> Iterator[Batch]:
        """Batches in file order from the current position, epoch by epoch.

        ``epochs`` counts the epochs to finish, the current (possibly partly read) one
        included; None runs forever. The last batch of an epoch is smaller unless
        ``drop_remainder`` (then its rows are skipped). The position advances before each
        batch is handed out.
        """
        b = resolve_batch_size(batch_size, self.default_batch_size)
        if epochs is not None:
            epochs = check_int("epochs", epochs, 0)
        self._require_rows()
        n = self.num_rows
        done = 0
        while epochs is None or done < epochs:
            while self.offset < n:
                start = self.offset
                stop = min(start + b, n)
                if stop - start < b and drop_remainder:
                    break
                self.offset = stop
                yield self.rows(start, stop)
            self.epoch += 1
            self.offset = 0
            done += 1

    position = property(InMemoryShare.state)

    def stats(self) -> dict:
        """What was read: format, counts, skipped lines, parse time."""
        return {"kind": self.kind, "path": self.path, "format": self.format,
                "data_lines": self.data_lines, "rows": self.num_rows,
                "bad_lines": self.bad_lines, "bad_line_examples": list(self.bad_line_examples),
                "rank": self.rank, "world_size": self.world_size,
                "positives": int(self.labels.sum()), "parse_seconds": self.parse_seconds,
                "epoch": self.epoch, "offset": self.offset}

    def fingerprint(self) -> dict:
        """What identifies the file this rank read: its size on disk, and the size and a
        BLAKE2b hash of its (decompressed) content, its data lines. Equal on every rank that
        reads the same file; the trainer compares them across ranks at start-up."""
        return {"path": self.path, "file_bytes": os.path.getsize(self.path),
                "content_bytes": self.content_bytes, "content_blake2b": self.content_hash,
                "data_lines": self.data_lines}

    def describe(self) -> dict:
        """Parameters of this dataset, for logs (same role as SyntheticCTR.describe)."""
        return {"kind": self.kind, "path": self.path, "format": self.format,
                "num_fields": NUM_FIELDS, "num_dense": NUM_DENSE, "rows": self.num_rows,
                "rank": self.rank, "world_size": self.world_size,
                "on_bad_line": self.on_bad_line, "batch_size": self.default_batch_size}

    def __repr__(self) -> str:
        return (f"CriteoReader({self.path!r}, rank={self.rank}/{self.world_size}, "
                f"rows={self.num_rows}, bad_lines={self.bad_lines})")



def _parse_label(text: str) -> float:
    try:
        y = float(text)
    except ValueError:
        y = None
    if y not in (0.0, 1.0):
        raise _BadLine(f"label must be 0 or 1, got {text!r}")
    return y


def _parse_dense_slow(cells) -> list:
    row = []
    for j, s in enumerate(cells):
        if not s.strip():
            row.append(0.0)
            continue
        try:
            x = float(s)
        except ValueError:
            raise _BadLine(f"column I{j + 1} (integer feature) is not a number: {s!r}") from None
        if not math.isfinite(x):
            raise _BadLine(f"column I{j + 1} (integer feature) is not finite: {s!r}")
        row.append(x)
    return row
