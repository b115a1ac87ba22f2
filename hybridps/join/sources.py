"""Where the joiner reads its events: a stream directory or a Redis stream, with a position.

What lives here: :func:`open_event_source` and its two kinds. :class:`DirectoryEvents` reads
the files a producer renames into a directory (the producer contract of
hybridps.data.stream: a temporary name starting with ``.``, then a rename; name order is
arrival order; ``_END`` says no file follows), Parquet (``.parquet``, ``.pq``) or CSV with a
header (``.csv``, ``.tsv``), each row one event. :class:`RedisEvents` reads the entries of a
Redis stream in ID order with XRANGE, each entry one event (its fields, as text); an entry with
a field ``_end`` ends it. Both deliver lists of events (``read``), say where the i-th event of
the last read came from (``describe``: the file and row, or the entry ID, for messages), and keep
a JSON position (``position`` / ``restore``) that the joiner's checkpoint holds. A file or server that cannot be read is a DataError naming it: the
joiner stops and, restarted, resumes from its checkpoint. What does not: what an event means
(hybridps.join.events).
"""
import os

from hybridps.data.stream import REDIS_END_FIELD, stream_files
from hybridps.errors import ConfigError, DataError

_PARQUET = (".parquet", ".pq")


def open_event_source(spec, name):
    """The source of ``stream:DIR`` or ``redis://HOST:PORT/STREAM``; ``name`` (impressions,
    actions) is the config field, for messages."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"join: {name} names no source; give stream:DIR or redis://HOST:PORT/STREAM")
    if spec.startswith("stream:"):
        return DirectoryEvents(spec[len("stream:"):], name)
    if spec.startswith("redis://"):
        return RedisEvents(spec, name)
    raise ConfigError(f"join: {name} {spec!r} is not a stream: give stream:DIR or redis://HOST:PORT/STREAM")


def plain(value):
    """A value as JSON keeps it (bytes as text, times as ISO text)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class DirectoryEvents:
    """Events in the files of a stream directory, in name order (module docstring)."""

    kind = "stream"

    def __init__(self, directory, name):
        if not directory:
            raise ConfigError(f"join: {name} 'stream:' names no directory; use stream:DIR")
        self.name, self.directory = name, os.path.abspath(directory)
        self.where = f"{name} stream:{self.directory}"
        if not os.path.isdir(self.directory):
            raise DataError(f"{self.where}: the directory does not exist; create it, and let the "
                            f"producer rename files into it")
        self.done = None            # the last file read to its end
        self.file, self.rows, self.row = None, [], 0
        self.end_seen = False
        self._last_read = []        # (file, its row of the first event, events) of the last read

    @property
    def ended(self):
        return self.end_seen and self.file is None

    def read(self, limit):
        """Up to ``limit`` events, in file and row order."""
        events, self._last_read = [], []
        while len(events) < limit:
            if self.file is None and not self._open_next():
                break
            take = self.rows[self.row:self.row + limit - len(events)]
            self._last_read.append((self.file, self.row, len(take)))
            events += take
            self.row += len(take)
            if self.row >= len(self.rows):
                self.done, self.file, self.rows, self.row = self.file, None, [], 0
        return events

    def describe(self, index):
        """Where the ``index``-th event of the last read came from."""
        for name, first, count in self._last_read:
            if index < count:
                return f"file {name}, row {first + index + 1}"
            index -= count
        raise IndexError(index)

    def _open_next(self):
        try:
            names, end = stream_files(self.directory)
        except OSError as exc:
            raise DataError(f"{self.where}: cannot list the directory ({exc.strerror or exc})") from None
        for name in names:
            if self.done is None or name > self.done:
                self.file, self.rows, self.row = name, self._load(name), 0
                return True
        self.end_seen = end
        return False

    def _load(self, name):
        path = os.path.join(self.directory, name)
        import pyarrow as pa
        try:
            if name.endswith(_PARQUET):
                import pyarrow.parquet as pq
                table = pq.read_table(path)
            else:
                import pyarrow.csv as csv
                delimiter = "\t" if name.endswith(".tsv") else ","
                table = csv.read_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.where}: file {name} cannot be read ({exc}); a producer writes "
                            f"a file under a name starting with '.' and renames it when complete") from None
        rows = table.to_pylist()
        if any(isinstance(v, (bytes, list)) or hasattr(v, "isoformat") for v in (rows[0].values() if rows else ())):
            rows = [{k: plain(v) for k, v in raw.items()} for raw in rows]
        return rows

    def position(self):
        return {"kind": self.kind, "path": self.directory, "done": self.done,
                "file": self.file, "row": self.row}

    def restore(self, position):
        _check_position(self, position, "path", self.directory)
        self.done, self.end_seen = position["done"], False
        self.file, self.rows, self.row = None, [], 0
        if position["file"] is not None:
            path = os.path.join(self.directory, position["file"])
            if not os.path.isfile(path):
                raise DataError(f"{self.where}: the joiner's position is at row {position['row']} "
                                f"of {path}, which is no longer there: files must stay until the "
                                f"joiner has checkpointed past them")
            self.file, self.rows, self.row = position["file"], self._load(position["file"]), int(position["row"])


class RedisEvents:
    """Events in the entries of a Redis stream, in ID order (module docstring)."""

    kind = "redis"

    def __init__(self, url, name):
        self.name = name
        self.url, self.key, self.client, self.redis = connect_redis(url, f"join: {name}")
        self.where = f"{name} {url}"
        self.last_id = "0-0"
        self.end_seen = False
        self._last_read = []        # entry IDs of the last read

    @property
    def ended(self):
        return self.end_seen

    def read(self, limit):
        if self.end_seen or limit <= 0:
            return []
        try:
            entries = self.client.xrange(self.key, min=f"({self.last_id}", count=limit)
        except self.redis.RedisError as exc:
            raise DataError(f"{self.where}: cannot read the stream ({exc})") from None
        events, self._last_read = [], []
        for entry_id, fields in entries:
            if REDIS_END_FIELD in fields:        # not passed: a restart finds the end again
                self.end_seen = True
                break
            self.last_id = entry_id.decode()
            self._last_read.append(self.last_id)
            events.append({k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()})
        return events

    def describe(self, index):
        """Where the ``index``-th event of the last read came from."""
        return f"entry {self._last_read[index]}"

    def position(self):
        return {"kind": self.kind, "url": self.url, "last_id": self.last_id}

    def restore(self, position):
        _check_position(self, position, "url", self.url)
        self.last_id, self.end_seen = str(position["last_id"]), False


def connect_redis(url, what):
    """(url, key, client, the redis module) of ``redis://HOST:PORT/STREAM``, the server
    answering and the key a stream or not there yet."""
    from urllib.parse import urlparse
    parsed = urlparse(url)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "redis" or not parsed.hostname or not key:
        raise ConfigError(f"{what} {url!r}: a Redis stream is redis://HOST:PORT/STREAM")
    try:
        import redis
    except ImportError:
        raise ConfigError("a Redis stream needs the 'redis' Python package "
                          "(pip install -r requirements.txt)") from None
    address = f"{parsed.hostname}:{parsed.port or 6379}"
    client = redis.Redis(host=parsed.hostname, port=parsed.port or 6379, socket_timeout=30)
    try:
        kind = client.type(key).decode()
    except redis.RedisError as exc:
        raise DataError(f"{what}: cannot reach the Redis server at {address} ({exc}): start "
                        f"redis-server there, or fix the host and port in {url}") from None
    if kind not in ("none", "stream"):
        raise ConfigError(f"{what}: Redis key {key!r} at {address} holds a {kind}, not a stream")
    return url, key, client, redis


def _check_position(source, position, key, expected):
    if not isinstance(position, dict) or position.get("kind") != source.kind or position.get(key) != expected:
        raise DataError(f"{source.where}: the joiner's checkpoint holds a position in "
                        f"{position!r}, not in this source: another state directory, or the "
                        f"source changed (start with an empty state_dir)")
