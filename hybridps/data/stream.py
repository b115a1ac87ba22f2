"""Stream sources: training on data that keeps arriving (a directory of files, Redis Streams).

What lives here: :class:`DirectoryStream` (``--data stream:DIR``), :class:`RedisStream`
(``--data redis://HOST:PORT/STREAM``) and :func:`open_stream`. What does not: the per-step
agreement that makes every rank wait, go or stop together (hybridps.step_control), parsing a
file (the Parquet and schema-CSV readers, reused here), the loop (hybridps.trainer).

The rows of a stream, in arrival order, form one sequence; global batch ``g`` is the next
``batch_size x ranks`` rows after the position, and rank ``r`` trains on rows
``[r * batch_size, (r + 1) * batch_size)`` of it. Every rank sees the whole stream (each rank
reads every file or entry; the rows are divided, not the reading), so each row is trained
exactly once over all ranks, every rank runs the same steps, and the position (the last row
consumed) is the same on every rank: it is saved in every checkpoint and restores onto any
number of ranks. A step starts only when every rank has its rows (hybridps.step_control polls
every ``stream_poll_s`` seconds until then: waiting for data is not a hang).

Directory streams
-----------------
Producers write a file under a temporary name (starting with ``.``, e.g. ``.part-0007.parquet``)
and rename it into place when complete (``os.rename`` is atomic within a file system), so a
reader never sees half a file. Files are consumed in name order (``*.parquet`` / ``*.pq``, and
``*.csv`` / ``*.tsv`` with a header, read through the ``features:`` schema); name them so that
name order is arrival order (a zero-padded sequence number or a UTC timestamp). A file whose
name sorts before one already consumed is ignored and counted (``late_files``). Consumed files
may be deleted. The end: a file named ``_END`` (any content) says no file follows; training
(``--steps 0``) ends when the rows left cannot fill one more global batch, and those rows
(``rows_left``) stay unconsumed in the position. A file that cannot be read is an error naming
it, or with ``on_bad_line: skip`` skipped and counted (``bad_files``); a malformed CSV line
likewise (``bad_lines``, the CSV reader's).

A file is read once, whole, and its size and modification time at that moment are kept while
it stays in the directory; every later listing compares them. A file that changed (written in
place instead of renamed, still growing when read) stops every rank with an error naming it
(hybridps.step_control, after the final checkpoint), or with ``on_bad_line: skip`` is counted
in ``bad_files``: the rows of it already trained stay trained, its rows read but not trained
yet are dropped on every rank (``rows_dropped``) and what was written to it later is not read.

Redis Streams
-------------
Each entry (``XADD STREAM * label 1 user 42 genres "3|7" ...``) is one row, its fields named
as the schema's columns, values as text (lists joined by the feature's separator; an empty or
absent value is missing). Entries are read in ID order with XRANGE (no consumer group: the
position is the last consumed entry ID, kept in the checkpoint, not in Redis). The end: an
entry with a field ``_end``. A malformed entry is an error naming the entry ID and the field.
A key that is not a stream is an error naming its type.

Several streams
---------------
``stream:DIR1,stream:DIR2`` (any stream specs, comma-separated) is one sequence of them all
in an order every rank agrees on (hybridps.data.merged_stream).

Out of reach
------------
A Redis server lost during the run, or a stream directory that cannot be listed (a network file
system gone for a while), is tried again with exponential backoff (one line when the retrying
starts, one when the source is back) for ``stream_retry_seconds``; then every rank stops at the
same step with a checkpoint whose position is the last row trained (Redis: the last consumed
entry), and the job ends with an error naming the source (hybridps.step_control).
"""
import os
import sys
import time

from hybridps.data.batch import check_int, empty_batch
from hybridps.data.partitioned import concat_batches
from hybridps.data.source import DataSource
from hybridps.errors import ConfigError, DataError

END_MARKER = "_END"
REDIS_END_FIELD = b"_end"
_PARQUET, _CSV = (".parquet", ".pq"), (".csv", ".tsv")
_MAX_EXAMPLES = 10
_FIRST_RETRY_S, _LAST_RETRY_S = 0.25, 8.0     # retry backoff of a lost source: doubling, at most


def stream_files(directory):
    """(the data files of a stream directory in name order, whether its end marker ``_END``
    is there), from one listing (the marker listed with the files it follows: none missed).
    A data file is ``*.parquet``, ``*.pq``, ``*.csv`` or ``*.tsv`` whose name starts with
    neither ``.`` (a producer's file being written) nor ``_``. Raises OSError."""
    names = sorted(os.listdir(directory))
    return ([n for n in names if not n.startswith((".", "_")) and n.endswith(_PARQUET + _CSV)],
            END_MARKER in names)


def is_stream_spec(spec):
    return spec.startswith("stream:") or spec.startswith("redis://")


def open_stream(spec, schema, *, rank, world_size, on_bad_line="raise", retry_seconds=60.0):
    """The stream source of ``stream:DIR`` or ``redis://HOST:PORT/STREAM`` (``retry_seconds``:
    how long it tries a directory or server out of reach again before it fails; several
    streams: hybridps.data.merged_stream.open_streams)."""
    if schema.preset == "criteo":
        raise ConfigError(f"data {spec!r}: a stream is read through a 'features:' schema (in the "
                          f"--config file), which names its columns; the Criteo preset reads files")
    if spec.startswith("stream:"):
        return DirectoryStream(spec[len("stream:"):], schema, rank=rank, world_size=world_size,
                               on_bad_line=on_bad_line, retry_seconds=retry_seconds)
    return RedisStream(spec, schema, rank=rank, world_size=world_size, retry_seconds=retry_seconds)


class StreamSource(DataSource):
    """What both stream kinds share: the global batch split, the waiting, the counters (a
    streaming, endless :class:`~hybridps.data.source.DataSource`).

    Subclasses implement ``_poll(need) -> (ready, ended)`` (refresh what has arrived: at least
    ``need`` rows after the position, or the end marker with fewer), ``_rows(offset, count)``
    (a Batch of rows ``[offset, offset + count)`` after the position) and ``_advance(count)``;
    a source that cannot go on sets ``failure`` (why), and one whose ranks must all apply
    something it found adds it to ``_notes`` and applies it in ``_apply_notes``.
    """

    streaming = True
    finite = False
    kind = "stream"

    def __init__(self, schema, rank, world_size, retry_seconds=60.0):
        self.schema = schema
        self.retry_seconds = float(retry_seconds)
        self._lost_since = None         # monotonic time the source was first found unreachable
        self._retry_at, self._backoff = 0.0, _FIRST_RETRY_S
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size ({self.world_size}), got {rank}")
        self.rows_consumed = 0          # over all ranks
        self.rows_trained = 0           # by this rank
        self.positives = 0              # of the rows this rank trained
        self.rows_left = 0              # at the end: rows that could not fill a global batch
        self.started = time.monotonic()
        self.newest_arrival = None      # wall time the newest data arrived
        self.position_arrival = None    # wall time the data at the position arrived
        self.failure = None             # why this source cannot go on (agreed before each step)
        self._notes = []                # for every rank's source (hybridps.step_control)

    def iter_batches(self, batch_size=None, num_steps=None, *, control=None, start_step=0):
        """Batches of exactly ``batch_size`` rows as the stream delivers them, ``num_steps``
        at most (None: until the end marker or a stop), each one agreed by every rank through
        ``control`` (required: hybridps.step_control.StepAgreement)."""
        if control is None:
            raise ConfigError("a stream's batches are agreed by every rank before each step: "
                              "iter_batches needs control (hybridps.step_control.StepAgreement)")
        b = check_int("batch_size", batch_size, 1)
        need = b * self.world_size
        self.started = time.monotonic()
        step = start_step
        while num_steps is None or step - start_step < num_steps:
            while True:
                ready, ended = self._poll(need)
                notes, self._notes = self._notes, []
                decision = control.agree(step, ready, ended, failure=self.failure, notes=notes)
                if control.notes and self._apply_notes(control.notes):
                    continue                    # the rows available changed on every rank
                if decision == "go":
                    break
                if decision == "end":
                    self.rows_left = self._available()
                    return
                control.wait()
            batch = self._rows(self.rank * b, b)
            self._advance(need)
            self.rows_consumed += need
            self.rows_trained += b
            self.positives += batch.positives
            step += 1
            yield batch

    def _apply_notes(self, notes):
        """Apply every rank's notes; True if that changed the rows available."""
        return False

    # ------------------------------------------------------------------ a source out of reach
    def _may_try(self):
        """Whether to read the source now (not failed, not waiting to try a lost one again)."""
        return self.failure is None and time.monotonic() >= self._retry_at

    def _unreachable(self, what, exc):
        """A read of ``what`` failed: try again later (exponential backoff), or after
        ``retry_seconds`` fail (module docstring)."""
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
            self._note(f"lost {what} ({exc}); trying again for up to {self.retry_seconds:g}s "
                       f"(stream_retry_seconds)")
        if now - self._lost_since >= self.retry_seconds:
            self.failure = (f"{what} was unreachable for {now - self._lost_since:.1f}s ({exc}; "
                            f"stream_retry_seconds is {self.retry_seconds:g})")
            return
        self._retry_at = min(now + self._backoff, self._lost_since + self.retry_seconds)
        self._backoff = min(2 * self._backoff, _LAST_RETRY_S)

    def _reachable(self, what):
        """A read of ``what`` succeeded (after failures: say so)."""
        if self._lost_since is not None:
            self._note(f"reached {what} again after {time.monotonic() - self._lost_since:.1f}s")
            self._lost_since, self._backoff = None, _FIRST_RETRY_S

    def _note(self, text):
        sys.stderr.write(f"[hybridps rank {self.rank}/{self.world_size}] {text}\n")
        sys.stderr.flush()

    def lag(self):
        """(rows arrived but not trained yet, seconds between the newest data's arrival and
        the arrival of the data at the position; 0 when caught up)."""
        rows = self._available()
        if not rows or self.newest_arrival is None or self.position_arrival is None:
            return rows, 0.0
        return rows, max(0.0, self.newest_arrival - self.position_arrival)

    def progress_note(self):
        rows, seconds = self.lag()
        rate = self.rows_consumed / max(time.monotonic() - self.started, 1e-9)
        return f"stream {rate:,.0f} rows/s, {rows:,} rows waiting, {seconds:.1f}s behind the newest data"

    def _base_state(self, **position):
        return {"kind": self.kind, "path": self.where, **position,
                "rows_consumed": int(self.rows_consumed)}

    def _restore_base(self, state):
        """Check that ``state`` is a position in this stream; take its row count."""
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise DataError(f"cannot restore this {self.kind} source from data state {state!r}")
        if state.get("path") != self.where:
            raise DataError(f"the checkpoint's stream position is in {state.get('path')}, this run "
                            f"reads {self.where}: not the same stream")
        self.rows_consumed = check_int("rows_consumed", state.get("rows_consumed", 0), 0)

    def _base_stats(self):
        rows, seconds = self.lag()
        return {"kind": self.kind, "path": self.where, "format": self.kind, "rows": self.rows_trained,
                "positives": self.positives,
                "rows_consumed": self.rows_consumed, "rows_left": self.rows_left,
                "lag_rows": rows, "lag_s": seconds, "rank": self.rank, "world_size": self.world_size}


class DirectoryStream(StreamSource):
    """Files arriving in a directory, consumed in name order (module docstring)."""

    kind = "stream"

    def __init__(self, directory, schema, rank=0, world_size=1, on_bad_line="raise", retry_seconds=60.0):
        super().__init__(schema, rank, world_size, retry_seconds)
        if not directory:
            raise ConfigError("data 'stream:' names no directory; use stream:DIR")
        self.directory = self.where = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise DataError(f"stream directory {self.directory} does not exist (or is not a "
                            f"directory); create it, and let the producer rename files into it")
        if on_bad_line not in ("raise", "skip"):
            raise ConfigError(f"on_bad_line must be raise or skip, got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.consumed_through = None    # the name of the last file fully consumed
        self.files = []                 # [name, rows Batch, arrival] at and after the position
        self.row = 0                    # rows of files[0] consumed
        self.end_seen = False
        self.files_consumed = self.bad_files = self.late_files = self.bad_lines = 0
        self.rows_dropped = 0           # rows of changed files read but not trained (skip)
        self.bad_line_examples = []
        self._read = {}                 # name: (size, mtime_ns) when read, while it is listed
        self._late_seen = set()         # late names, while they are listed
        self._changed = set()           # names found changed after they were read
        self._dropped = set()           # names whose untrained rows are dropped (agreed)
        self._restored_through = None   # names up to this were consumed before

    # ------------------------------------------------------------------ reading
    def _poll(self, need):
        if self._available() < need and not self.end_seen and self._may_try():
            self._scan()
        ready = self._available() >= need
        return ready, self.end_seen and not ready

    def _scan(self):
        try:
            names, end_seen = stream_files(self.directory)
        except OSError as exc:          # e.g. a network file system gone for a while
            self._unreachable(f"stream directory {self.directory}", exc)
            return
        self._reachable(f"stream directory {self.directory}")
        self._check_unchanged(set(names))
        last = self.files[-1][0] if self.files else self.consumed_through
        for name in names:
            if last is not None and name <= last:
                if (name not in self._read and name not in self._late_seen
                        and (self._restored_through is None or name > self._restored_through)):
                    self._late(name)
                continue
            rows = self._load(name)
            self.files.append([name, rows, _arrival(os.path.join(self.directory, name))])
            self.newest_arrival = self.files[-1][2]
            if self.position_arrival is None:
                self.position_arrival = self.files[0][2]
            last = name
        self.end_seen = end_seen

    def _check_unchanged(self, listed):
        """Compare each listed file read before with its size and mtime when read (module
        docstring); forget the files no longer listed (consumed files may be deleted)."""
        self._read = {name: when_read for name, when_read in self._read.items() if name in listed}
        self._late_seen &= listed
        self._changed &= listed
        self._dropped &= listed
        for name, when_read in self._read.items():
            if when_read is None or name in self._changed or name in self._dropped:
                continue
            path = os.path.join(self.directory, name)
            now = _stamp(path)
            if now is None or now == when_read:    # None: deleted since the listing
                continue
            self._changed.add(name)
            what = (f"stream file {path} changed after it was read ({when_read[0]:,} bytes "
                    f"then, {now[0]:,} now): a producer writes a file under a temporary name "
                    f"starting with '.' and renames it into the directory once complete, never "
                    f"to change it again")
            if self.on_bad_line == "raise":
                self.failure = self.failure or what
            else:
                self._notes.append(name)

    def _apply_notes(self, notes):
        """Files some rank found changed (skip): on every rank, the rows of each not trained
        yet are dropped, and a file not read yet here is read as empty (module docstring)."""
        changed = False
        for name in notes:
            if name in self._dropped:
                continue
            self._dropped.add(name)
            self.bad_files += 1
            dropped = 0
            for index, entry in enumerate(self.files):
                if entry[0] == name:
                    keep = self.row if index == 0 else 0
                    dropped = entry[1].size - keep
                    entry[1] = entry[1].take(slice(0, keep))
            self.rows_dropped += dropped
            changed = changed or dropped > 0
            self._example(f"{os.path.join(self.directory, name)}: changed after it was read; "
                          f"skipped from then on ({dropped} rows read but not trained dropped, "
                          f"rows written to it later not read)")
        return changed

    def _late(self, name):
        """A file named before one already seen: it would break the order every rank agreed on."""
        self._late_seen.add(name)
        self.late_files += 1
        self._example(f"{os.path.join(self.directory, name)}: ignored, its name sorts before a "
                      f"file already read (name files so that name order is arrival order)")

    def _load(self, name):
        """The rows of file ``name`` (its size and mtime before reading are kept)."""
        path = os.path.join(self.directory, name)
        self._read[name] = _stamp(path)
        if name in self._dropped:       # some rank found it changed before this one read it
            return empty_batch(self.schema)
        try:
            if name.endswith(_PARQUET):
                import pyarrow.parquet as pq
                from hybridps.data.parquet import ParquetReader
                try:
                    if pq.ParquetFile(path).metadata.num_rows == 0:
                        return empty_batch(self.schema)
                except Exception:   # noqa: BLE001 - the reader below names the problem
                    pass
                return ParquetReader([path], self.schema).all_rows()
            from hybridps.data.schema_csv import SchemaCSVReader
            reader = SchemaCSVReader(path, self.schema, on_bad_line=self.on_bad_line)
            self.bad_lines += reader.bad_lines
            for example in reader.bad_line_examples:
                self._example(example)
            return reader.share
        except DataError as exc:
            if self.on_bad_line == "raise":
                raise DataError(f"stream file {exc}") from None
            self.bad_files += 1
            self._example(f"{path}: skipped ({exc})")
            return empty_batch(self.schema)

    def _example(self, text):
        if len(self.bad_line_examples) < _MAX_EXAMPLES:
            self.bad_line_examples.append(text)

    def _available(self):
        return sum(f[1].size for f in self.files) - self.row

    def _rows(self, offset, count):
        parts, start = [], self.row + offset
        for _name, rows, _arrival_time in self.files:
            if start >= rows.size:
                start -= rows.size
                continue
            take = min(count, rows.size - start)
            parts.append(rows.take(slice(start, start + take)))
            count -= take
            start = 0
            if not count:
                break
        return concat_batches(parts)

    def _advance(self, count):
        self.row += count
        # files read to the end leave, but the newest stays (the position is at its end)
        while len(self.files) > 1 and self.row >= self.files[0][1].size:
            self.row -= self.files[0][1].size
            self.consumed_through = self.files.pop(0)[0]
            self.files_consumed += 1
        if self.files:
            self.position_arrival = self.files[0][2]

    # ------------------------------------------------------------------ position
    def state(self):
        done = self.consumed_through
        partial, row = (self.files[0][0], self.row) if self.files and self.row else (None, 0)
        if self.files and self.row == self.files[0][1].size:      # the newest file, all read
            done, partial, row = self.files[0][0], None, 0
        return self._base_state(consumed_through=done, file=partial, row=int(row))

    def restore(self, state):
        self._restore_base(state)
        self.files, self.row, self.end_seen = [], 0, False
        self.consumed_through = self._restored_through = state.get("consumed_through")
        partial = state.get("file")
        if partial:
            path = os.path.join(self.directory, partial)
            if not os.path.isfile(path):
                raise DataError(f"the stream position is at row {state.get('row')} of {path}, "
                                f"which is no longer there: files must stay until fully consumed")
            self.files = [[partial, self._load(partial), _arrival(path)]]
            self.row = check_int("row", state.get("row"), 0)
            self.position_arrival = self.files[0][2]

    def stats(self):
        whole = self.files_consumed + int(bool(self.files) and self.row == self.files[0][1].size)
        return {**self._base_stats(), "files": whole, "bad_files": self.bad_files,
                "late_files": self.late_files, "bad_lines": self.bad_lines,
                "rows_dropped": self.rows_dropped, "bad_line_examples": list(self.bad_line_examples)}


class RedisStream(StreamSource):
    """Entries of a Redis stream, read in ID order (module docstring)."""

    kind = "redis"

    def __init__(self, url, schema, rank=0, world_size=1, retry_seconds=60.0):
        super().__init__(schema, rank, world_size, retry_seconds)
        from urllib.parse import urlparse
        parsed = urlparse(url)
        key = parsed.path.lstrip("/")
        if parsed.scheme != "redis" or not parsed.hostname or not key:
            raise ConfigError(f"data {url!r}: a Redis stream is redis://HOST:PORT/STREAM")
        try:
            import redis
        except ImportError:
            raise ConfigError("reading a Redis stream needs the 'redis' Python package "
                              "(pip install -r requirements.txt)") from None
        self.redis = redis
        self.where, self.key = url, key
        self.address = f"{parsed.hostname}:{parsed.port or 6379}"
        self._server = f"the Redis server at {self.address} of stream {key!r}"
        self.client = redis.Redis(host=parsed.hostname, port=parsed.port or 6379, socket_timeout=30)
        try:
            self.client.ping()
            kind = self.client.type(key).decode()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise DataError(f"cannot reach the Redis server at {self.address} ({exc}): start "
                            f"redis-server there, or fix the host and port in --data {url}") from None
        except redis.RedisError as exc:        # e.g. it wants a password
            raise DataError(f"the Redis server at {self.address} refused to answer: {exc}") from None
        if kind not in ("none", "stream"):     # none: not created yet, the first XADD will
            raise ConfigError(self._not_a_stream(kind))
        from hybridps.data.columns import ColumnConverter
        self.converter = ColumnConverter(schema)
        self.columns = self.converter.required_columns()
        self.last_id = "0-0"            # the last entry consumed
        self.fetched_id = "0-0"         # the last entry fetched
        self.pending = []               # [(id, fields)] fetched, not consumed
        self.end_seen = False

    def _not_a_stream(self, kind):
        return (f"Redis key {self.key!r} at {self.address} holds a {kind}, not a stream: name a "
                f"stream's key in --data {self.where} (XADD creates one), or delete that key")

    def _poll(self, need):
        if len(self.pending) < need and not self.end_seen and self._may_try():
            entries = self._fetch(need - len(self.pending) + 1)
            now = time.time()
            for entry_id, fields in entries:
                self.fetched_id = entry_id.decode()
                if REDIS_END_FIELD in fields:
                    self.end_seen = True
                    break
                self.pending.append((self.fetched_id, fields, _entry_time(self.fetched_id, now)))
            if self.pending:
                self.newest_arrival = self.pending[-1][2]
                self.position_arrival = self.pending[0][2]
        ready = len(self.pending) >= need
        return ready, self.end_seen and not ready

    def _fetch(self, count):
        """Up to ``count`` entries after the last fetched; none while the server is lost (the
        retry and the failure after ``retry_seconds``: module docstring)."""
        try:
            entries = self.client.xrange(self.key, min=f"({self.fetched_id}", count=count)
        except self.redis.ResponseError as exc:       # WRONGTYPE: the key was replaced
            self.failure = (self._not_a_stream(self._type()) if "WRONGTYPE" in str(exc)
                            else f"Redis stream {self.key!r} at {self.address}: {exc}")
            return []
        except self.redis.RedisError as exc:          # connection lost, timeout
            self._unreachable(self._server, exc)
            return []
        self._reachable(self._server)
        return entries

    def _type(self):
        try:
            return self.client.type(self.key).decode()
        except self.redis.RedisError:
            return "value of another type"

    def _available(self):
        return len(self.pending)

    def _rows(self, offset, count):
        import pyarrow as pa
        from hybridps.data.schema_csv import check_text_columns
        entries = self.pending[offset:offset + count]
        table = pa.table({c: pa.array([_text(fields.get(c.encode())) for _, fields, _ in entries],
                                      pa.string()) for c in self.columns})
        table, _keep, problems = check_text_columns(table, self.schema)
        if problems:
            row, column, problem = problems[0]
            raise DataError(f"{self.where}: entry {entries[row][0]}, field {column!r}: {problem}")
        return self.converter.convert(table, f"{self.where}, entries {entries[0][0]}..{entries[-1][0]}")

    def _advance(self, count):
        self.last_id = self.pending[count - 1][0]
        self.pending = self.pending[count:]
        if self.pending:
            self.position_arrival = self.pending[0][2]

    def state(self):
        return self._base_state(last_id=self.last_id)

    def restore(self, state):
        self._restore_base(state)
        self.last_id = self.fetched_id = str(state["last_id"])
        self.pending, self.end_seen = [], False

    def stats(self):
        return {**self._base_stats(), "last_id": self.last_id}


def _stamp(path):
    """(size, mtime in ns) of a file, None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _arrival(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def _entry_time(entry_id, default):
    """The time a Redis entry was added (its auto-generated ID starts with milliseconds)."""
    try:
        return int(entry_id.split("-")[0]) / 1000.0
    except ValueError:
        return default


def _text(value):
    return "" if value is None else value.decode("utf-8", "replace")
