"""Readers of partitioned columnar data (Parquet row groups, TFRecord files): the shared rules.

What lives here: :class:`PartitionedReader`, which a format subclasses with two methods
(``_list_units``: the parts of the files and their row counts, from metadata only;
``_read_unit``: one part as an Arrow table of the schema's columns), and gets from here:

* Sharding: the parts of all files (Parquet: every row group of every file; TFRecord: every
  file), in path order, go round-robin to the ranks: part ``u`` to rank ``u % world_size``. A
  rank reads only its own parts; every rank reads the (small) metadata of all.
* The same number of steps everywhere: an epoch has ``min over ranks of floor(rows of the
  rank / batch size)`` batches on every rank (computed from the metadata, no communication);
  a rank's rows beyond that are dropped for that epoch and counted (``dropped_rows``). Batches
  have exactly ``batch_size`` rows; a batch may span parts.
* Epochs: after the last batch of an epoch the next begins (every part again); with
  ``shuffle=True`` the order of the rank's parts is shuffled per epoch, and rows pass a shuffle
  buffer of ``shuffle_buffer`` rows (reservoir-style: each new row replaces a random buffered
  one, which is emitted), both from a generator seeded by (seed, rank, epoch): the same seed and
  rank count give the same batches.
* Position: (epoch, batches of the epoch handed out). Without shuffling, a resume skips whole
  parts by their row counts and slices the first one, so no row is read twice; with shuffling,
  it replays the epoch's stream up to the position (reading, not training, those rows again).
  The position is also valid on another world size only at an epoch boundary (then the parts
  are reassigned); mid-epoch it restarts the epoch's remaining share by the global batch count.
* A cache of parsed parts (``data_cache``, hybridps.data.parsed_cache): a part found there is
  not decoded or converted again; one converted is stored there.
* Bad input: an error naming the file (and the part), the row and the column, or, with
  ``on_bad_line="skip"``: a bad row (hybridps.data.columns) is dropped, a part that cannot be
  read is skipped (and not read again in later epochs), a file whose metadata or framing is
  damaged is left out at start-up (every rank reads the metadata of all, so all leave it out
  and agree on the shares), each counted once in ``bad_lines`` (rows) and ``bad_parts``.
  A rank whose share comes out short of the epoch's batches (rows or parts found bad while
  reading, after the batch count was fixed) reads its share again from the epoch's start to
  fill them, counted in ``refilled_rows``: every rank still runs the same number of steps, with
  no communication. A resume under ``skip`` replays the epoch up to the position (as with
  shuffling), so it lands on the same rows whatever was skipped before it.

What does not: turning columns into keys and floats (hybridps.data.columns).
"""
import hashlib
import os

import numpy as np

from hybridps.data.batch import Batch, check_int, empty_batch, resolve_batch_size
from hybridps.data.columns import ColumnConverter
from hybridps.data.source import DataSource
from hybridps.errors import ConfigError, DataError
from hybridps.wording import counted

_MAX_EXAMPLES = 10


def concat_batches(parts):
    """One Batch of several (lists and groups included)."""
    if len(parts) == 1:
        return parts[0]
    lists = {}
    for name in parts[0].lists:
        lists[name] = (np.concatenate([p.lists[name][0] for p in parts]),
                       np.concatenate([p.lists[name][1] for p in parts]))
    truncated = {}
    for p in parts:
        for name, count in p.truncated.items():
            truncated[name] = truncated.get(name, 0) + count
    groups = None if parts[0].groups is None else np.concatenate([p.groups for p in parts])
    row_ids = None if parts[0].row_ids is None else np.concatenate([p.row_ids for p in parts])
    weights = None if parts[0].weights is None else np.concatenate([p.weights for p in parts])
    return Batch(dense=np.concatenate([p.dense for p in parts]),
                 keys=np.concatenate([p.keys for p in parts]),
                 labels=np.concatenate([p.labels for p in parts]), lists=lists,
                 truncated=truncated, groups=groups, row_ids=row_ids, weights=weights)


class PartitionedReader(DataSource):
    """A rank's share of partitioned data, streamed as batches (see the module docstring): a
    finite :class:`~hybridps.data.source.DataSource`.

    Args:
        paths: the data files (hybridps.data.files.expand_paths), in order.
        schema: hybridps.schema.FeatureSchema.
        rank, world_size: this rank's place among the ranks that read the data.
        on_bad_line: "raise" or "skip" (a part that cannot be read).
        batch_size: default batch size.
        shuffle, shuffle_buffer, seed: see the module docstring.
        data_cache: optional directory of parsed parts (hybridps.data.parsed_cache): a part is
            read from there when it holds it, and stored there after it is converted.
    """

    kind = "partitioned"

    def __init__(self, paths, schema, rank=0, world_size=1, on_bad_line="raise", batch_size=None,
                 shuffle=False, shuffle_buffer=0, seed=0, data_cache=None):
        self.paths = list(paths)
        if not self.paths:
            raise DataError(f"no {self.kind} files given")
        self.path = self.paths[0] if len(self.paths) == 1 else os.path.commonpath(self.paths)
        self.schema = schema
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size ({self.world_size}), got {rank}")
        if on_bad_line not in ("raise", "skip"):
            raise ConfigError(f"on_bad_line must be raise or skip, got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.default_batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.shuffle, self.shuffle_buffer, self.seed = bool(shuffle), int(shuffle_buffer), int(seed)
        self.converter = ColumnConverter(schema)
        self.cache = None
        if data_cache:
            from hybridps.data.parsed_cache import ParsedCache
            self.cache = ParsedCache(data_cache, schema, self.kind)
        self.bad_parts, self.bad_rows, self.dropped_rows, self.rows_read = 0, 0, 0, 0
        self.refilled_rows = 0
        self.bad_line_examples = []
        self.part_positives = {}                 # part -> its positive labels, once it was read
        self._bad_units = set()                  # parts found unreadable: not read again
        self._bad_rows_of = {}                   # part -> its bad rows (counted once)
        self.units = self._list_units()          # [(path, part, rows)] of all files, in order
        self.unit_start = dict(zip(self.units, np.concatenate([[0], np.cumsum([u[2] for u in self.units])[:-1]]).tolist()))
        self.data_lines = int(sum(rows for _, _, rows in self.units))
        if self.data_lines == 0:
            raise DataError(f"{self.path}: the {self.kind} data holds no rows"
                            + (f" that can be read ({self.bad_parts} damaged files left out)"
                               if self.bad_parts else ""))
        self.epoch, self.batches_done = 0, 0

    # ------------------------------------------------------------------ for subclasses
    def _list_units(self):
        raise NotImplementedError

    def _read_unit(self, unit):
        raise NotImplementedError

    def _unreadable_file(self, path, reason, rows=0):
        """A file whose metadata or framing is damaged (found while listing the parts, on every
        rank): a DataError, or under ``skip`` left out, counted once (by rank 0)."""
        if self.on_bad_line == "raise":
            raise DataError(f"{path}: {reason}")
        if self.rank == 0:
            self.bad_parts += 1
            self.bad_rows += rows
            self._example(f"{path}: skipped the whole file ({reason})")

    # ------------------------------------------------------------------ shares
    def units_of(self, rank, world_size=None):
        world = world_size or self.world_size
        return [u for i, u in enumerate(self.units) if i % world == rank]

    @property
    def num_rows(self):
        return int(sum(rows for _, _, rows in self.units_of(self.rank)))

    def batches_per_epoch(self, batch_size):
        """Batches of one epoch on every rank: the smallest share's full batches."""
        least = min(sum(r for _, _, r in self.units_of(rank)) for rank in range(self.world_size))
        count = least // batch_size
        if count == 0:
            raise DataError(f"{self.path}: the smallest rank's share holds {least} rows, fewer than "
                            f"one batch of {batch_size}; use a smaller batch_size or fewer ranks "
                            f"({self.data_lines} rows in {len(self.units)} parts over "
                            f"{counted(self.world_size, 'rank')})")
        return count

    # ------------------------------------------------------------------ streaming
    def _rng(self, epoch):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.rank, epoch, 0x5EED])))

    def _read(self, unit):
        """The Batch of a part's good rows, or None for a part that cannot be read (skip)."""
        if unit in self._bad_units:
            return None
        path, part, _ = unit
        where = f"{path}, {self.part_name} {part}"
        skip = self.on_bad_line == "skip"
        try:
            batch = self.cache.load(unit) if self.cache is not None else None
            if batch is None:
                converted = self.converter.convert_rows(self._read_unit(unit), where, skip)
                batch = converted.batch
                kept = converted.kept
                if len(converted.bad_rows):
                    self._count_bad_rows(unit, where, converted)
                elif self.cache is not None:     # a part with bad rows is not cached: a
                    self.cache.store(unit, batch)  # later run counts them again
            else:
                kept = None
            rows = np.arange(batch.size, dtype=np.int64) if kept is None else kept.astype(np.int64)
            batch.row_ids = self.unit_start[unit] + rows
        except DataError as exc:
            if not skip:
                raise
            return self._skip(unit, where, str(exc)[len(where) + 2:] if str(exc).startswith(where) else str(exc))
        except Exception as exc:   # noqa: BLE001 - any failure of the format library, named
            if not skip:
                raise DataError(f"{where}: cannot be read ({type(exc).__name__}: {exc})") from None
            return self._skip(unit, where, f"{type(exc).__name__}: {exc}")
        self.rows_read += batch.size
        self.part_positives[unit] = batch.positives
        return batch

    def _count_bad_rows(self, unit, where, converted):
        """Bad rows of a part dropped under skip: counted the first time the part is read."""
        if unit in self._bad_rows_of:
            return
        self._bad_rows_of[unit] = len(converted.bad_rows)
        self.bad_rows += len(converted.bad_rows)
        for row in converted.bad_rows[:_MAX_EXAMPLES]:
            self._example(f"{where}, row {int(row)}: skipped ({converted.problem(int(row))})")

    def _skip(self, unit, where, reason):
        self._bad_units.add(unit)
        self.bad_parts += 1
        self.bad_rows += unit[2] - self._bad_rows_of.pop(unit, 0)
        self._bad_rows_of[unit] = unit[2]
        self._example(f"{where}: skipped ({reason})")
        return None

    def _example(self, text):
        if len(self.bad_line_examples) < _MAX_EXAMPLES:
            self.bad_line_examples.append(text)

    def _rows_of_epoch(self, epoch, skip_rows=0):
        """This rank's rows of an epoch as a stream of Batches (parts, shuffled if asked),
        starting ``skip_rows`` rows in (skipped by part row counts without shuffling)."""
        units = self.units_of(self.rank)
        if not self.shuffle:
            for unit in units:
                if skip_rows >= unit[2]:
                    skip_rows -= unit[2]
                    continue
                batch = self._read(unit)
                if batch is None:
                    continue
                if skip_rows:
                    batch, skip_rows = batch.take(slice(skip_rows, batch.size)), 0
                yield batch
            return
        rng = self._rng(epoch)
        units = [units[i] for i in rng.permutation(len(units))]
        buffer = None
        for unit in units:
            batch = self._read(unit)
            if batch is None:
                continue
            if self.shuffle_buffer <= 1:
                yield batch.take(rng.permutation(batch.size))
                continue
            buffer = batch if buffer is None else concat_batches([buffer, batch])
            if buffer.size > self.shuffle_buffer:
                order = rng.permutation(buffer.size)
                out = buffer.size - self.shuffle_buffer
                yield buffer.take(order[:out])
                buffer = buffer.take(order[out:])
        if buffer is not None and buffer.size:
            yield buffer.take(rng.permutation(buffer.size))

    def _refilled_rows_of_epoch(self, epoch, skip_rows, pass_rows):
        """The rows of an epoch (:meth:`_rows_of_epoch`), then, for a share that came out short
        (bad rows or parts met while reading), the share again from the epoch's start, for as
        long as it is asked for. ``pass_rows`` gets the good rows of the first pass once it
        has ended (the caller counts refilled rows from it)."""
        rows = 0
        for batch in self._rows_of_epoch(epoch, skip_rows):
            rows += batch.size
            yield batch
        pass_rows.append(rows)
        if self.on_bad_line == "raise":     # no row was skipped: the parts held fewer rows than
            return                          # their metadata says (iter_batches names it)
        while True:
            again = 0
            for batch in self._rows_of_epoch(epoch):
                again += batch.size
                yield batch
            if not again:
                raise DataError(f"{self.path}: rank {self.rank} has no readable row in its share "
                                f"({len(self.units_of(self.rank))} parts, {self.bad_parts} of them "
                                f"skipped as unreadable: {self.bad_line_examples[:3]})")

    def _next_batches(self, batch_size=None, num_steps=None):
        """Exactly ``num_steps`` batches of exactly ``batch_size`` rows (forever if None),
        epoch after epoch, from the current position (which advances before each batch): what
        :meth:`iter_batches` serves."""
        b = resolve_batch_size(batch_size, self.default_batch_size)
        per_epoch = self.batches_per_epoch(b)
        # replaying reads the epoch from its start up to the position: exact whatever order
        # (shuffling) or rows skipped as bad (whose counts are not known before reading)
        replay = self.shuffle or self.on_bad_line == "skip"
        produced = 0
        while num_steps is None or produced < num_steps:
            if self.batches_done >= per_epoch:             # a position saved at an epoch's end
                self.epoch, self.batches_done = self.epoch + 1, 0
            done, epoch = self.batches_done, self.epoch
            pass_rows = []
            stream = self._refilled_rows_of_epoch(epoch, 0 if replay else done * b, pass_rows)
            first = 0 if replay else done                  # the index of the first batch below
            for index, batch in enumerate(_fixed_size(stream, b), start=first):
                if index < done:                           # replaying up to the position
                    continue
                # the position moves before the batch is handed out: past the epoch's end at its
                # last batch (the remainder is counted then, not when the next one is asked for)
                self.batches_done += 1
                if self.batches_done == per_epoch:
                    self._count_epoch_end(per_epoch * b, pass_rows)
                    self.epoch, self.batches_done = epoch + 1, 0
                produced += 1
                yield batch
                if self.epoch != epoch or (num_steps is not None and produced >= num_steps):
                    break
            else:
                raise DataError(f"{self.path}: rank {self.rank} read {pass_rows[0]} rows of epoch "
                                f"{epoch}, fewer than its {per_epoch} batches of {b} need, although "
                                f"the parts' metadata counts {self.num_rows}: a part holds fewer "
                                f"rows than its metadata says")
            stream.close()

    def _count_epoch_end(self, used, pass_rows):
        """At an epoch's last batch: the rows of the share no batch took (``dropped_rows``), or,
        for a share that came out short, the rows read a second time (``refilled_rows``)."""
        if pass_rows and pass_rows[0] < used:
            self.refilled_rows += used - pass_rows[0]
            return
        bad = sum(self._bad_rows_of.get(unit, 0) for unit in self.units_of(self.rank))
        self.dropped_rows += max(0, self.num_rows - bad - used)

    def epoch_batches(self, batch_size, count=None):
        """One pass over this rank's share in order (no shuffling), ``count`` batches of at most
        ``batch_size`` rows (default: as many as the largest share needs; the last ones are
        smaller or empty): what evaluation and prediction read. The position does not move."""
        largest = max(sum(r for _, _, r in self.units_of(rank)) for rank in range(self.world_size))
        count = count if count is not None else -(-largest // batch_size)
        rows = self.all_rows()
        for k in range(count):
            yield rows.take(slice(min(k * batch_size, rows.size), min((k + 1) * batch_size, rows.size)))

    def all_rows(self):
        """Every row of this rank's share, in order, as one Batch (no shuffling; the position
        does not move): what evaluation and the stream sources (one file each) read."""
        parts = list(self._plain_rows())
        return concat_batches(parts) if parts else empty_batch(self.schema)

    def _plain_rows(self):
        for unit in self.units_of(self.rank):
            batch = self._read(unit)
            if batch is not None:
                yield batch

    def fill_cache(self):
        """Read every part of this rank's share through the cache (``hybridps prepare-data``):
        a part not cached yet is converted and stored. Yields each part once it is done."""
        if self.cache is None:
            raise ConfigError("fill_cache needs a data_cache directory")
        for unit in self.units_of(self.rank):
            self._read(unit)
            yield unit

    # ------------------------------------------------------------------ position / info
    def state(self):
        return {"kind": self.kind, "path": self.path, "epoch": self.epoch,
                "batches_done": self.batches_done, "world_size": self.world_size,
                "rank": self.rank, "data_lines": self.data_lines, "parts": len(self.units),
                "shuffle": self.shuffle, "seed": self.seed}

    def restore(self, state):
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise DataError(f"cannot restore a {self.kind} reader from data state {state!r}")
        if state.get("data_lines") != self.data_lines or state.get("parts") != len(self.units):
            raise DataError(f"data state was saved for {state.get('data_lines')} rows in "
                            f"{state.get('parts')} parts; {self.path} has {self.data_lines} rows in "
                            f"{len(self.units)} parts: not the same data")
        self.epoch = check_int("epoch", state.get("epoch"), 0)
        done = check_int("batches_done", state.get("batches_done"), 0)
        if state.get("world_size") != self.world_size and done:
            # another world size mid-epoch: the epoch restarts for the new shares (documented)
            done = 0
        self.batches_done = done

    def stats(self):
        return {"kind": self.kind, "path": self.path, "format": self.kind,
                "data_lines": self.data_lines, "rows": self.num_rows, "parts": len(self.units),
                "rank_parts": len(self.units_of(self.rank)), "bad_lines": self.bad_rows,
                "bad_parts": self.bad_parts, "bad_line_examples": list(self.bad_line_examples),
                "dropped_rows": self.dropped_rows, "refilled_rows": self.refilled_rows,
                "rows_read": self.rows_read,
                "rank": self.rank, "world_size": self.world_size,
                "positives": int(sum(self.part_positives.values())),
                "epoch": self.epoch, "offset": self.batches_done,
                **({"cache": self.cache.stats()} if self.cache is not None else {})}

    def fingerprint(self):
        """What identifies the data (compared across ranks): the files, their sizes, the parts."""
        sizes = [os.path.getsize(p) for p in self.paths]
        digest = hashlib.blake2b(repr((self.paths, sizes, self.units)).encode(), digest_size=16).hexdigest()
        return {"path": self.path, "file_bytes": sum(sizes), "content_bytes": self.data_lines,
                "content_blake2b": digest, "data_lines": self.data_lines}


def _fixed_size(stream, size):
    """Batches of exactly ``size`` rows from a stream of Batches of any sizes (the rows left at
    the end are not yielded)."""
    pending, have = [], 0
    for chunk in stream:
        if not chunk.size:
            continue
        pending.append(chunk)
        have += chunk.size
        if have < size:
            continue
        joined = concat_batches(pending)
        start = 0
        while joined.size - start >= size:
            yield joined.take(slice(start, start + size))
            start += size
        rest = joined.take(slice(start, joined.size))
        pending, have = ([rest] if rest.size else []), rest.size
