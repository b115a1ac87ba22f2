"""Reader of Parquet files described by a feature schema, through pyarrow.

Columns (hybridps.data.columns): ``list<int64>`` / ``list<string>`` for multi-hot and
sequence features, int64 or string for single-valued ones, numeric for dense, 0/1 labels; null
is missing (a single value: the id -1; a list: empty; a list element: dropped; a dense value:
the feature's ``fill``; a label: a bad row). Only the schema's columns are read. Parts are row
groups: every row group of every file goes round-robin to the ranks, and each rank reads only its
own (hybridps.data.partitioned: equal steps, epochs, shuffling, the position for resume).
Vectorized: a row group is decoded by Arrow and converted with numpy; nothing runs per row.
Single-valued text columns are read dictionary-encoded, as Parquet stores them: their ids are
computed per distinct value (hybridps.data.columns, through the reader's text id cache).
Every file's footer is read at start-up (on every rank): a file without a readable footer, or
whose columns have types the schema cannot read (a ``list<string>`` column for a single-valued
feature, ...), is an error naming the file and the column, or, with ``on_bad_line=skip``, left
out of the shares on every rank alike and counted.
"""
from hybridps.data.partitioned import PartitionedReader
from hybridps.errors import DataError


class ParquetReader(PartitionedReader):
    """This rank's row groups of Parquet files (see the module docstring and PartitionedReader)."""

    kind = "parquet"
    part_name = "row group"

    def _list_units(self):
        import pyarrow as pa
        import pyarrow.parquet as pq
        units, self._files = [], {}
        for path in self.paths:
            try:
                schema = pq.read_schema(path, memory_map=True)
            except (pa.ArrowInvalid, OSError) as exc:
                self._unreadable_file(path, f"not a readable Parquet file ({exc})")
                continue
            try:
                self.converter.check_columns(schema.names, path)
                self.converter.check_types(schema, path)
            except DataError as exc:
                self._unreadable_file(path, str(exc)[len(path) + 2:])
                continue
            # text columns of one id per row come as the dictionaries they are stored in (the
            # integer ones are read as they are), so no string is decoded per row
            text = [c for c in self.converter.single_value_columns()
                    if pa.types.is_string(schema.field(c).type) or pa.types.is_binary(schema.field(c).type)]
            try:
                # mapped, not read into buffers: Arrow decodes pages straight from the page cache
                handle = pq.ParquetFile(path, memory_map=True, read_dictionary=text)
            except (pa.ArrowInvalid, OSError) as exc:
                self._unreadable_file(path, f"not a readable Parquet file ({exc})")
                continue
            self._files[path] = handle
            meta = handle.metadata
            units += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        return units

    def _read_unit(self, unit):
        path, group, _ = unit
        # one thread: a rank has one core (the TF step needs it); Arrow's pool would compete
        return self._files[path].read_row_group(group, columns=self.converter.required_columns(),
                                                use_threads=False)
