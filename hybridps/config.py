"""Typed training configuration: dataclasses and enums, YAML loading, validation, hashing.

What lives here: every knob of a training run, its default, its allowed values, and the one
place that reads ``HYBRIDPS_*`` environment variables. A YAML file gives the base values,
CLI flags override them; :func:`validate` raises a ConfigError naming the field, the bad value
and what is allowed. :func:`config_hash` is compared across ranks at start-up so a job whose
ranks disagree (a stale YAML on one node) stops before training. What does not: parsing of
argv (hybridps.cli) and anything that acts on the values.
"""
import dataclasses
import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hybridps.errors import ConfigError
from hybridps.models.registry import check_model_spec


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


@dataclass
class TrainConfig:
    """Every setting of ``hybridps train``. Field docs: docs/configuration.md, generated from the
    flags' help (hybridps.cli) and, for fields without help, the comment on the field's line."""
    model: str = "deepfm"
    data: str = "synthetic"
    steps: int = 100
    batch_size: int = 512                 # per rank
    sync: Sync = Sync.BSP                 # bsp; ssp (needs staleness S >= 1, given explicitly); asp
    staleness: int = 0
    mode: Mode = Mode.COLLECTIVE          # collective, or ps: the last num_servers ranks are servers
    num_servers: int = 1                  # ps mode: how many of the last ranks are servers
    seed: int = 0                         # weights, initial rows and synthetic data derive from it
    metrics_out: Optional[str] = None
    # the feature schema (YAML 'features:' mapping, hybridps.schema); None: the Criteo preset
    features: Optional[Dict[str, Any]] = None   # the schema (docs/features.md); none: Criteo preset
    # model
    dim: int = 16
    hidden: List[int] = field(default_factory=lambda: [256, 128])
    cross_layers: int = 3                 # DCN: cross layers
    # sparse embeddings
    table_layout: str = "shared"          # shared: all fields in one table; per_field: one each
    table_groups: Optional[List[List[int]]] = None   # explicit field groups, overrides layout
    optimizer: str = "adagrad"
    learning_rate: float = 0.05           # sparse optimizer learning rate
    initializer: str = "normal"           # key-seeded rows: normal, uniform(+-init_std), zeros
    init_std: float = 0.01                # scale of the initializer
    min_count: int = 1
    nonfinite: str = "raise"              # a NaN/Inf row gradient: raise, or skip that row (counted)
    # dense parameters (default: same optimizer and rate as the embeddings)
    dense_optimizer: Optional[str] = None          # none: the sparse optimizer (adam for ftrl)
    dense_learning_rate: Optional[float] = None    # none: learning_rate
    # data
    on_bad_line: str = "raise"            # a bad line or part: stop naming it (raise), or skip and count
    shuffle: bool = False                 # Parquet/TFRecord: shuffle parts and rows per epoch (seeded)
    shuffle_buffer: int = 0               # rows in the shuffle buffer (0 or 1: within a part only)
    data_cache: Optional[str] = None      # Parquet/TFRecord: directory of parsed parts (hybridps.data.parsed_cache)
    num_fields: int = 26
    num_dense: int = 13
    vocab_size: int = 100_000
    zipf_a: float = 1.2
    list_mean_length: float = 10.0        # synthetic data: mean length of list features
    list_max_length: int = 50             # synthetic data: longest list (lists without max_len)
    # reporting
    warmup_steps: int = 5
    log_every: int = 20                   # steps between progress lines and samples/s intervals
    auc_window: float = 0.5               # progressive AUC over this trailing fraction of steps
    progress: bool = True                 # rank 0 shows a progress bar on a terminal
    tf_threads: int = 0                   # TF threads; 0: HYBRIDPS_TF_THREADS or cores / ranks per node
    dump_state: Optional[str] = None      # write final dense weights and table shards (npz)
    tensorboard_dir: Optional[str] = None # rank 0 writes TensorBoard scalars here
    # held-out evaluation during training (collective mode)
    eval_data: Optional[str] = None       # held-out data (a file spec, or 'synthetic')
    eval_every: int = 0                   # steps between evaluations (0: only at the end)
    eval_batches: int = 10                # batches per rank of synthetic held-out data
    # checkpoints, export and eviction (issue: checkpoints)
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0             # steps; 0 = only at the end when checkpoint_dir is set
    # elastic restarts: also a checkpoint when this much wall time has passed since the last (0: off)
    checkpoint_every_seconds: float = 0.0
    keep_checkpoints: int = 3
    resume: bool = False
    resume_fresh: bool = False            # with resume: start from step 0 if no checkpoint is intact
    num_buckets: int = 4096               # virtual buckets of checkpointed rows (fixed per table)
    delta_export_dir: Optional[str] = None
    delta_every: int = 0
    delta_every_seconds: float = 0.0      # also a delta when this much wall time has passed (0: off)
    stream_poll_s: float = 0.2            # stream sources: seconds between looks for new data
    stream_retry_seconds: float = 60.0    # streams: seconds to retry a lost server/directory before stopping
    ttl_steps: int = 0                    # evict rows not updated for this many steps (0 = never)
    max_rows: int = 0                     # per table and rank: evict down to this (0 = unlimited)
    eviction: str = "lfu"                 # lfu | lru, for max_rows
    # per-table overrides of min_count, ttl_steps, max_rows, eviction: {table index: {field: value}}
    table_settings: Optional[Dict[int, Dict[str, Any]]] = None
    # every K-th export into delta_export_dir (the first of a run included) is a full export
    full_export_every: int = 10
    # launch / failure handling (issue: launch)
    watchdog_timeout: float = 300.0       # seconds a collective may take before the job aborts
    # consistency pipeline (SSP / ASP)
    max_inflight: int = 4                 # bounded queue of outstanding pushes / prefetches
    dense_staleness: int = 0              # SSP: a TF step may miss the dense updates of this many latest steps
    loader_delay_ms: float = 0.0          # testing aid: sleep in the data loader of delay_rank
    delay_rank: int = -1
    fail_at_step: int = -1                # testing aid: raise on fail_rank at this step
    fail_rank: int = 0

    @property
    def effective_dense_optimizer(self):
        return self.dense_optimizer or (self.optimizer if self.optimizer in DENSE_OPTIMIZERS else "adam")

    @property
    def effective_dense_learning_rate(self):
        return self.dense_learning_rate if self.dense_learning_rate is not None else self.learning_rate

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["sync"] = self.sync.value
        out["mode"] = self.mode.value
        if self.table_settings is not None:   # JSON object keys are strings
            out["table_settings"] = {str(t): dict(v) for t, v in sorted(self.table_settings.items())}
        return out


# The admission and eviction fields a table may set for itself (``table_settings``).
TABLE_POLICY_FIELDS = ("min_count", "ttl_steps", "max_rows", "eviction")

# Testing aids: accepted, but not offered to users (left out of the known fields an unknown
# field's error lists and suggests).
TESTING_FIELDS = frozenset({"loader_delay_ms", "delay_rank", "fail_at_step", "fail_rank"})

# Fields that say where a run writes, what it reports and how this machine runs it, not what
# it trains: two runs that differ only in these train the same model on the same rows. A
# resumed run's note on how its config differs from the checkpoint's leaves them out
# (:func:`training_differences`).
OUTPUT_FIELDS = frozenset({
    "metrics_out", "progress", "log_every", "warmup_steps", "auc_window", "tf_threads",
    "dump_state", "tensorboard_dir", "eval_data", "eval_every", "eval_batches",
    "checkpoint_dir", "checkpoint_every", "checkpoint_every_seconds", "keep_checkpoints", "resume", "resume_fresh",
    "delta_export_dir", "delta_every", "delta_every_seconds", "full_export_every",
    "stream_poll_s", "data_cache", "watchdog_timeout"}) | TESTING_FIELDS


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_USER_FIELDS = sorted(set(_FIELDS) - TESTING_FIELDS)


def training_differences(config, saved):
    """Sorted names of the fields whose values differ between ``config`` (a TrainConfig) and
    ``saved`` (the ``to_dict()`` of another, e.g. a checkpoint's), :data:`OUTPUT_FIELDS` left out."""
    mine = config.to_dict()
    return sorted(k for k in (set(mine) | set(saved)) - OUTPUT_FIELDS if mine.get(k) != saved.get(k))


def _unknown_fields_error(unknown, yaml_path):
    """The ConfigError for field names TrainConfig does not have: each with up to 3 close
    user-facing fields (difflib), then all of those."""
    import difflib
    named = []
    for name in unknown:
        close = [repr(c) for c in difflib.get_close_matches(str(name).replace("-", "_").lower(),
                                                            _USER_FIELDS, n=3, cutoff=0.75)]
        guess = " or ".join(filter(None, [", ".join(close[:-1]), close[-1]])) if close else ""
        named.append(f"{name!r}" + (f" (did you mean {guess}?)" if guess else ""))
    where = f" in {yaml_path}" if yaml_path else ""
    return ConfigError(f"unknown config field(s) {', '.join(named)}{where}; known fields: "
                       f"{', '.join(_USER_FIELDS)}")


def _coerce(name, value):
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming the field."""
    default = _FIELDS[name].default
    if name == "sync":
        return _enum(Sync, name, value)
    if name == "mode":
        return _enum(Mode, name, value)
    if name in ("hidden",):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}': expected a list of integers, got {value!r}") from None
    if name == "table_groups":
        if value is None:
            return None
        try:
            return [[int(f) for f in group] for group in value]
        except (TypeError, ValueError):
            raise ConfigError(f"config field 'table_groups': expected a list of lists of field "
                              f"indices, e.g. [[0, 1, 2], [3]], got {value!r}") from None
    if name == "table_settings":
        return _coerce_table_settings(value)
    if name == "features":
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config field 'features': expected a mapping (label, dense, "
                              f"sparse, tables), got {value!r}")
        return value
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"config field '{name}' may not be empty")
    kind = type(default) if default is not None else (float if name == "dense_learning_rate" else str)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}': expected {kind.__name__}, got {value!r}") from None


def _coerce_table_settings(value):
    """{table index: {field: value}} from a YAML mapping or a JSON string (the CLI flag)."""
    example = '{"0": {"max_rows": 100000, "eviction": "lru"}, "3": {"min_count": 2}}'
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"config field 'table_settings': not valid JSON ({exc}); "
                              f"expected e.g. {example}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"config field 'table_settings': expected a mapping of table index to "
                          f"settings, e.g. {example}; got {value!r}")
    settings = {}
    for table, fields in value.items():
        try:
            index = int(table)
        except (TypeError, ValueError):
            index = -1
        if index < 0:
            raise ConfigError(f"config field 'table_settings': {table!r} is not a table index "
                              f"(0, 1, ... in table order)")
        if not isinstance(fields, dict):
            raise ConfigError(f"config field 'table_settings': table {index}: expected a mapping "
                              f"of {', '.join(TABLE_POLICY_FIELDS)}, got {fields!r}")
        unknown = sorted(set(fields) - set(TABLE_POLICY_FIELDS))
        if unknown:
            raise ConfigError(f"config field 'table_settings': table {index}: unknown setting(s) "
                              f"{unknown}; a table may set {', '.join(TABLE_POLICY_FIELDS)}")
        try:
            settings[index] = {name: _coerce(name, v) for name, v in fields.items()}
        except ConfigError as exc:
            raise ConfigError(f"config field 'table_settings': table {index}: {exc}") from None
    return settings


def _enum(cls, name, value):
    try:
        return cls(value.value if isinstance(value, cls) else str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ConfigError(f"config field '{name}': {value!r} is not one of {allowed}") from None


def make_config(yaml_path=None, overrides=None):
    """Build a validated TrainConfig from an optional YAML file and a dict of overrides.

    Args:
        yaml_path: path of a YAML mapping of field -> value, or None.
        overrides: dict of field -> value (CLI flags); None values are ignored.
    Returns:
        TrainConfig.
    Raises:
        ConfigError: unknown field, wrong type or a value out of range.
    """
    values = {}
    if yaml_path:
        values.update(_load_yaml(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS), key=str)
    if unknown:
        raise _unknown_fields_error(unknown, yaml_path)
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    if config.sync == Sync.SSP and "staleness" not in values:
        raise ConfigError("config field 'staleness': sync=ssp needs a staleness bound (--staleness S, "
                          "S >= 1 steps); without one it would run as BSP (staleness 0, which you "
                          "may also give explicitly)")
    return config


class _DuplicateKey(Exception):
    pass


def _unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(key, seen[key], line)
                        seen[key] = line
                    except TypeError:       # an unhashable key: SafeLoader reports it
                        continue
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _load_yaml(path):
    import yaml
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        try:
            data = yaml.load(fh, Loader=_unique_key_loader()) or {}
        except _DuplicateKey as exc:
            key, first, again = exc.args
            raise ConfigError(f"config file {path}: key {key!r} is given twice (line {first} and "
                              f"line {again}); give each field once") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _check(ok, name, value, allowed):
    if not ok:
        raise ConfigError(f"config field '{name}': {value!r} is invalid; allowed: {allowed}")


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
    _check(c.table_layout in TABLE_LAYOUTS, "table_layout", c.table_layout, ", ".join(TABLE_LAYOUTS))
    _check(c.optimizer in SPARSE_OPTIMIZERS, "optimizer", c.optimizer, ", ".join(SPARSE_OPTIMIZERS))
    _check(c.effective_dense_optimizer in DENSE_OPTIMIZERS, "dense_optimizer", c.dense_optimizer,
           ", ".join(DENSE_OPTIMIZERS))
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "a number > 0")
    _check(c.effective_dense_learning_rate > 0, "dense_learning_rate", c.dense_learning_rate, "a number > 0")
    _check(c.initializer in INITIALIZERS, "initializer", c.initializer, ", ".join(INITIALIZERS))
    _check(c.init_std >= 0, "init_std", c.init_std, "a number >= 0")
    _check(c.min_count >= 1, "min_count", c.min_count, "an integer >= 1")
    _check(c.nonfinite in NONFINITE, "nonfinite", c.nonfinite, ", ".join(NONFINITE))
    _check(c.on_bad_line in ("raise", "skip"), "on_bad_line", c.on_bad_line, "raise, skip")
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
    # elastic restarts: the wall-clock checkpoint cadence
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
    _check(c.eviction in ("lfu", "lru"), "eviction", c.eviction, "lfu, lru")
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
    _check(c.loader_delay_ms >= 0, "loader_delay_ms", c.loader_delay_ms, "milliseconds >= 0")
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
    for per_rank in ("metrics_out", "progress", "dump_state", "tf_threads", "resume", "resume_fresh",
                     "loader_delay_ms", "delay_rank", "watchdog_timeout", "tensorboard_dir"):
        shared.pop(per_rank, None)
    return shared


def config_hash(c):
    """sha256 of the canonical JSON of the settings every rank must share."""
    return hashlib.sha256(json.dumps(shared_config(c), sort_keys=True).encode()).hexdigest()


def check_job_config(c, world_size, data_ranks):
    """Raise ConfigError for a setting that names a rank this job does not have (or that would
    do nothing on it); ``data_ranks`` are the ranks that train (all, or the PS workers).

    Checked by the trainer once the world size is known."""
    workers = f"0..{data_ranks - 1}" if data_ranks > 1 else "0"
    if c.loader_delay_ms > 0 or c.delay_rank != -1:
        if not 0 <= c.delay_rank < data_ranks:
            raise ConfigError(
                f"config field 'delay_rank': {c.delay_rank} is not a training rank of this "
                f"{world_size}-rank job (allowed: {workers}); it names the rank whose data loader "
                f"loader_delay_ms (now {c.loader_delay_ms:g}) slows")
    if c.fail_at_step >= 0 and not 0 <= c.fail_rank < data_ranks:
        what = ("a parameter server: the failure is injected in the training loop of the workers"
                if data_ranks <= c.fail_rank < world_size else f"not a rank of this {world_size}-rank job")
        raise ConfigError(f"config field 'fail_rank': rank {c.fail_rank} is {what} (allowed: {workers})")


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
