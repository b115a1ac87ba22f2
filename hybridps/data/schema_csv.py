"""Reader of CSV/TSV files described by a feature schema (hybridps.schema).

The header names the columns (a UTF-8 byte-order mark before it is ignored); the delimiter is
a tab if the header holds one, else a comma; ``.gz`` files are decompressed. Columns the schema
does not name are ignored; a column it names that the header lacks is an error naming both.
Values (hybridps.data.columns): list columns split by the feature's ``separator``, categorical
values hashed by the feature's key space, dense columns parsed as floats (empty: the feature's
``fill``), labels 0 or 1 (the tasks of a ``labels:`` list: an empty cell is a missing label).

Sharding: data lines (the non-blank lines after the header) are numbered 0, 1, 2, ... in file
order; line ``i`` belongs to rank ``i % world_size``, as for the Criteo reader. A malformed line
(a wrong number of columns, a dense value that is not a number, a label other than 0/1) is
reported by the rank that owns it: a DataError naming the file, the line and the column, or,
with ``on_bad_line="skip"``, skipped and counted (``bad_lines``, ``stats()``).

A line that is not valid UTF-8 text or is longer than hybridps.data.files.MAX_LINE_BYTES is a
malformed line like the others (named, or skipped and counted: the rest of the file is read),
and so is a row whose dense value is beyond float32 (hybridps.data.columns).

Parsing is Arrow's CSV reader plus vectorized checks (no per-row Python; a file Arrow refuses
is looked at line by line to name, or skip, its damaged lines); the share is held in memory
(hybridps.data.share).
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from typing import List, Optional

import numpy as np

from hybridps.data.batch import check_int
from hybridps.data.columns import ColumnConverter
from hybridps.data.files import damaged_lines, read_bytes
from hybridps.data.share import InMemoryShare
from hybridps.errors import ConfigError, DataError

_MAX_EXAMPLES = 10
_NUMBER = r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"
_LABEL = r"^\s*[-+]?(0|1)(\.0*)?\s*$"


class SchemaCSVReader(InMemoryShare):
    """This rank's share of a schema-described CSV/TSV file, in memory, served as batches.

    Args:
        path: the file (``.gz`` allowed).
        schema: hybridps.schema.FeatureSchema.
        rank, world_size: data line ``i`` goes to rank ``i % world_size``.
        on_bad_line: ``"raise"`` (DataError naming file, line and column) or ``"skip"``.
        batch_size: default batch size of :meth:`iter_batches`.
    """

    kind = "csv"

    def __init__(self, path, schema, rank: int = 0, world_size: int = 1,
                 on_bad_line: str = "raise", batch_size: Optional[int] = None):
        self.path = os.fspath(path)
        self.schema = schema
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size ({self.world_size}), got {rank}")
        if on_bad_line not in ("raise", "skip"):
            raise ConfigError(f"on_bad_line must be raise or skip, got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.default_batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.bad_lines = 0
        self.bad_line_examples: List[str] = []
        self.converter = ColumnConverter(schema)
        self._init_position()
        started = time.perf_counter()
        self._load()
        self.parse_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ parsing
    def _load(self):
        import pyarrow as pa
        import pyarrow.csv as pcsv
        raw = read_bytes(self.path)
        self.content_bytes = len(raw)
        self.content_hash = hashlib.blake2b(raw, digest_size=16).hexdigest()
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        first_line = raw.split(b"\n", 1)[0]
        if not first_line.strip():
            raise DataError(f"{self.path}: the file is empty or its first line is blank; a "
                            f"header naming the columns is expected")
        delimiter = "\t" if b"\t" in first_line else ","
        header = [c.strip() for c in first_line.decode("utf-8", "replace").rstrip("\r").split(delimiter)]
        self.converter.check_columns(header, self.path)
        wanted = self.converter.required_columns()
        invalid = []

        def on_invalid(row):
            invalid.append((row.number, row.expected_columns, row.actual_columns, row.text))
            return "skip"

        def parse(raw, block_size=None):
            invalid.clear()
            return pcsv.read_csv(
                io.BytesIO(raw),
                read_options=pcsv.ReadOptions(use_threads=False, block_size=block_size),
                parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
                convert_options=pcsv.ConvertOptions(
                    include_columns=wanted, column_types={c: pa.string() for c in wanted},
                    strings_can_be_null=False))

        damaged = {}
        try:
            table = parse(raw)
        except pa.ArrowInvalid as exc:
            # not UTF-8, or a line longer than Arrow's block: name (or skip) those lines
            raw, damaged, longest = _without_damaged_lines(raw, delimiter.encode() * (len(header) - 1))
            try:
                if not damaged and longest < (1 << 20):
                    raise
                table = parse(raw, block_size=max(1 << 20, 2 * longest + 2))
            except pa.ArrowInvalid:
                raise DataError(f"{self.path}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} "
                                f"file: {exc}") from None
        self._raw = raw
        # data line index of each parsed row: the invalid rows (Arrow's row number counts the
        # header as 1 and skips blank lines) keep their place in the numbering
        invalid_index = np.array(sorted(n - 2 for n, *_ in invalid if n is not None), dtype=np.int64)
        total = table.num_rows + len(invalid)
        self.data_lines = total
        line_index = np.setdiff1d(np.arange(total), invalid_index, assume_unique=True)
        mine = line_index % self.world_size == self.rank
        for number, expected, actual, text in invalid:
            if number is not None and (number - 2) % self.world_size == self.rank:
                self._bad(number - 2, None, f"expected {expected} columns, found {actual}")
        if damaged:
            damaged_index = self._data_indices_of(damaged)
            for data_index, problem in damaged_index.items():
                if data_index % self.world_size == self.rank:
                    self._bad(data_index, None, problem)
            mine &= ~np.isin(line_index, np.fromiter(damaged_index, np.int64))
        table = table.filter(pa.array(mine))
        line_index = line_index[mine]
        table, keep, problems = check_text_columns(table, self.schema)
        for row, column, problem in problems:
            self._bad(int(line_index[row]), column, problem)
        line_index = line_index[keep]
        # every bad row reported through _bad (which names its line), raising or counting
        converted = self.converter.convert_rows(table, self.path, skip_bad_rows=True)
        for row in converted.bad_rows:
            self._bad(int(line_index[row]), None, converted.problem(int(row)))
        self.share = converted.batch
        kept = line_index if converted.kept is None else line_index[converted.kept]
        self.share.row_ids = kept.astype(np.int64)
        self._raw = self._line_numbers = None

    def _data_indices_of(self, damaged):
        """{data line index: problem} of {0-based file line index: problem} (the header is
        line 0; blank lines are not data lines)."""
        numbers = self._file_lines()
        return {int(np.searchsorted(numbers, line + 1)): problem for line, problem in damaged.items()}

    def _file_lines(self):
        """1-based file line numbers of the data lines, in order (found once, when a bad line
        needs naming)."""
        if getattr(self, "_line_numbers", None) is None:
            self._line_numbers = np.array([n for n, line in enumerate(self._raw.split(b"\n"), start=1)
                                           if line.strip()][1:], dtype=np.int64)
        return self._line_numbers

    def _bad(self, data_index, column, problem):
        numbers = self._file_lines()
        line = int(numbers[data_index]) if data_index < len(numbers) else "?"
        where = f"{self.path}, line {line}" + (f", column {column!r}" if column else "")
        if self.on_bad_line == "raise":
            raise DataError(f"malformed line in {where}: {problem}")
        self.bad_lines += 1
        if len(self.bad_line_examples) < _MAX_EXAMPLES:
            self.bad_line_examples.append(f"{where}: {problem}")

    # ------------------------------------------------------------------ info
    def fingerprint(self) -> dict:
        """What identifies the file this rank read (compared across ranks at start-up)."""
        return {"path": self.path, "file_bytes": os.path.getsize(self.path),
                "content_bytes": self.content_bytes, "content_blake2b": self.content_hash,
                "data_lines": self.data_lines}

    def stats(self) -> dict:
        """What was read: counts, skipped lines, parse time."""
        return {"kind": self.kind, "path": self.path, "format": "csv", "data_lines": self.data_lines,
                "rows": self.num_rows, "bad_lines": self.bad_lines,
                "bad_line_examples": list(self.bad_line_examples), "rank": self.rank,
                "world_size": self.world_size, "positives": self.share.positives,
                "parse_seconds": self.parse_seconds, "epoch": self.epoch, "offset": self.offset,
                "truncated_ids": dict(self.share.truncated)}

    def __repr__(self) -> str:
        return (f"SchemaCSVReader({self.path!r}, rank={self.rank}/{self.world_size}, "
                f"rows={self.num_rows}, bad_lines={self.bad_lines})")


def check_text_columns(table, schema):
    """Validate and cast the text label and dense columns of an Arrow table of strings.

    Returns:
        (the well-formed rows with label and dense columns as float64 (empty: null, the
        feature's fill), the boolean mask of those rows in ``table``, and every problem as
        (row, column, message), column by column, rows in order).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    keep = np.ones(table.num_rows, dtype=bool)
    problems = []
    # (column, pattern, problem, an empty cell allowed: a missing value)
    if schema.labels:
        checks = [(t.column, _LABEL if t.kind == "binary" else _NUMBER,
                   f"the label of the {t.kind} task {t.name!r} must be "
                   f"{'0 or 1' if t.kind == 'binary' else 'a number'} (or empty: missing)", True)
                  for t in schema.labels]
    else:
        checks = [(schema.label, _LABEL, "the label must be 0 or 1", False)]
    if schema.weight:
        checks.append((schema.weight, _NUMBER, "the row weight must be a number", False))
    checks += [(f.column, _NUMBER, f"dense feature {f.name!r} is not a number", True)
               for f in schema.dense]
    for column, pattern, problem, may_be_empty in checks:
        values = table.column(column)
        ok = pc.or_(pc.equal(values, ""), pc.match_substring_regex(values, pattern)) \
            if may_be_empty else pc.match_substring_regex(values, pattern)
        bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False) & keep)
        problems += [(int(row), column, f"{problem}: {values[int(row)].as_py()!r}") for row in bad]
        keep[bad] = False
    if not keep.all():
        table = table.filter(pa.array(keep))
    casts = {column: pa.float64() for column, *_ in checks}
    for column, kind in casts.items():
        index = table.column_names.index(column)
        values = pc.if_else(pc.equal(table.column(column), ""), None, table.column(column))
        table = table.set_column(index, column, pc.cast(pc.utf8_trim_whitespace(values), kind))
    return table, keep, problems


def _without_damaged_lines(raw, placeholder):
    """(``raw`` with each damaged line (hybridps.data.files.damaged_lines) replaced by
    ``placeholder``, a row of empty cells that keeps the line's place in the numbering; the
    damaged lines {0-based file line index: problem}, the header excluded; the length of the
    longest line kept)."""
    damaged = damaged_lines(raw)
    damaged.pop(0, None)                 # the header was decoded (and checked) on its own
    lines = raw.split(b"\n")
    for index in damaged:
        lines[index] = placeholder
    return b"\n".join(lines), damaged, max(len(line) for line in lines)
