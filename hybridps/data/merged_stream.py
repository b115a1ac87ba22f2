"""Several streams read as one: the K outputs of K joiners, in one order every rank agrees on.

What lives here: :class:`MergedStream` (``--data stream:DIR1,stream:DIR2`` or
``redis://HOST:PORT/S1,redis://HOST:PORT/S2``, any mix: the specs separated by commas, each
starting with ``stream:`` or ``redis://``), :func:`split_stream_specs` and :func:`open_streams`
(the source of any stream spec, one stream or several). What does not: reading
one stream (hybridps.data.stream, whose sources it holds), the per-step agreement
(hybridps.step_control).

The merged sequence is a list of *segments* (stream ``i``, ``n`` rows: the next ``n`` rows of
stream ``i``), and global batches are cut from it as from one stream (rank ``r`` trains rows
``[r * batch_size, (r + 1) * batch_size)`` of each). Segments are appended only by agreement,
so the order does not depend on when files or entries reached each rank: when a rank has not
the rows of the next step in the segments agreed so far, it sends, in the step's agreement
(hybridps.step_control notes), how many rows of each stream it holds beyond them; every rank
receives every rank's counts, takes the lowest of each stream (rows every rank holds), and
appends one segment per stream with new rows, in stream order. A stream with nothing new gets
no segment and holds nothing back. Each stream's rows keep their own order, so every prefix of
the merged sequence is a prefix of each stream: the position is the vector of the streams'
positions (saved in every checkpoint, restored on any number of ranks), and a resume re-agrees
the order of the rows after it, none lost, none repeated. The end: when every stream's end
marker is there and every row every rank holds is ordered. A stream file that changed after it
was read stops the run (rows of one stream dropped on some ranks would break the agreed order),
whatever ``on_bad_line`` says.
"""
import re

from hybridps.data.partitioned import concat_batches
from hybridps.data.stream import StreamSource, open_stream
from hybridps.errors import ConfigError, DataError

_NOTE = "merged-stream-rows"


def split_stream_specs(spec):
    """The stream specs of a comma-separated list (a comma is a separator only before
    ``stream:`` or ``redis://``, so a directory name may hold one)."""
    return re.split(r",(?=stream:|redis://)", spec)


def open_streams(spec, schema, *, rank, world_size, on_bad_line="raise", retry_seconds=60.0):
    """The source of a stream spec: one stream (hybridps.data.stream.open_stream), or
    several comma-separated merged into one sequence."""
    specs = split_stream_specs(spec)
    if len(specs) == 1:
        return open_stream(spec, schema, rank=rank, world_size=world_size, on_bad_line=on_bad_line,
                           retry_seconds=retry_seconds)
    return MergedStream(specs, schema, rank=rank, world_size=world_size, on_bad_line=on_bad_line,
                        retry_seconds=retry_seconds)


class MergedStream(StreamSource):
    """Rows of several streams, in the order every rank agreed on (module docstring)."""

    kind = "merged"

    def __init__(self, specs, schema, rank=0, world_size=1, on_bad_line="raise", retry_seconds=60.0):
        super().__init__(schema, rank, world_size, retry_seconds)
        if len(specs) < 2 or len(set(specs)) != len(specs):
            raise ConfigError(f"data {','.join(specs)!r}: a merged stream lists two or more "
                              f"different streams, comma-separated")
        self.streams = [open_stream(spec, schema, rank=rank, world_size=world_size,
                                    on_bad_line=on_bad_line, retry_seconds=retry_seconds) for spec in specs]
        self.where = ",".join(s.where if s.kind == "redis" else f"stream:{s.where}" for s in self.streams)
        self.segments = []              # [stream index, rows] agreed, after the position
        self.row = 0                    # rows of segments[0] consumed
        self.ordered = [0] * len(self.streams)   # rows of each stream in the segments, unconsumed
        self.end_seen = False

    # ------------------------------------------------------------------ reading
    def _poll(self, need):
        for index, stream in enumerate(self.streams):
            if stream.failure is None:
                stream._poll(self.ordered[index] + need)
            if stream._notes and self.failure is None:
                self.failure = (f"stream file(s) {', '.join(stream._notes)} of {stream.where} changed "
                                f"after they were read: a merged stream cannot skip them")
            self.failure = self.failure or stream.failure
        self.newest_arrival = max((s.newest_arrival for s in self.streams if s.newest_arrival),
                                  default=None)
        self.position_arrival = min((s.position_arrival for s in self.streams
                                     if s.position_arrival and s._available()), default=None)
        ready = self._available() >= need
        new = [s._available() - o for s, o in zip(self.streams, self.ordered)]
        self.end_seen = all(s.end_seen for s in self.streams) and not any(new)
        if not ready:
            self._notes.append(f"{_NOTE} {self.rank} " + " ".join(map(str, new)))
        return ready, self.end_seen and not ready

    def _apply_notes(self, notes):
        """Every rank's counts of new rows per stream: the lowest of each, appended as one
        segment per stream in stream order. True if rows were appended."""
        counts = {}
        for note in notes:
            kind, _, text = note.partition(" ")
            if kind != _NOTE:
                continue
            rank, *values = text.split()
            counts[int(rank)] = [int(v) for v in values]
        if len(counts) != self.world_size:
            raise DataError(f"merged stream {self.where}: ranks {sorted(counts)} of {self.world_size} "
                            f"sent their rows at one step: the ranks disagree on the merged order")
        appended = False
        for index, lowest in enumerate(min(column) for column in zip(*counts.values())):
            if lowest > 0:
                self.segments.append([index, lowest])
                self.ordered[index] += lowest
                appended = True
        return appended

    def _available(self):
        return sum(n for _, n in self.segments) - self.row

    def _walk(self, offset, count):
        """(stream index, the stream's offset after its position, rows) of the merged rows
        ``[offset, offset + count)``."""
        before = [0] * len(self.streams)     # rows of each stream earlier in the walk
        skip, pieces = offset, []
        for position, (index, rows) in enumerate(self.segments):
            rows -= self.row if position == 0 else 0
            if skip >= rows:
                before[index] += rows
                skip -= rows
                continue
            take = min(count, rows - skip)
            pieces.append((index, before[index] + skip, take))
            before[index] += rows
            skip, count = 0, count - take
            if not count:
                break
        return pieces

    def _rows(self, offset, count):
        return concat_batches([self.streams[index]._rows(start, rows)
                               for index, start, rows in self._walk(offset, count)])

    def _advance(self, count):
        while count:
            index, rows = self.segments[0]
            take = min(count, rows - self.row)
            stream = self.streams[index]
            stream._advance(take)
            stream.rows_consumed += take
            self.ordered[index] -= take
            self.row += take
            count -= take
            if self.row == rows:
                self.segments.pop(0)
                self.row = 0

    # ------------------------------------------------------------------ position
    def state(self):
        return self._base_state(streams=[s.state() for s in self.streams])

    def restore(self, state):
        self._restore_base(state)
        positions = state.get("streams")
        if not isinstance(positions, list) or len(positions) != len(self.streams):
            raise DataError(f"the checkpoint's merged stream position {positions!r} does not list "
                            f"one position per stream of {self.where}")
        for stream, position in zip(self.streams, positions):
            stream.restore(position)
        self.segments, self.row, self.ordered = [], 0, [0] * len(self.streams)
        self.end_seen = False

    def stats(self):
        return {**self._base_stats(), "streams": [s.stats() for s in self.streams]}
