"""Where the joiner writes labeled rows: the trainer's stream, one batch per output sequence.

What lives here: :func:`open_output` and its two kinds, each writing batch ``seq`` so that
writing the same batch again is a no-op (the output's identity is the sequence, never the
clock). :class:`DirectoryOutput` writes ``part-<seq>.parquet`` under a temporary name starting
with ``.`` and renames it into the directory (the producer contract the trainer's
``stream:DIR`` reads); a part already there is left as it is. :class:`RedisOutput` adds the
rows as entries with explicit IDs ``<ms>-<i>`` (``ms`` chosen once per batch and kept in the
joiner's checkpoint) in one MULTI/EXEC transaction, so a batch is in the stream whole or not at
all, and a batch whose IDs the stream already passed is not added again. ``end()`` writes the
end marker (``_END``, an entry with ``_end``) once. What does not: which rows leave when
(hybridps.join.window), the checkpoint that makes a restart resume at the right batch
(hybridps.join.state).
"""
import itertools
import operator
import os

from hybridps.checkpoint.files import fsync_dir
from hybridps.data.stream import END_MARKER
from hybridps.errors import ConfigError, OutputError
from hybridps.join.sources import connect_redis


def open_output(spec, list_separator="|"):
    if isinstance(spec, str) and spec.startswith("stream:") and len(spec) > len("stream:"):
        return DirectoryOutput(spec[len("stream:"):])
    if isinstance(spec, str) and spec.startswith("redis://"):
        return RedisOutput(spec, list_separator)
    raise ConfigError(f"join: output {spec!r} is not a stream: give stream:DIR or redis://HOST:PORT/STREAM")


def part_name(seq):
    return f"part-{seq:012d}.parquet"


def columns_of(rows):
    """{column: its values} of the rows (a row without a column: None there)."""
    names = column_order(rows)
    if len(names) > 1 and all(len(row) == len(names) for row in rows):    # every row has all
        return dict(zip(names, map(list, zip(*map(operator.itemgetter(*names), rows)))))
    return {n: [row.get(n) for row in rows] for n in names}


def column_order(rows):
    """Every field of the rows, in the order first met (rows may differ in their fields)."""
    return list(dict.fromkeys(itertools.chain.from_iterable(rows)))


class DirectoryOutput:
    """Parquet parts renamed into a stream directory (module docstring)."""

    kind = "stream"

    def __init__(self, directory):
        self.directory = os.path.abspath(directory)
        self.where = f"stream:{self.directory}"
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"join output {self.where}: cannot create the directory "
                              f"({exc.strerror or exc})") from None

    def write(self, seq, rows, entry_ms=None):
        """Write batch ``seq``; False if it was there already."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        final = os.path.join(self.directory, part_name(seq))
        if os.path.exists(final):
            return False
        table = pa.Table.from_pydict(columns_of(rows))
        for index, column in enumerate(table.columns):     # a column with no value at all
            if pa.types.is_null(column.type):
                table = table.set_column(index, table.field(index).name, column.cast(pa.string()))
        tmp = os.path.join(self.directory, "." + part_name(seq))
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(tmp, final)
            fsync_dir(self.directory)
        except OSError as exc:
            raise OutputError(f"join output {self.where}: cannot write {part_name(seq)} "
                              f"({exc.strerror or exc})") from None
        return True

    def written(self):
        """How many parts (or an end marker) the directory holds already."""
        return sum(1 for n in os.listdir(self.directory) if n.startswith("part-") or n == END_MARKER)

    def end(self):
        path = os.path.join(self.directory, END_MARKER)
        if not os.path.exists(path):
            with open(path, "w") as fh:
                fh.write("the joiner's inputs ended\n")
            fsync_dir(self.directory)


class RedisOutput:
    """Entries with explicit IDs added to a Redis stream (module docstring)."""

    kind = "redis"

    def __init__(self, url, list_separator="|"):
        self.url, self.key, self.client, self.redis = connect_redis(url, "join: output")
        self.where, self.separator = url, list_separator

    def last_id(self):
        """(ms, seq) of the newest entry, (0, 0) for an empty stream."""
        newest = self.client.xrevrange(self.key, count=1)
        if not newest:
            return (0, 0)
        ms, seq = newest[0][0].decode().split("-")
        return int(ms), int(seq)

    def write(self, seq, rows, entry_ms=None):
        """Add batch ``seq`` as entries ``entry_ms-0`` ... (one transaction); False if the
        stream already holds them."""
        try:
            if self.last_id() >= (entry_ms, 0):
                return False
            pipe = self.client.pipeline(transaction=True)
            for i, row in enumerate(rows):
                pipe.xadd(self.key, {k: self._text(v) for k, v in row.items()}, id=f"{entry_ms}-{i}")
            pipe.execute()
        except self.redis.RedisError as exc:
            raise OutputError(f"join output {self.where}: cannot add batch {seq} ({exc})") from None
        return True

    def written(self):
        """How many entries the stream holds already."""
        try:
            return int(self.client.xlen(self.key))
        except self.redis.RedisError as exc:
            raise OutputError(f"join output {self.where}: cannot read the stream ({exc})") from None

    def _text(self, value):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, list):
            return self.separator.join("" if v is None else str(v) for v in value)
        return str(value)

    def end(self):
        try:
            newest = self.client.xrevrange(self.key, count=1)
            if not newest or b"_end" not in newest[0][1]:
                self.client.xadd(self.key, {"_end": "1"})
        except self.redis.RedisError as exc:
            raise OutputError(f"join output {self.where}: cannot add the end entry ({exc})") from None
