"""Typed training configuration: the settings groups of a run, YAML loading, validation, hashing.

What lives here: every knob of a training run, declared once as a field of a settings group
(:class:`RunSettings`, :class:`ModelSettings`, ...) with its default, help text, flag, allowed
values and role (hybridps.settings.setting); :class:`TrainConfig`, the flat dataclass made of
those groups; and the one place that reads ``HYBRIDPS_*`` environment variables (testing aids
aside: hybridps.testing_hooks). A YAML file gives the base values, CLI flags (generated from
the fields) override them; :func:`validate` raises a ConfigError naming the field, the bad
value and what is allowed. :func:`config_hash` is compared across ranks at start-up so a job
whose ranks disagree (a stale YAML on one node) stops before training. What does not: parsing
of argv (hybridps.cli, hybridps.settings) and anything that acts on the values.

Adding a setting: declare it in its group with ``setting(default, "help", ...)``; the flag,
the YAML key, the type conversion and the reference page (``make docs-reference``) follow.
Range checks that the type and ``choices`` do not express go in :func:`validate`.
"""
import dataclasses
import enum
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hybridps.errors import ConfigError
from hybridps.models.registry import check_model_spec
from hybridps.settings import coerce, load_yaml, setting, unknown_fields_error


class Sync(str, enum.Enum):
    """Consistency of embedding reads (docs/design.md, Consistency)."""
    BSP = "bsp"   # reads see every update of all earlier steps (staleness 0)
    SSP = "ssp"   # reads see every update from steps <= t - staleness - 1
    ASP = "asp"   # reads never wait for updates to land


class Mode(str, enum.Enum):
    """Where sparse and dense parameters live."""
    COLLECTIVE = "collective"   # sharded over all ranks, alltoallv + Horovod allreduce
    PS = "ps"                   # parameter servers (comparison mode)


SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
INITIALIZERS = ("normal", "uniform", "zeros")
TABLE_LAYOUTS = ("shared", "per_field")
NONFINITE = ("raise", "skip")             # what a table does with a NaN/Inf row gradient
ON_BAD_LINE = ("raise", "skip")
EVICTIONS = ("lfu", "lru")
# The admission and eviction fields a table may set for itself (``table_settings``).
TABLE_POLICY_FIELDS = ("min_count", "ttl_steps", "max_rows", "eviction")


def _table_settings(value):
    return _coerce_table_settings(value)       # defined below, with the rest of the coercion


@dataclass
class RunSettings:
    """What to train on which data, for how long."""
    TITLE = "Run"
    model: str = setting("deepfm", "a built-in model (deepfm, wide_deep, dcn, din) or your own build "
                                   "function: path/to/file.py:build or package.module:build")
    data: str = setting("synthetic", "'synthetic' (built-in generator), 'sample' (the bundled Criteo "
                                     "sample), a Criteo TSV/CSV path, or, with a 'features:' schema in "
                                     "--config, CSV/TSV, Parquet or TFRecord files of those columns, or a "
                                     "stream: stream:DIR, redis://HOST:PORT/STREAM")
    features: Optional[Dict[str, Any]] = setting(
        None, "the feature schema (docs/features.md); none: the Criteo preset", flag=False,
        expected="a mapping (label, dense, sparse, tables)")
    steps: int = setting(100, "steps to train; 0: until the stream ends or SIGTERM")
    batch_size: int = setting(512, "samples per rank per step")
    seed: int = setting(0, "weights, initial rows and synthetic data derive from it")


@dataclass
class ModelSettings:
    """The model's shape: the embedding width, the MLP, DCN's cross layers, MMoE's experts."""
    TITLE = "Model"
    dim: int = setting(16, "embedding dimension")
    hidden: List[int] = setting([256, 128], "MLP sizes, comma-separated, e.g. 256,128", metavar="N,N",
                                expected="a list of integers")
    cross_layers: int = setting(3, "DCN: cross layers")
    num_experts: int = setting(4, "MMoE: experts shared by the tasks")
    expert_units: List[int] = setting([128], "MMoE: each expert's MLP sizes, comma-separated",
                                      metavar="N,N", expected="a list of integers")


@dataclass
class SparseSettings:
    """The embedding tables of the Criteo preset, and every table's defaults (a 'features:'
    schema sets its tables' own under features.tables.<name>)."""
    TITLE = "Sparse embeddings"
    table_layout: str = setting("shared", "shared: all fields in one table; per_field: one each",
                                choices=TABLE_LAYOUTS)
    table_groups: Optional[List[List[int]]] = setting(
        None, "explicit field groups, one table each, overrides table_layout", flag=False,
        expected="a list of lists of field indices, e.g. [[0, 1, 2], [3]]")
    table_settings: Optional[Dict[str, Dict[str, Any]]] = setting(
        None, "per-table min_count/ttl_steps/max_rows/eviction by table name (criteo; C1, C2, ... "
              "with table_layout per_field; group0, group1, ... with table_groups), as JSON on the "
              "command line, e.g. '{\"C1\": {\"max_rows\": 100000, \"eviction\": \"lru\"}}' (tables "
              "not named use the global flags)", metavar="JSON", parse=_table_settings)
    optimizer: str = setting("adagrad", "sparse (embedding) optimizer", choices=SPARSE_OPTIMIZERS)
    learning_rate: float = setting(0.05, "sparse optimizer learning rate")
    adam_catch_up: bool = setting(False, "adam tables: when a row is updated again, first apply "
                                         "the steps it skipped (moment decay and the moves Keras's "
                                         "dense Adam makes with a zero gradient), with Keras's bias "
                                         "correction by the global step; off: lazy Adam (only rows "
                                         "in the batch move)")
    initializer: str = setting("normal", "key-seeded rows: normal, uniform(+-init_std), zeros",
                               choices=INITIALIZERS)
    init_std: float = setting(0.01, "scale of the initializer")
    min_count: int = setting(1, "feature admission threshold (hits)")
    ttl_steps: int = setting(0, "evict rows not updated for this many steps (0: never)")
    max_rows: int = setting(0, "per table and rank: evict down to this many rows (0: unlimited)")
    eviction: str = setting("lfu", "policy for --max-rows", choices=EVICTIONS)
    nonfinite: str = setting("raise", "a NaN/Inf embedding gradient: stop with an error (raise, "
                                      "default) or skip that row's update and count it (skip)",
                             choices=NONFINITE)


@dataclass
class DenseSettings:
    """The dense parameters' optimizer (default: Adam at 0.001; docs/benchmarks.md, "Accuracy
    on public data", has the measurements behind it)."""
    TITLE = "Dense parameters"
    dense_optimizer: Optional[str] = setting("adam", "the MLP's optimizer; none (YAML null): the "
                                                     "sparse optimizer (adam for ftrl)",
                                             choices=DENSE_OPTIMIZERS)
    dense_learning_rate: Optional[float] = setting(0.001, "the dense optimizer's rate (set it with "
                                                          "dense_optimizer); none: learning_rate")


@dataclass
class DataSettings:
    """Reading the data, and the synthetic generator and Criteo preset's sizes."""
    TITLE = "Data"
    on_bad_line: str = setting("raise", "a bad line or part: stop naming it (raise), or skip and count",
                               choices=ON_BAD_LINE)
    shuffle: bool = setting(False, "Parquet/TFRecord: shuffle parts and rows every epoch (seeded by "
                                   "--seed)")
    shuffle_buffer: int = setting(0, "rows in the shuffle buffer (with --shuffle; 0 or 1: within a "
                                     "part only)")
    data_cache: Optional[str] = setting(
        None, "Parquet/TFRecord: keep every part's parsed rows in DIR and read them from there in "
              "later epochs and runs (hybridps prepare-data fills it)", metavar="DIR", output=True)
    num_fields: int = setting(26, "synthetic data: categorical fields")
    num_dense: int = setting(13, "synthetic data: dense features")
    vocab_size: int = setting(100_000, "synthetic data: ids per field")
    zipf_a: float = setting(1.2, "synthetic data: Zipf exponent of the ids (smaller spreads them wider)")
    list_mean_length: float = setting(10.0, "synthetic data: mean length of list features")
    list_max_length: int = setting(50, "synthetic data: longest list (lists without max_len)")


@dataclass
class ConsistencySettings:
    """Where parameters live and how fresh the embedding reads are (docs/consistency.md)."""
    TITLE = "Consistency"
    sync: Sync = setting(Sync.BSP, "bsp; ssp (needs staleness S >= 1, given explicitly); asp")
    staleness: int = setting(0, "SSP bound in steps")
    mode: Mode = setting(Mode.COLLECTIVE, "collective, or ps: the last num_servers ranks are servers")
    num_servers: int = setting(1, "ps mode: how many of the last ranks are servers")
    max_inflight: int = setting(4, "SSP/ASP: bounded prefetch / push depth")
    dense_staleness: int = setting(0, "SSP: a TF step may miss the dense updates of this many latest "
                                      "steps")


@dataclass
class EvaluationSettings:
    """Held-out evaluation during training (collective mode)."""
    TITLE = "Evaluation"
    eval_data: Optional[str] = setting(None, "held-out data to evaluate on during training "
                                             "(collective mode): a file spec like --data, or "
                                             "'synthetic'", output=True)
    eval_every: int = setting(0, "steps between evaluations (0: only at the end)", output=True)
    eval_batches: int = setting(10, "batches per rank of synthetic held-out data", output=True)


@dataclass
class CheckpointSettings:
    """Checkpoints, resuming, and delta exports for serving."""
    TITLE = "Checkpoints and export"
    checkpoint_dir: Optional[str] = setting(None, "write sharded checkpoints here (atomic; keeps the "
                                                  "last K)", output=True)
    checkpoint_every: int = setting(0, "steps between checkpoints (0: only at the end)", output=True)
    checkpoint_every_seconds: float = setting(
        0.0, "also checkpoint when this many seconds have passed since the last (bounds the work an "
             "unattended run loses in a restart; 0: off)", output=True)
    keep_checkpoints: int = setting(3, "how many checkpoints to keep", output=True)
    resume: bool = setting(False, "continue from the newest intact checkpoint in --checkpoint-dir "
                                  "(none there: start at step 0; only damaged ones: refuse)",
                           per_rank=True)
    resume_fresh: bool = setting(False, "with --resume: if every checkpoint is damaged, keep them "
                                        "aside as damaged-ckpt-<step> and start from step 0 instead "
                                        "of refusing", per_rank=True)
    num_buckets: int = setting(4096, "virtual buckets of each table's checkpointed rows (fixed per "
                                     "model)")
    delta_export_dir: Optional[str] = setting(None, "write the rows updated every --delta-every "
                                                    "steps here", output=True)
    delta_every: int = setting(0, "steps between deltas", output=True)
    delta_every_seconds: float = setting(0.0, "also write a delta when this many seconds have passed "
                                              "since the last (0: off)", output=True)
    full_export_every: int = setting(10, "every K-th export into --delta-export-dir, the run's first "
                                         "included, is a full export (every row + the model "
                                         "description)", output=True)


@dataclass
class StreamSettings:
    """Stream sources (stream:DIR, redis://HOST:PORT/STREAM)."""
    TITLE = "Streams"
    stream_poll_s: float = setting(0.2, "stream data: seconds between looks for new files or "
                                        "entries", output=True)
    stream_retry_seconds: float = setting(60.0, "seconds to retry a lost server or directory before "
                                                "stopping (0: stop at the first failed read)")


@dataclass
class OperationSettings:
    """What a run reports and how this machine runs it."""
    TITLE = "Operations"
    metrics_out: Optional[str] = setting(None, "write the JSON summary here (rank 0)", per_rank=True)
    warmup_steps: int = setting(5, "steps excluded from samples_per_s", output=True)
    log_every: int = setting(20, "steps between progress lines and samples/s intervals", output=True)
    auc_window: float = setting(0.5, "progressive AUC over this trailing fraction of steps",
                                output=True)
    progress: bool = setting(True, "no progress bar or periodic step lines (eval lines, warnings and "
                                   "the summary still print)", per_rank=True)
    tf_threads: int = setting(0, "TF threads; 0: HYBRIDPS_TF_THREADS or cores / ranks per node",
                              per_rank=True)
    dump_state: Optional[str] = setting(None, "write final dense weights and table shards (npz) here",
                                        per_rank=True)
    tensorboard_dir: Optional[str] = setting(None, "rank 0 writes TensorBoard scalars (loss, AUC, "
                                                   "samples/s, exchange bytes, staleness, eval) here",
                                             per_rank=True)
    watchdog_timeout: float = setting(300.0, "seconds a collective may take before the job aborts "
                                             "with a dump", per_rank=True)


@dataclass
class TrainConfig(RunSettings, ModelSettings, SparseSettings, DenseSettings, DataSettings,
                  ConsistencySettings, EvaluationSettings, CheckpointSettings, StreamSettings,
                  OperationSettings):
    """Every setting of ``hybridps train``, one flat dataclass made of the groups above (so a
    field is ``config.batch_size`` and a flat YAML key). Each field is declared once, with its
    help, flag and role (hybridps.settings.setting); the flags of ``hybridps train`` and
    docs/configuration.md are generated from those declarations."""

    @property
    def effective_dense_optimizer(self):
        return _effective_dense(vars(self))[0]

    @property
    def effective_dense_learning_rate(self):
        return _effective_dense(vars(self))[1]

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["sync"] = self.sync.value
        out["mode"] = self.mode.value
        if self.table_settings is not None:   # JSON object keys are strings
            out["table_settings"] = {str(t): dict(v) for t, v in sorted(self.table_settings.items())}
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Fields that say where a run writes, what it reports and how this machine runs it, not what
# it trains: two runs that differ only in these train the same model on the same rows. A
# resumed run's note on how its config differs from the checkpoint's leaves them out
# (:func:`training_differences`).
OUTPUT_FIELDS = frozenset(f.name for f in _FIELDS.values() if f.metadata["output"])
# Fields ranks may set differently (left out of the hash ranks compare: :func:`shared_config`).
PER_RANK_FIELDS = frozenset(f.name for f in _FIELDS.values() if f.metadata["per_rank"])


def training_differences(config, saved):
    """Sorted names of the fields whose values differ between ``config`` (a TrainConfig) and
    ``saved`` (the ``to_dict()`` of another, e.g. a checkpoint's), :data:`OUTPUT_FIELDS` left out.

    A saved config written by an older hybridps is read as it meant: a field it lacks (added
    since) had its default, a field this version no longer has is not compared, and its
    ``table_settings`` by table index are by the names of this config's tables."""
    mine = config.to_dict()
    defaults = TrainConfig().to_dict()
    theirs = {name: saved.get(name, defaults[name]) for name in mine}
    theirs["table_settings"] = _saved_table_settings(config, theirs["table_settings"])
    for values in (mine, theirs):      # a null dense optimizer or rate is the sparse one's
        values["dense_optimizer"], values["dense_learning_rate"] = _effective_dense(values)
    return sorted(k for k in set(mine) - OUTPUT_FIELDS if mine[k] != theirs[k])


DENSE_SETTINGS = ("dense_optimizer", "dense_learning_rate")


def keep_recorded_dense(config, recorded, given):
    """(config, log note or None) of a resume: a checkpoint whose ``recorded`` config left the
    dense optimizer to the sparse one (null: hybridps before dense Adam was the default) keeps
    that unless ``given`` (names set by YAML or flags) has a dense setting: same command, same run."""
    if (not recorded or recorded.get("dense_optimizer") is not None
            or set(DENSE_SETTINGS) & set(given)
            or (config.dense_optimizer, config.dense_learning_rate) == (None, recorded.get("dense_learning_rate"))):
        return config, None
    kept = dataclasses.replace(config, dense_optimizer=None,
                               dense_learning_rate=recorded.get("dense_learning_rate"))
    optimizer, rate = _effective_dense(kept.to_dict())
    return kept, (f"the checkpoint's dense layers followed the sparse optimizer ({optimizer}, "
                  f"learning rate {rate}); resuming keeps that (give --dense-optimizer and "
                  f"--dense-learning-rate to change it)")


def _effective_dense(values):
    """(dense optimizer, dense learning rate) that the fields of a config dict mean."""
    optimizer = values["dense_optimizer"] or (values["optimizer"] if values["optimizer"] in DENSE_OPTIMIZERS
                                              else "adam")
    rate = values["dense_learning_rate"]
    return optimizer, rate if rate is not None else values["learning_rate"]


def _coerce(name, value):
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming the field
    (hybridps.settings.coerce: driven by the field's annotation and metadata)."""
    return coerce(TrainConfig, _FIELDS[name], value)


def _coerce_table_settings(value):
    """{table name: {field: value}} from a YAML mapping or a JSON string (the CLI flag). A key
    that is a table index (``0``, ``"3"``: the older form) stays an int until
    :func:`make_config` turns it into the table's name."""
    example = '{"C1": {"max_rows": 100000, "eviction": "lru"}, "C4": {"min_count": 2}}'
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"config field 'table_settings': not valid JSON ({exc}); "
                              f"expected e.g. {example}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"config field 'table_settings': expected a mapping of table name to "
                          f"settings, e.g. {example}; got {value!r}")
    settings = {}
    for table, fields in value.items():
        if isinstance(table, bool) or not isinstance(table, (int, str)) or table == "":
            raise ConfigError(f"config field 'table_settings': {table!r} is not a table name")
        key = int(table) if isinstance(table, int) or table.isdigit() else table
        if not isinstance(fields, dict):
            raise ConfigError(f"config field 'table_settings': table {key}: expected a mapping "
                              f"of {', '.join(TABLE_POLICY_FIELDS)}, got {fields!r}")
        unknown = sorted(set(fields) - set(TABLE_POLICY_FIELDS))
        if unknown:
            raise ConfigError(f"config field 'table_settings': table {key}: unknown setting(s) "
                              f"{unknown}; a table may set {', '.join(TABLE_POLICY_FIELDS)}")
        if key in settings:
            raise ConfigError(f"config field 'table_settings': table {key} is given twice")
        try:
            settings[key] = {name: _coerce(name, v) for name, v in fields.items()}
        except ConfigError as exc:
            raise ConfigError(f"config field 'table_settings': table {key}: {exc}") from None
    return settings


def _by_table_name(config, warn):
    """``config.table_settings`` keyed by table name: a table index (the older form) becomes
    the Criteo preset's name of that table, with a warning (once per process) showing the new
    form when ``warn``. With a 'features:' schema there are none (build_schema refuses them)."""
    settings = config.table_settings
    indices = sorted(k for k in settings or () if isinstance(k, int))
    if not indices or config.features is not None:
        return settings
    from hybridps.schema import criteo_table_settings
    by_name = criteo_table_settings(config, config.num_fields)
    if warn and not _warned.get("table_settings"):
        _warned["table_settings"] = True
        sys.stderr.write(f"hybridps: warning: table_settings by table index "
                         f"({', '.join(map(str, indices))}) is deprecated; key the tables by name: "
                         f"table_settings: {json.dumps(by_name)}\n")
    return by_name


_warned = {}          # deprecation warnings already printed by this process


def _saved_table_settings(config, saved):
    """A saved config's ``table_settings`` (JSON keys) by the names of ``config``'s tables."""
    if not saved or config.features is not None:
        return saved
    if not any(str(k).isdigit() for k in saved):
        return saved
    from hybridps.schema import criteo_table_names
    names = criteo_table_names(config, config.num_fields)
    return {(names[int(k)] if str(k).isdigit() and int(k) < len(names) else k): v for k, v in saved.items()}


def make_config(yaml_path=None, overrides=None, warn_deprecated=True):
    """Build a validated TrainConfig from an optional YAML file and a dict of overrides.

    Args:
        yaml_path: path of a YAML mapping of field -> value, or None.
        overrides: dict of field -> value (CLI flags); None values are ignored.
        warn_deprecated: print a warning for a setting in an older form (table_settings by
            index); False for a config recorded by an older hybridps (a checkpoint's).
    Returns:
        TrainConfig.
    Raises:
        ConfigError: unknown field, wrong type or a value out of range.
    """
    values = {}
    if yaml_path:
        values.update(load_yaml(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS), key=str)
    if unknown:
        raise unknown_fields_error(TrainConfig, unknown, yaml_path)
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    config.table_settings = _by_table_name(config, warn_deprecated)
    if config.sync == Sync.SSP and "staleness" not in values:
        raise ConfigError("config field 'staleness': sync=ssp needs a staleness bound (--staleness S, "
                          "S >= 1 steps); without one it would run as BSP (staleness 0, which you "
                          "may also give explicitly)")
    return config


def _check(ok, name, value, allowed):
    if not ok:
        raise ConfigError(f"config field '{name}': {value!r} is invalid; allowed: {allowed}")


def _sparse_optimizers(c):
    """The sparse optimizers of the run's tables: the global one and any a features schema's
    tables set for themselves."""
    tables = c.features.get("tables") if isinstance(c.features, dict) else None
    own = [t.get("optimizer") for t in (tables or {}).values() if isinstance(t, dict)]
    return {c.optimizer, *[o for o in own if o]}


def validate(c):
    """Raise ConfigError for the first field whose value is out of range."""
    check_model_spec(c.model)
    _check(c.steps >= 0, "steps", c.steps, "an integer >= 0 (0: until the stream ends or SIGTERM)")
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "an integer >= 1 (per rank)")
    _check(c.staleness >= 0, "staleness", c.staleness, "an integer >= 0")
    _check(c.num_servers >= 1, "num_servers", c.num_servers, "an integer >= 1")
    _check(c.dim >= 1, "dim", c.dim, "an integer >= 1")
    _check(all(h >= 1 for h in c.hidden) and c.hidden, "hidden", c.hidden, "a non-empty list of positive ints")
    _check(c.cross_layers >= 0, "cross_layers", c.cross_layers, "an integer >= 0")
    _check(c.num_experts >= 1, "num_experts", c.num_experts, "an integer >= 1")
    _check(all(h >= 1 for h in c.expert_units) and c.expert_units, "expert_units", c.expert_units,
           "a non-empty list of positive ints")
    for f in _FIELDS.values():           # the fields with a fixed set of values (not enums)
        allowed = f.metadata["choices"]
        value = getattr(c, f.name)
        if allowed and value is not None:
            _check(value in allowed, f.name, value, ", ".join(allowed))
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "a number > 0")
    if c.adam_catch_up and "adam" not in _sparse_optimizers(c):
        raise ConfigError(f"config field 'adam_catch_up' applies to Adam tables, and no table uses "
                          f"adam (optimizer: {c.optimizer}); set --optimizer adam, or drop "
                          f"--adam-catch-up")
    _check(c.effective_dense_learning_rate > 0, "dense_learning_rate", c.dense_learning_rate, "a number > 0")
    _check(c.init_std >= 0, "init_std", c.init_std, "a number >= 0")
    _check(c.min_count >= 1, "min_count", c.min_count, "an integer >= 1")
    _check(c.shuffle_buffer >= 0, "shuffle_buffer", c.shuffle_buffer, "an integer >= 0")
    _check(c.num_fields >= 1, "num_fields", c.num_fields, "an integer >= 1")
    _check(c.num_dense >= 0, "num_dense", c.num_dense, "an integer >= 0")
    _check(c.vocab_size >= 1, "vocab_size", c.vocab_size, "an integer >= 1")
    _check(c.zipf_a > 0, "zipf_a", c.zipf_a, "a number > 0")
    _check(0 <= c.warmup_steps, "warmup_steps", c.warmup_steps, "an integer >= 0")
    _check(c.log_every >= 1, "log_every", c.log_every, "an integer >= 1")
    _check(0 < c.auc_window <= 1, "auc_window", c.auc_window, "a fraction in (0, 1]")
    _check(c.tf_threads >= 0, "tf_threads", c.tf_threads, "an integer >= 0 (0 = automatic)")
    _check(c.checkpoint_every >= 0, "checkpoint_every", c.checkpoint_every, "an integer >= 0")
    _check(c.checkpoint_every_seconds >= 0, "checkpoint_every_seconds", c.checkpoint_every_seconds,
           "seconds >= 0 (0 = off)")
    if c.checkpoint_every_seconds and not c.checkpoint_dir:
        raise ConfigError("config field 'checkpoint_every_seconds' needs checkpoint_dir (where the "
                          "checkpoints go); add --checkpoint-dir DIR")
    if c.checkpoint_every_seconds and c.mode == Mode.PS:
        raise ConfigError("config field 'checkpoint_every_seconds' runs in collective mode (drop "
                          "--mode ps, or use --checkpoint-every STEPS)")
    _check(c.eval_every >= 0, "eval_every", c.eval_every, "an integer >= 0 (0 = only at the end)")
    _check(c.eval_batches >= 1, "eval_batches", c.eval_batches, "an integer >= 1")
    if c.eval_every and not c.eval_data:
        raise ConfigError(f"config field 'eval_every': {c.eval_every} needs eval_data (the held-out "
                          f"data to evaluate on); add --eval-data PATH")
    if c.eval_data and c.mode == Mode.PS:
        raise ConfigError("config field 'eval_data': held-out evaluation during training runs in "
                          "collective mode only (mode=ps workers do not own the tables); train, "
                          "then evaluate the PS run's checkpoint with `hybridps evaluate "
                          "--checkpoint DIR --data PATH`")
    _check(c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "an integer >= 1")
    _check(c.num_buckets >= 1, "num_buckets", c.num_buckets, "an integer >= 1")
    _check(c.delta_every >= 0, "delta_every", c.delta_every, "an integer >= 0")
    _check(c.delta_every_seconds >= 0, "delta_every_seconds", c.delta_every_seconds, "seconds >= 0")
    _check(c.stream_poll_s > 0, "stream_poll_s", c.stream_poll_s, "seconds > 0")
    _check(c.stream_retry_seconds >= 0, "stream_retry_seconds", c.stream_retry_seconds,
           "seconds >= 0 (0: stop at the first failed read)")
    if (c.delta_every or c.delta_every_seconds) and not c.delta_export_dir:
        raise ConfigError("config fields 'delta_every' / 'delta_every_seconds' need "
                          "delta_export_dir (where the deltas go); add --delta-export-dir DIR")
    if c.mode == Mode.PS and (c.steps == 0 or c.delta_every_seconds or is_unbounded_data(c.data)):
        raise ConfigError("mode=ps trains a fixed number of steps on files or synthetic data; "
                          "--steps 0, stream data (stream:DIR, redis://...) and "
                          "delta_every_seconds run in collective mode (drop --mode ps)")
    _check(c.ttl_steps >= 0, "ttl_steps", c.ttl_steps, "an integer >= 0 (0 = never)")
    _check(c.max_rows >= 0, "max_rows", c.max_rows, "an integer >= 0 (0 = unlimited)")
    _check(c.full_export_every >= 1, "full_export_every", c.full_export_every,
           "an integer >= 1 (1: every export is a full one)")
    _check(c.watchdog_timeout > 0, "watchdog_timeout", c.watchdog_timeout, "seconds > 0")
    _check(c.max_inflight >= 1, "max_inflight", c.max_inflight, "an integer >= 1")
    _check(c.dense_staleness >= 0, "dense_staleness", c.dense_staleness, "an integer >= 0")
    if c.dense_staleness and not (c.sync == Sync.SSP and c.mode == Mode.COLLECTIVE):
        raise ConfigError(f"config field 'dense_staleness': {c.dense_staleness} applies to "
                          f"sync=ssp in collective mode only; it is 0 under bsp, and under asp "
                          f"max_inflight bounds how late dense updates are (got sync={c.sync.value}, "
                          f"mode={c.mode.value})")
    if c.resume and not c.checkpoint_dir:
        raise ConfigError("config field 'resume': needs checkpoint_dir (where to resume from)")
    if c.resume_fresh and not c.resume:
        raise ConfigError("config field 'resume_fresh': applies with resume (what to do when no "
                          "checkpoint under checkpoint_dir is intact); add --resume")
    if c.sync == Sync.BSP:
        _check(c.staleness == 0, "staleness", c.staleness, "0 with sync=bsp (use sync=ssp for a bound > 0)")
    if c.sync == Sync.ASP and c.staleness:
        raise ConfigError(f"config field 'staleness': {c.staleness} applies to sync=ssp only; asp has "
                          f"no staleness bound (max_inflight={c.max_inflight} limits how far pushes "
                          f"trail); drop staleness or use sync=ssp")
    # the feature schema (or the Criteo preset's tables: table_groups, table_settings)
    from hybridps.schema import build_schema
    build_schema(c)


def is_unbounded_data(spec):
    """A stream source (hybridps.data.stream): ``stream:DIR`` or ``redis://HOST:PORT/STREAM``."""
    spec = str(spec)
    return spec.startswith("stream:") or spec.startswith("redis://")


def shared_config(c):
    """The settings every rank must share (the config without its per-rank fields), as a dict."""
    shared = c.to_dict()
    for per_rank in PER_RANK_FIELDS:
        shared.pop(per_rank, None)
    return shared


def config_hash(c):
    """sha256 of the canonical JSON of the settings every rank must share."""
    return hashlib.sha256(json.dumps(shared_config(c), sort_keys=True).encode()).hexdigest()


def env_tf_threads():
    """HYBRIDPS_TF_THREADS, the one environment knob read here (0 when unset)."""
    value = os.environ.get("HYBRIDPS_TF_THREADS", "0")
    if not value.isdigit():
        raise ConfigError(f"environment variable HYBRIDPS_TF_THREADS must be a non-negative integer, got {value!r}")
    return int(value)


def env_watchdog_timeout():
    """HYBRIDPS_WATCHDOG_TIMEOUT in seconds (> 0), or None when unset: the watchdog's fallback
    when no watchdog_timeout is configured (hybridps doctor, scripts that use hybridps.comm)."""
    value = os.environ.get("HYBRIDPS_WATCHDOG_TIMEOUT", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"environment variable HYBRIDPS_WATCHDOG_TIMEOUT must be seconds > 0, got {value!r}")
    return seconds


def env_watchdog_dir():
    """HYBRIDPS_WATCHDOG_DIR (where ranks leave their watchdog state), or None when unset."""
    return os.environ.get("HYBRIDPS_WATCHDOG_DIR") or None


def env_exchange_trace():
    """HYBRIDPS_EXCHANGE_TRACE: path prefix of per-rank exchange traces (benchmarks), or None."""
    return os.environ.get("HYBRIDPS_EXCHANGE_TRACE") or None


def env_serve_apply_delay():
    """HYBRIDPS_SERVE_APPLY_DELAY: seconds ``hybridps serve`` sleeps inside every delta apply,
    between the tombstones and the rows (a testing aid: a server killed mid-apply); 0 unset."""
    value = os.environ.get("HYBRIDPS_SERVE_APPLY_DELAY", "").strip()
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"environment variable HYBRIDPS_SERVE_APPLY_DELAY must be seconds >= 0, got {value!r}")
    return seconds
