"""From columns to a Batch: the one place where schema features become keys, lists and floats.

What lives here: :class:`ColumnConverter`, which turns an Arrow table holding a schema's
columns (from the CSV, Parquet, TFRecord and stream readers alike) into a
:class:`hybridps.data.batch.Batch`, vectorized (Arrow compute and numpy; per-row Python
never runs, per-*distinct* text value once). What does not: finding, opening and sharding
files (the readers), the hashing formulas (hybridps.data.hashing).

Types and missing values (null in Parquet, an empty cell in CSV):

* label (a schema's one ``label``): integers, floats or booleans holding 0/1; missing or any
  other value is a bad row.
* labels (the tasks of a ``labels:`` list): numbers; missing (null, an empty CSV cell, an absent
  stream field, NaN) is NaN in ``Batch.labels``: the row is left out of that task's loss and
  metrics; a binary task's label other than 0/1, or a regression label that is infinite, is
  a bad row naming the task and the column. A task ``given`` another (hybridps.tasks) is then
  missing on the rows where that task's label is not 1 (hybridps.tasks.mask_given).
* weight: a finite number >= 0; missing or any other value is a bad row.
* dense: any number type; missing reads the feature's ``fill`` (default 0); then the
  transform (log1p: ``log1p(max(x, 0))``).
* single-valued sparse: int64/int32 ids, or text (canonical decimal integers are those
  integers, other text hashes by hybridps.data.hashing.text_id); missing is the id -1.
* list sparse: list<int> or list<string> (or, from CSV, text split by the feature's
  separator); a missing list is an empty list, a missing element is dropped.
* group_by: integers or text (text_id), missing -1.

A column of another type (a float column for a sparse feature, a list for a single-valued one,
text for a dense one that does not parse) raises DataError naming the file (and row group or
record range), the column and the type found: the whole part is bad. A bad *row* (a missing
label, a label other than 0/1, a dense value that is not finite or beyond the float32 range the
model computes in, such as 1e300) is named by its row; :meth:`ColumnConverter.convert_rows`
can instead drop such rows and report them (``on_bad_line=skip``).
"""
from typing import Callable, NamedTuple, Optional

import numpy as np

from hybridps.data.batch import Batch, truncate_lists
from hybridps.data.hashing import MISSING_ID, VALUE_PERSON, space_seed
from hybridps.errors import DataError
from hybridps.tasks import mask_given


#: The largest magnitude a dense value may have: the model computes in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Conversion(NamedTuple):
    """What :meth:`ColumnConverter.convert_rows` made of a table: the Batch of its good rows,
    their indices in the table (None: every row), the indices of the dropped bad rows, and
    ``problem(row)``, the message of a bad row."""
    batch: Batch
    kept: Optional[np.ndarray]
    bad_rows: np.ndarray
    problem: Callable[[int], str]


def _pa():
    import pyarrow as pa
    import pyarrow.compute as pc
    return pa, pc


class ColumnConverter:
    """Arrow tables of a schema's columns -> Batch.

    Args:
        schema: hybridps.schema.FeatureSchema (not the Criteo preset, whose keys are hashed
            by its own formula in hybridps.data.criteo).
    """

    def __init__(self, schema):
        from hybridps._kernels import TextIdCache
        self.schema = schema
        # text ids remembered across batches: a reader sees the same values again and again
        self.text_ids = TextIdCache(VALUE_PERSON)
        self.seeds = {f.name: space_seed(f.key_space) for f in schema.sparse}
        self.single_seeds = np.array([self.seeds[f.name] for f in schema.single_features], dtype=np.uint64)
        self.columns = ([t.column for t in schema.tasks] + ([schema.weight] if schema.weight else [])
                        + [f.column for f in schema.dense]
                        + [f.column for f in schema.sparse]
                        + ([schema.group_by] if schema.group_by else []))

    def required_columns(self):
        """Every column the schema reads (label, dense, sparse, group_by), without repeats."""
        return list(dict.fromkeys(self.columns))

    def single_value_columns(self):
        """The columns holding one id per row (single-valued features, group_by): the ones a
        Parquet reader can hand over dictionary-encoded, as they are stored (text then costs
        one id per distinct value of a column chunk, not one per row)."""
        return list(dict.fromkeys([f.column for f in self.schema.single_features]
                                  + ([self.schema.group_by] if self.schema.group_by else [])))

    def check_columns(self, names, where):
        """Raise DataError naming the columns the schema needs that ``names`` lacks."""
        missing = [c for c in self.required_columns() if c not in names]
        if missing:
            raise DataError(f"{where}: column(s) {missing} missing; the schema reads "
                            f"{self.required_columns()}, the data has {list(names)}")

    def check_types(self, arrow_schema, where):
        """Raise DataError naming the first column the schema reads whose Arrow type cannot
        hold what the schema reads from it (checked from a file's schema before any row is
        read: a list column for a single-valued feature, text for the label, ...)."""
        pa, _ = _pa()
        number = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)  # noqa: E731
        text = lambda t: _is_text(t) or (pa.types.is_dictionary(t) and _is_text(t.value_type))  # noqa: E731
        integer = lambda t: pa.types.is_integer(t) or (pa.types.is_dictionary(t)  # noqa: E731
                                                       and pa.types.is_integer(t.value_type))
        listed = lambda t: ((pa.types.is_list(t) or pa.types.is_large_list(t))  # noqa: E731
                            and (pa.types.is_integer(t.value_type) or _is_text(t.value_type)))
        wanted = [(t.column, number, f"numbers (the labels of task {t.name!r})") for t in self.schema.labels]
        wanted += [] if self.schema.labels else [(self.schema.label, number,
                                                  "0/1 labels (integers, floats or booleans)")]
        if self.schema.weight:
            wanted.append((self.schema.weight, number, "numbers (the row weights)"))
        wanted += [(f.column, lambda t: number(t) or _is_text(t), f"numbers (dense feature {f.name!r})")
                   for f in self.schema.dense]
        wanted += [(f.column, lambda t: integer(t) or text(t),
                    f"integer ids or text (single-valued feature {f.name!r}; a list column needs "
                    f"pooling: sum, mean, sqrtn or none)") for f in self.schema.single_features]
        wanted += [(f.column, lambda t: listed(t) or _is_text(t),
                    f"lists of integer ids or text (list feature {f.name!r}), or text split by "
                    f"{f.separator!r}") for f in self.schema.list_features]
        if self.schema.group_by:
            wanted.append((self.schema.group_by, lambda t: integer(t) or text(t), "integer ids or "
                                                                                  "text (group_by)"))
        for column, ok, description in wanted:
            index = arrow_schema.get_field_index(column)
            if index >= 0 and not ok(arrow_schema.field(index).type):
                _bad_type(where, column, arrow_schema.field(index).type, description)

    def convert(self, table, where):
        """The Batch of an Arrow table's rows (``where`` names the source in errors).

        Raises:
            DataError: naming ``where``, the row and the column of the first bad row, or the
                column of a wrong type.
        """
        return self.convert_rows(table, where).batch

    def convert_rows(self, table, where, skip_bad_rows=False):
        """A :class:`Conversion` of an Arrow table's rows. A bad row (see the module docstring)
        raises DataError naming ``where``, the row (0-based in ``table``) and the column, or
        with ``skip_bad_rows`` is dropped and listed. A column of a wrong type raises either way."""
        from hybridps._kernels import hash_int_id_columns, hash_int_ids
        self.check_columns(table.column_names, where)
        size = table.num_rows
        if self.schema.labels:
            labels, bad, problems = self._task_labels(table, where)
        else:
            labels, bad, problems = self._labels(table.column(self.schema.label), where)
        weights = None
        if self.schema.weight:
            weights, weight_bad, weight_problem = self._weights(table.column(self.schema.weight), where)
            bad = bad | weight_bad
            problems.append((weight_bad, weight_problem))
        dense = np.empty((size, len(self.schema.dense)), dtype=np.float32)
        for j, feature in enumerate(self.schema.dense):
            values, column_bad, problem = self._dense(table.column(feature.column), feature, where)
            dense[:, j] = np.where(column_bad, 0.0, values) if column_bad.any() else values
            bad = bad | column_bad
            problems.append((column_bad, problem))

        def describe(row):
            return next(problem(row) for mask, problem in problems if mask[row])

        bad_rows, kept = np.flatnonzero(bad), None
        if len(bad_rows):
            if not skip_bad_rows:
                raise DataError(f"{where}: row {int(bad_rows[0])}: {describe(int(bad_rows[0]))}")
            kept = np.flatnonzero(~bad)
            table, labels, dense, size = table.take(kept), labels[kept], dense[kept], len(kept)
            weights = None if weights is None else weights[kept]
        singles = self.schema.single_features
        keys = (hash_int_id_columns([self._ids(table.column(f.column), f.column, where) for f in singles],
                                    self.single_seeds) if singles else np.empty((size, 0), np.int64))
        lists, truncated = {}, {}
        for feature in self.schema.list_features:
            values, lengths = self._list(table.column(feature.column), feature, where)
            values, lengths, dropped = truncate_lists(values, lengths, feature.max_len)
            lists[feature.name] = (hash_int_ids(values, self.seeds[feature.name]), lengths)
            if dropped:
                truncated[feature.name] = dropped
        groups = None
        if self.schema.group_by:
            groups = self._ids(table.column(self.schema.group_by), self.schema.group_by, where)
        batch = Batch(dense=dense, keys=keys, labels=labels, lists=lists, truncated=truncated,
                      groups=groups, weights=weights)
        return Conversion(batch, kept, bad_rows, describe)

    # ------------------------------------------------------------------ per kind
    def _labels(self, column, where):
        pa, pc = _pa()
        column = _combined(column)
        name = self.schema.label
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type)):
            _bad_type(where, name, column.type, "0/1 labels (integers, floats or booleans)")
        missing = column.is_null().to_numpy(zero_copy_only=False) if column.null_count \
            else np.zeros(len(column), bool)
        if column.null_count:
            column = pc.fill_null(column, pa.scalar(0, pa.int64()).cast(column.type))
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        not_binary = (values != 0) & (values != 1)

        def missing_label(row):
            return f"column {name!r} (the label) is missing"

        def wrong_label(row):
            return f"column {name!r} (the label) must be 0 or 1, got {values[row]!r}"

        return (np.where(not_binary, 0.0, values).astype(np.float32), missing | not_binary,
                [(missing, missing_label), (not_binary, wrong_label)])

    def _task_labels(self, table, where):
        """(labels (B, T) float32, NaN where missing; bad rows; [(mask, problem)]) of the tasks
        of a ``labels:`` schema (see the module docstring)."""
        tasks = self.schema.labels
        labels = np.empty((table.num_rows, len(tasks)), dtype=np.float32)
        bad = np.zeros(table.num_rows, dtype=bool)
        problems = []
        for j, task in enumerate(tasks):
            values = _numbers(table.column(task.column), where, task.column,
                              f"numbers (the labels of task {task.name!r})")
            with np.errstate(invalid="ignore"):
                if task.kind == "binary":
                    wrong = ~np.isnan(values) & (values != 0) & (values != 1)
                else:
                    wrong = ~np.isnan(values) & ~(np.abs(values) <= FLOAT32_MAX)
            labels[:, j] = np.where(wrong, np.nan, values)
            bad |= wrong

            def problem(row, task=task, values=values):
                wanted = "0 or 1" if task.kind == "binary" else "a finite number"
                return (f"column {task.column!r} (the label of the {task.kind} task {task.name!r}) "
                        f"must be {wanted} or missing, got {values[row]!r}")
            problems.append((wrong, problem))
        return mask_given(tasks, labels), bad, problems

    def _weights(self, column, where):
        """(weights float32, bad rows, problem) of the ``weight`` column: finite numbers >= 0."""
        name = self.schema.weight
        values = _numbers(column, where, name, "numbers (the row weights)")
        with np.errstate(invalid="ignore"):
            bad = ~((values >= 0) & (values <= FLOAT32_MAX))

        def problem(row):
            return (f"column {name!r} (the row weight) must be a finite number >= 0, got "
                    f"{'nothing' if np.isnan(values[row]) else repr(values[row])}")
        return np.where(bad, 0.0, values).astype(np.float32), bad, problem

    def _dense(self, column, feature, where):
        pa, pc = _pa()
        column = _combined(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column = pc.cast(pc.if_else(pc.equal(column, ""), None, column), pa.float64())
            except pa.ArrowInvalid as exc:
                raise DataError(f"{where}: column {feature.column!r} (dense feature "
                                f"{feature.name!r}) holds text that is not a number ({exc})") from None
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type)):
            _bad_type(where, feature.column, column.type, f"numbers (dense feature {feature.name!r})")
        if column.null_count:
            column = pc.fill_null(column, feature.fill)
        raw = values = column.to_numpy(zero_copy_only=False)
        if feature.transform == "log1p":
            values = np.log1p(np.maximum(values.astype(np.float64, copy=False), 0.0))
        elif values.dtype != np.float32:     # float32 stays (the batch is float32: exact)
            values = raw = values.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(values) <= FLOAT32_MAX)      # NaN, infinite, or beyond float32

        def problem(row):
            what = "is not finite" if not np.isfinite(values[row]) else \
                f"is beyond the float32 range the model computes in (|x| <= {FLOAT32_MAX:.4g})"
            return f"column {feature.column!r} (dense feature {feature.name!r}) {what}: {raw[row]!r}"

        return values, bad, problem

    def _ids(self, column, name, where):
        """int64 ids of a single-valued column (missing: -1)."""
        pa, pc = _pa()
        column = _combined(column)
        kind = column.type
        if pa.types.is_integer(kind):
            if kind != pa.int64():
                column = pc.cast(column, pa.int64())
            if column.null_count:
                column = pc.fill_null(column, MISSING_ID)
            return column.to_numpy(zero_copy_only=False)
        if pa.types.is_dictionary(kind) and pa.types.is_integer(kind.value_type):
            return self._ids(column.dictionary_decode(), name, where)
        if _is_text(kind) or (pa.types.is_dictionary(kind) and _is_text(kind.value_type)):
            return _text_column_ids(column, self.text_ids)
        return _bad_type(where, name, kind, "integer ids or text (a categorical feature)")

    def _list(self, column, feature, where):
        """(ids int64 (N,), lengths (B,)) of a list column (or of text split by the separator)."""
        pa, pc = _pa()
        column = _combined(column)
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            column = pc.split_pattern(pc.fill_null(column, ""), feature.separator)
            kind = column.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            _bad_type(where, feature.column, kind, f"lists of ids (list feature {feature.name!r}), "
                                                   f"or text split by {feature.separator!r}")
        item = kind.value_type
        if pa.types.is_integer(item) and not column.null_count and not column.flatten().null_count:
            # the common case, no missing list or id: values and lengths straight from the offsets
            offsets = column.offsets.to_numpy(zero_copy_only=False)
            ids = column.flatten()
            if item != pa.int64():
                ids = pc.cast(ids, pa.int64())
            return (np.ascontiguousarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64),
                    np.diff(offsets).astype(np.int32))
        # drop missing and empty elements ("" between separators or of an empty cell)
        flat_rows = pc.list_parent_indices(column)
        values = pc.list_flatten(column)
        keep = pc.is_valid(values)
        if pa.types.is_string(item) or pa.types.is_large_string(item):
            keep = pc.and_(keep, pc.not_equal(pc.fill_null(values, ""), ""))
        elif not pa.types.is_integer(item):
            _bad_type(where, feature.column, kind, f"lists of integer ids or text (list feature "
                                                   f"{feature.name!r})")
        if keep.false_count:
            values = pc.filter(values, keep)
            flat_rows = pc.filter(flat_rows, keep)
        rows = flat_rows.to_numpy(zero_copy_only=False)
        lengths = np.bincount(rows, minlength=len(column)).astype(np.int32) if len(rows) else \
            np.zeros(len(column), np.int32)
        if pa.types.is_integer(item):
            ids = pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)
        else:
            ids = _text_column_ids(values, self.text_ids)
        return np.ascontiguousarray(ids, dtype=np.int64), lengths


def _numbers(column, where, name, wanted):
    """float64 values of a number column, NaN where missing (a DataError naming the column
    for another type)."""
    pa, pc = _pa()
    column = _combined(column)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)):
        _bad_type(where, name, column.type, wanted)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.float64())
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    if column.null_count:
        values[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return values


def _combined(column):
    """One Array of a ChunkedArray (Arrow tables hold chunked columns). Dictionary chunks may
    each carry their own dictionary (a Parquet column chunk's): those are unified first."""
    pa, _ = _pa()
    if not hasattr(column, "combine_chunks"):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.unify_dictionaries()
    return column.combine_chunks()


def _is_text(kind):
    pa, _ = _pa()
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind))


def _text_column_ids(column, cache):
    """text_id of every value of a text column (string or binary, or a dictionary of them, as a
    Parquet reader gives it; missing -1), through ``cache`` (hybridps._kernels.TextIdCache:
    one probe per value, BLAKE2b only for values it has not seen). A dictionary's values are
    looked up once each, then taken by its indices."""
    pa, pc = _pa()
    if pa.types.is_dictionary(column.type):
        distinct = np.append(_text_column_ids(column.dictionary, cache), MISSING_ID)
        indices = column.indices
        if indices.null_count:
            indices = pc.fill_null(indices, len(distinct) - 1)
        return distinct[indices.to_numpy(zero_copy_only=False)]
    if len(column) == 0:
        return np.empty(0, np.int64)
    kind = column.type
    width = np.int64 if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) else np.int32
    _validity, offsets, data = column.buffers()[:3]
    offsets = np.frombuffer(offsets, dtype=width)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    ids = cache.ids(offsets.astype(np.int64), data)
    if column.null_count:          # a null's slot may hold bytes: it reads missing all the same
        ids[~column.is_valid().to_numpy(zero_copy_only=False)] = MISSING_ID
    return ids


def _bad_type(where, column, kind, wanted):
    raise DataError(f"{where}: column {column!r} has type {kind}; expected {wanted}")
