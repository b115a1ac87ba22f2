"""FeatureSchema: a run's features and embedding tables, the one source of every shape.

What lives here: the dense features (name, column, transform), the sparse features (name,
column, table, pooling, max_len, separator, key space), the tables (name, dim, sparse optimizer
and its hyper-parameters, initializer, admission and eviction), their validation with errors
that name the feature, table or field, the Criteo preset used when a config has no
``features:`` (today's layouts: one shared table, one table per field, or explicit field
groups, with ``table_settings``), and the JSON form stored in checkpoints and exports. What
does not: reading data (hybridps.data), the exchange (hybridps.sparse), the TF step
(hybridps.step) and the models (hybridps.models), which all take their shapes from here.

Feature kinds. A sparse feature without ``pooling`` is *single-valued*: one id per sample.
``pooling: sum | mean | sqrtn`` makes it *multi-hot*: a list of ids pooled into one vector of
its table's dim (an empty list pools to zeros). ``pooling: none`` makes it a *sequence* of at
most ``max_len`` vectors (longer lists are truncated to their first ``max_len`` ids, as the data
gives them, and counted). Features that name the same table share its rows: a key space (the
table's name unless the feature sets ``key_space:``) decides which values are the same row.

YAML (under the top-level ``features:`` key of the ``--config`` file)::

    features:
      label: label
      group_by: user
      dense: [{name: hour}, {name: user_activity, transform: log1p}]
      sparse:
        - {name: user, table: user}
        - {name: genres, table: genre, pooling: mean, separator: "|"}
        - {name: history, table: movie, pooling: none, max_len: 20, separator: "|"}
        - {name: movie, table: movie}
      tables:
        user: {dim: 16}
        movie: {dim: 32, optimizer: adagrad, learning_rate: 0.05}
        genre: {dim: 8, min_count: 2}

Several objectives: ``labels:`` instead of ``label:`` lists the tasks (hybridps.tasks.Task:
``{name: watch_time, column: dwell, kind: regression, loss: huber, delta: 30, loss_weight:
0.1}``; docs/multitask.md); ``weight:`` names an optional column of per-row loss weights.

A table's unset settings take the run's global ones (``dim``, ``optimizer``, ``learning_rate``,
``initializer``, ``init_std``, ``min_count``, ``ttl_steps``, ``max_rows``, ``eviction``).

Bounds: ``dim`` 1..4096, ``max_len`` 1..10000, the Criteo preset's ``num_fields`` 1..10000 and
``num_dense`` 0..10000 (``MAX_DIM``, ``MAX_LEN``, ``MAX_FIELDS``); a value beyond them is a
ConfigError naming the field, the value and the bound, not an out-of-memory error later.
"""
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from hybridps.errors import ConfigError
from hybridps.schema_checks import check_name, is_int, is_number, no_unknown
from hybridps.tasks import Task, parse_tasks

POOLINGS = ("sum", "mean", "sqrtn", "none")
TRANSFORMS = ("none", "log1p")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
INITIALIZERS = ("normal", "uniform", "zeros")
EVICTIONS = ("lfu", "lru")
# Settings a table may set for itself; the rest of its row comes from the run's config.
TABLE_FIELDS = ("dim", "optimizer", "learning_rate", "initializer", "init_std", "min_count",
                "ttl_steps", "max_rows", "eviction")
TABLE_POLICY_FIELDS = ("min_count", "ttl_steps", "max_rows", "eviction")
CRITEO_NUM_FIELDS, CRITEO_NUM_DENSE = 26, 13
# How a sparse feature's values become keys: "int" (hybridps.data.hashing.feature_keys: the
# readers and the SavedModel hash raw ids by the feature's key space) or "prehashed" (the
# Criteo preset: its readers produce the keys, serving takes keys).
KEY_HASHES = ("int", "prehashed")
# How the exported SavedModel takes a sparse feature's values: "string" (text, hashed in the
# graph as the readers hash it; integers as their decimal text) or "int64" (integer ids).
VALUE_DTYPES = ("string", "int64")
# Upper bounds of the sizes a schema sets, checked with a message naming the field: beyond
# them a typo (dim 1e9) would end as an out-of-memory error inside TensorFlow or the tables.
MAX_DIM = 4096           # an embedding row's width (production models use 8..512)
MAX_LEN = 10000          # a sequence's longest list of ids (each id one row per sample)
MAX_FIELDS = 10000       # the Criteo preset's num_fields and num_dense
_RESERVED = ("dense", "label")


@dataclass(frozen=True)
class DenseFeature:
    """A float input column: ``transform`` none, or log1p (``log1p(max(x, 0))``); an empty
    value reads ``fill``."""
    name: str
    column: str
    transform: str = "none"
    fill: float = 0.0


@dataclass(frozen=True)
class SparseFeature:
    """A categorical input: single-valued (``pooling`` None), multi-hot (sum/mean/sqrtn) or a
    sequence (``pooling`` "none", at most ``max_len`` ids). ``dtype`` (VALUE_DTYPES) is how the
    exported SavedModel takes its values: text or integer ids (training reads either)."""
    name: str
    column: str
    table: str
    pooling: Optional[str] = None
    max_len: Optional[int] = None
    separator: str = "|"
    key_space: str = ""
    hash: str = "int"
    dtype: str = "string"

    @property
    def is_list(self):
        return self.pooling is not None

    @property
    def is_sequence(self):
        return self.pooling == "none"

    @property
    def kind(self):
        return "single" if self.pooling is None else ("sequence" if self.is_sequence else "pooled")


@dataclass(frozen=True)
class TableConfig:
    """One embedding table: its dim, sparse optimizer, initializer, admission and eviction."""
    name: str
    dim: int
    optimizer: str
    learning_rate: float
    initializer: str
    init_std: float
    min_count: int
    ttl_steps: int
    max_rows: int
    eviction: str

    def policy(self):
        """min_count, ttl_steps, max_rows and eviction (metrics and manifests show these)."""
        return {name: getattr(self, name) for name in TABLE_POLICY_FIELDS}


@dataclass(frozen=True)
class FeatureSchema:
    """Dense features, sparse features and tables of a run (see the module docstring).

    ``preset`` is "criteo" for the layout built when no ``features:`` is given, else None.
    ``field_groups`` (Criteo preset only) are the field indices of each table, in table order,
    as earlier hybridps recorded them in checkpoints. ``labels``: the tasks of a ``labels:`` list (batches then hold labels (B, T), NaN where
    missing; ``label`` is the first task's column), empty for one ``label``; ``weight``: the
    column of row weights."""
    label: str
    dense: Tuple[DenseFeature, ...]
    sparse: Tuple[SparseFeature, ...]
    tables: Tuple[TableConfig, ...]
    group_by: Optional[str] = None
    preset: Optional[str] = None
    field_groups: Optional[Tuple[Tuple[int, ...], ...]] = None
    labels: Tuple[Task, ...] = ()
    weight: Optional[str] = None

    # ------------------------------------------------------------------ queries
    @property
    def tasks(self):
        """The ``labels:`` tasks, else one binary task named ``label`` on the ``label`` column."""
        return self.labels or (Task(name="label", column=self.label),)

    @property
    def task_names(self):
        return tuple(t.name for t in self.tasks)

    @property
    def num_dense(self):
        return len(self.dense)

    @property
    def single_features(self):
        """Single-valued sparse features, in schema order (the columns of ``Batch.keys``)."""
        return tuple(f for f in self.sparse if not f.is_list)

    @property
    def list_features(self):
        """Multi-hot and sequence features, in schema order (``Batch.lists``)."""
        return tuple(f for f in self.sparse if f.is_list)

    @property
    def table_names(self):
        return tuple(t.name for t in self.tables)

    def table_index(self, name):
        for index, table in enumerate(self.tables):
            if table.name == name:
                return index
        raise ConfigError(f"feature schema: no table named {name!r}; tables: {list(self.table_names)}")

    def table_of(self, feature):
        """The TableConfig a sparse feature (or its name) reads."""
        if isinstance(feature, str):
            feature = self.feature(feature)
        return self.tables[self.table_index(feature.table)]

    def feature(self, name):
        for f in self.sparse:
            if f.name == name:
                return f
        raise ConfigError(f"feature schema: no sparse feature named {name!r}; sparse features: "
                          f"{[f.name for f in self.sparse]}")

    def features_of_table(self, table_index):
        """The sparse features that read table ``table_index``, in schema order."""
        name = self.tables[table_index].name
        return tuple(f for f in self.sparse if f.table == name)

    @property
    def dims(self):
        return tuple(t.dim for t in self.tables)

    # ------------------------------------------------------------------ JSON form
    def to_dict(self):
        """JSON-able description (checkpoint manifests, exports); :func:`schema_from_dict` reads it."""
        out = {"label": self.label, "group_by": self.group_by, "preset": self.preset,
               "field_groups": [list(g) for g in self.field_groups] if self.field_groups else None,
               "dense": [dataclasses.asdict(f) for f in self.dense],
               "sparse": [dataclasses.asdict(f) for f in self.sparse],
               "tables": [dataclasses.asdict(t) for t in self.tables]}
        if self.labels:          # absent from schemas of one label (and from older manifests)
            out["labels"] = [dataclasses.asdict(t) for t in self.labels]
        if self.weight:
            out["weight"] = self.weight
        return out

    def signature(self):
        """What a checkpoint must share with the schema of the run that restores it: features
        with their tables, kinds and lengths, and tables with their dims and optimizers (not
        learning rates or eviction settings, which may change between runs)."""
        if self.preset == "criteo":    # the form earlier hybridps recorded (field groups)
            return {"field_groups": [list(g) for g in self.field_groups],
                    "tables": [{"dim": t.dim, "optimizer": t.optimizer} for t in self.tables]}
        out = {"dense": [f.name for f in self.dense],
               "sparse": [{"name": f.name, "table": f.table, "pooling": f.pooling,
                           "max_len": f.max_len, "key_space": f.key_space} for f in self.sparse],
               "tables": [{"name": t.name, "dim": t.dim, "optimizer": t.optimizer}
                          for t in self.tables]}
        if self.labels:          # the model's outputs are one per task
            out["tasks"] = [{"name": t.name, "kind": t.kind} for t in self.labels]
        return out


def schema_from_dict(data):
    """The FeatureSchema of :meth:`FeatureSchema.to_dict` (no validation beyond the types; a
    description without ``labels``, as every manifest written before them, is one binary task)."""
    groups = data.get("field_groups")
    return FeatureSchema(
        label=data["label"], group_by=data.get("group_by"), preset=data.get("preset"),
        field_groups=tuple(tuple(g) for g in groups) if groups else None,
        labels=tuple(Task(**t) for t in data.get("labels") or ()), weight=data.get("weight"),
        dense=tuple(DenseFeature(**f) for f in data["dense"]),
        sparse=tuple(SparseFeature(**f) for f in data["sparse"]),
        tables=tuple(TableConfig(**t) for t in data["tables"]))


# ---------------------------------------------------------------------------- building
def build_schema(config, num_fields=None, num_dense=None):
    """The run's FeatureSchema: from ``config.features`` (the YAML ``features:`` mapping), or
    the Criteo preset with ``num_fields`` / ``num_dense`` (default the config's).

    Raises:
        ConfigError: naming the feature, table or field that is wrong and what is allowed.
    """
    if config.features is not None:
        for old in ("table_layout", "table_groups", "table_settings"):
            default = {"table_layout": "shared"}.get(old)
            if getattr(config, old) != default:
                raise ConfigError(
                    f"config field '{old}' describes the Criteo preset's tables; with a "
                    f"'features:' schema, give each table its own settings under "
                    f"features.tables.<name> (e.g. tables: {{user: {{dim: 16, min_count: 2}}}})")
        return parse_features(config.features, config)
    return criteo_preset(config, num_fields if num_fields is not None else config.num_fields,
                         num_dense if num_dense is not None else config.num_dense)


def _table(config, name, own, where=None):
    values = {field: own.get(field, getattr(config, field)) for field in TABLE_FIELDS}
    table = TableConfig(name=name, **values)
    _check_table(table, where or f"features.tables.{name}", own)
    return table


def _check_table(table, where, own=()):
    def check(ok, field, allowed):
        if not ok:
            # a setting the table leaves out is the run's global field of that name
            named = (f"'{where}.{field}'" if field in own
                     else f"'{field}' (the run's setting, which table {table.name!r} takes)")
            raise ConfigError(f"config field {named}: {getattr(table, field)!r} is "
                              f"invalid; allowed: {allowed}")
    check(is_int(table.dim) and 1 <= table.dim <= MAX_DIM, "dim",
          f"an integer from 1 to {MAX_DIM} (the widest embedding row hybridps accepts)")
    check(table.optimizer in SPARSE_OPTIMIZERS, "optimizer", ", ".join(SPARSE_OPTIMIZERS))
    check(is_number(table.learning_rate) and table.learning_rate > 0, "learning_rate", "a number > 0")
    check(table.initializer in INITIALIZERS, "initializer", ", ".join(INITIALIZERS))
    check(is_number(table.init_std) and table.init_std >= 0, "init_std", "a number >= 0")
    check(is_int(table.min_count) and table.min_count >= 1, "min_count", "an integer >= 1")
    check(is_int(table.ttl_steps) and table.ttl_steps >= 0, "ttl_steps", "an integer >= 0 (0 = never)")
    check(is_int(table.max_rows) and table.max_rows >= 0, "max_rows", "an integer >= 0 (0 = unlimited)")
    check(table.eviction in EVICTIONS, "eviction", ", ".join(EVICTIONS))


def criteo_field_groups(config, num_fields):
    """Field indices of each table: ``table_groups``, else ``table_layout`` (shared, per_field)."""
    if config.table_groups is not None:
        groups = [list(g) for g in config.table_groups]
        flat = sorted(f for g in groups for f in g)
        if flat != list(range(num_fields)):
            raise ConfigError(f"config field 'table_groups': {config.table_groups!r} is invalid; "
                              f"allowed: groups that together list every field 0..{num_fields - 1} "
                              f"exactly once")
        return groups
    if config.table_layout == "per_field":
        return [[f] for f in range(num_fields)]
    return [list(range(num_fields))]


def criteo_table_names(config, num_fields):
    """The names of the Criteo preset's tables, in table order: ``criteo`` (one shared table),
    ``C1``.. (one per field, named by the field), or ``group0``.. (``table_groups``)."""
    return _criteo_names(config, criteo_field_groups(config, num_fields))


def criteo_table_settings(config, num_fields):
    """``config.table_settings`` keyed by the Criteo preset's table names (a key may be a
    table's name, or its index in table order: the older form)."""
    names = criteo_table_names(config, num_fields)
    return {name: own for name, (_, own) in _settings_of_tables(config, names).items()}


def _settings_of_tables(config, names):
    """{table name: (the key the config used for it, its settings)}.

    Raises:
        ConfigError: an index beyond the tables, a name that is not a table (naming the
            tables), or one table given twice.
    """
    where = f"(table_layout={config.table_layout}, table_groups={config.table_groups})"
    settings = {}
    for key, own in (config.table_settings or {}).items():
        if isinstance(key, int):
            if not 0 <= key < len(names):
                raise ConfigError(f"config field 'table_settings': table(s) [{key}] do not exist: "
                                  f"this layout has {len(names)} table(s), indices 0..{len(names) - 1} "
                                  f"{where}; its tables are {', '.join(names)}")
            name = names[key]
        elif key in names:
            name = key
        else:
            raise ConfigError(f"config field 'table_settings': {key!r} is not a table of this layout "
                              f"{where}; its tables are {', '.join(names)}")
        if name in settings:
            raise ConfigError(f"config field 'table_settings': table {name!r} is given twice "
                              f"(by its index {names.index(name)} and by its name)")
        settings[name] = (key, own)
    return settings


def _criteo_names(config, groups):
    if len(groups) == 1:
        return ["criteo"]
    if config.table_groups is None:
        return [f"C{g[0] + 1}" for g in groups]
    return [f"group{t}" for t in range(len(groups))]


def criteo_preset(config, num_fields=CRITEO_NUM_FIELDS, num_dense=CRITEO_NUM_DENSE):
    """The Criteo layout: dense I1..I<num_dense>, single-valued C1..C<num_fields> in tables as
    ``table_layout`` / ``table_groups`` say, each field its own key space (its 0-based index,
    so fields sharing a table never share a row), ``table_settings`` for per-table admission
    and eviction (by table name: :func:`criteo_table_names`)."""
    if not is_int(num_fields) or not 1 <= num_fields <= MAX_FIELDS:
        raise ConfigError(f"config field 'num_fields': {num_fields!r} is invalid; allowed: an "
                          f"integer from 1 to {MAX_FIELDS}")
    if not is_int(num_dense) or not 0 <= num_dense <= MAX_FIELDS:
        raise ConfigError(f"config field 'num_dense': {num_dense!r} is invalid; allowed: an "
                          f"integer from 0 to {MAX_FIELDS}")
    groups = criteo_field_groups(config, num_fields)
    names = _criteo_names(config, groups)
    settings = _settings_of_tables(config, names)
    tables = tuple(_table(config, name, dict(settings[name][1]) if name in settings else {},
                          where=f"table_settings.{settings[name][0] if name in settings else name}")
                   for name in names)
    table_of_field = {f: names[t] for t, g in enumerate(groups) for f in g}
    sparse = tuple(SparseFeature(name=f"C{f + 1}", column=f"C{f + 1}", table=table_of_field[f],
                                 key_space=str(f), hash="prehashed") for f in range(num_fields))
    dense = tuple(DenseFeature(name=f"I{i + 1}", column=f"I{i + 1}", transform="log1p")
                  for i in range(num_dense))
    return FeatureSchema(label="label", dense=dense, sparse=sparse, tables=tables,
                         preset="criteo", field_groups=tuple(tuple(g) for g in groups))


# ---------------------------------------------------------------------------- YAML
_TOP_KEYS = ("label", "labels", "weight", "group_by", "dense", "sparse", "tables")
_DENSE_KEYS = ("name", "column", "transform", "fill")
_SPARSE_KEYS = ("name", "column", "table", "pooling", "max_len", "separator", "key_space",
                "dtype")


def parse_features(data, config):
    """A validated FeatureSchema from the ``features:`` mapping of a YAML config."""
    if not isinstance(data, dict):
        raise ConfigError(f"'features' must be a mapping with {', '.join(_TOP_KEYS)}; got {data!r}")
    no_unknown(data, _TOP_KEYS, "features")
    labels = parse_tasks(data)
    label = labels[0].column if labels else data.get("label", "label")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"features.label: expected the label column's name, got {label!r}")
    weight = data.get("weight")
    if weight is not None and (not isinstance(weight, str) or not weight):
        raise ConfigError(f"features.weight: expected the name of the column of row weights, "
                          f"got {weight!r}")
    tables_in = data.get("tables") or {}
    if not isinstance(tables_in, dict) or not tables_in:
        raise ConfigError("features.tables: expected a mapping of table name to settings, e.g. "
                          "tables: {user: {dim: 16}}")
    tables = []
    for name, own in tables_in.items():
        name = str(name)
        _check_feature_name(name, "features.tables", "table")
        own = own or {}
        if not isinstance(own, dict):
            raise ConfigError(f"features.tables.{name}: expected a mapping of "
                              f"{', '.join(TABLE_FIELDS)}, got {own!r}")
        no_unknown(own, TABLE_FIELDS, f"features.tables.{name}")
        tables.append(_table(config, name, own))
    dense = tuple(_dense_feature(item, i) for i, item in enumerate(_list(data, "dense")))
    sparse_items = _list(data, "sparse")
    if not sparse_items:
        raise ConfigError("features.sparse: a schema needs at least one sparse feature")
    table_names = [t.name for t in tables]
    sparse = tuple(_sparse_feature(item, i, table_names) for i, item in enumerate(sparse_items))
    names = [f.name for f in dense] + [f.name for f in sparse]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"features: the name {name!r} is used by more than one feature; "
                              f"feature names must be unique")
    for f in sparse:
        if f.is_sequence and f"{f.name}_length" in names:
            raise ConfigError(f"features.sparse: {f.name!r} is a sequence, so the model input "
                              f"{f.name}_length holds its lengths; rename the feature "
                              f"{f.name}_length")
    unused = [t for t in table_names if not any(f.table == t for f in sparse)]
    if unused:
        raise ConfigError(f"features.tables: table(s) {unused} are read by no sparse feature; "
                          f"remove them or name them in a feature's 'table:'")
    group_by = data.get("group_by")
    if group_by is not None and not isinstance(group_by, str):
        raise ConfigError(f"features.group_by: expected a column name, got {group_by!r}")
    return FeatureSchema(label=label, dense=dense, sparse=sparse, tables=tuple(tables),
                         group_by=group_by, labels=labels, weight=weight)


def _list(data, key):
    items = data.get(key) or []
    if not isinstance(items, list):
        raise ConfigError(f"features.{key}: expected a list of features, got {items!r}")
    return items


def _check_feature_name(name, where, what):
    check_name(name, where, what)
    if what == "feature" and name in _RESERVED:
        raise ConfigError(f"{where}: {name!r} is reserved (the model's inputs['dense'] holds the "
                          f"dense features, 'label' the labels); rename the feature")


def _dense_feature(item, index):
    where = f"features.dense[{index}]"
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: expected {{name: ..., transform: none|log1p}}, got {item!r}")
    no_unknown(item, _DENSE_KEYS, f"{where} ({item.get('name')})")
    name = item["name"]
    _check_feature_name(name, where, "feature")
    transform = item.get("transform", "none")
    if transform not in TRANSFORMS:
        raise ConfigError(f"features.dense.{name}.transform: {transform!r} is not one of "
                          f"{', '.join(TRANSFORMS)}")
    fill = item.get("fill", 0.0)
    if not is_number(fill):
        raise ConfigError(f"features.dense.{name}.fill: expected a number, got {fill!r}")
    return DenseFeature(name=name, column=str(item.get("column", name)), transform=transform,
                        fill=float(fill))


def _sparse_feature(item, index, table_names):
    where = f"features.sparse[{index}]"
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: expected {{name: ..., table: ...}}, got {item!r}")
    name = item["name"]
    _check_feature_name(name, where, "feature")
    where = f"features.sparse.{name}"
    no_unknown(item, _SPARSE_KEYS, where)
    table = item.get("table")
    if table is None:
        raise ConfigError(f"{where}: 'table' is missing; name one of the tables {table_names}")
    if str(table) not in table_names:
        raise ConfigError(f"{where}.table: {table!r} is not a table of features.tables "
                          f"({', '.join(table_names)}); add it there or fix the name")
    pooling = item.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"{where}.pooling: {pooling!r} is not one of {', '.join(POOLINGS)} "
                          f"(leave it out for a single-valued feature)")
    max_len = item.get("max_len")
    if pooling == "none" and max_len is None:
        raise ConfigError(f"{where}: a sequence (pooling: none) needs max_len, the longest "
                          f"sequence the model sees (longer lists are truncated)")
    if max_len is not None:
        if pooling is None:
            raise ConfigError(f"{where}.max_len: only list features (with pooling) have a "
                              f"max_len; a single-valued feature has one id per sample")
        if not is_int(max_len) or not 1 <= max_len <= MAX_LEN:
            raise ConfigError(f"{where}.max_len: {max_len!r} is invalid; allowed: an integer from "
                              f"1 to {MAX_LEN} (the longest sequence hybridps accepts)")
    separator = item.get("separator", "|")
    if not isinstance(separator, str) or not separator:
        raise ConfigError(f"{where}.separator: expected a non-empty string, got {separator!r}")
    key_space = item.get("key_space", table)
    if not isinstance(key_space, str) or not key_space:
        raise ConfigError(f"{where}.key_space: expected a non-empty string, got {key_space!r}")
    dtype = item.get("dtype", "string")
    if dtype not in VALUE_DTYPES:
        raise ConfigError(f"{where}.dtype: {dtype!r} is not one of {', '.join(VALUE_DTYPES)} (how the "
                          f"exported SavedModel takes the values: text, or integer ids)")
    return SparseFeature(name=name, column=str(item.get("column", name)), table=str(table),
                         pooling=pooling, max_len=max_len, separator=separator,
                         key_space=key_space, dtype=dtype)
