"""The settings of ``hybridps join``: a dataclass with each field's help, its YAML and flags.

What lives here: :class:`JoinConfig` (every field with its default and, in
``field(metadata={"help": ...})``, the text its flag and the docs show), :func:`add_arguments`
(one ``--flag`` per field, built from the dataclass: lists are comma-separated, choices come
from ``metadata["choices"]``), and :func:`make_join_config` (a YAML mapping of fields, flags
over it, checked). What does not: acting on the values (hybridps.join.process).
"""
import dataclasses
import re
from dataclasses import dataclass
from typing import List, Optional

from hybridps.errors import ConfigError
from hybridps.join.window import EMIT_MODES, LATE_MODES


@dataclass
class JoinConfig:
    """Every setting of ``hybridps join`` (docs/join.md)."""
    impressions: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "impression events: stream:DIR (files renamed in) or redis://HOST:PORT/STREAM"})
    actions: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "action events (clicks, conversions): stream:DIR or redis://HOST:PORT/STREAM"})
    output: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "the trainer's stream to write labeled rows to: stream:DIR (Parquet parts) or "
                "redis://HOST:PORT/STREAM"})
    state_dir: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "directory of the joiner's checkpoint (pending state, input positions, output "
                "sequence); a restart resumes from it"})
    action_types: List[str] = dataclasses.field(default_factory=lambda: ["click"], metadata={
        "help": "the action types, comma-separated; one: the output's 'label' column, several: "
                "one label column named after each"})
    window_s: float = dataclasses.field(default=60.0, metadata={
        "help": "seconds of event time an impression waits for its actions"})
    emit: str = dataclasses.field(default="on_close", metadata={
        "help": "on_close: a row leaves when its window closes; first_positive: at its first "
                "positive action (negatives at close)", "choices": EMIT_MODES})
    late: str = dataclasses.field(default="count", metadata={
        "help": "an action after its window: count it, or also emit a correction row "
                "(correction column 1) with its label", "choices": LATE_MODES})
    late_horizon_s: Optional[float] = dataclasses.field(default=None, metadata={
        "help": "seconds of event time after its window a closed impression is kept for late "
                "actions (default: window_s)"})
    allowed_lateness_s: float = dataclasses.field(default=0.0, metadata={
        "help": "the watermark trails the newest event time by this many seconds"})
    idle_timeout_s: float = dataclasses.field(default=5.0, metadata={
        "help": "seconds without events after which a source stops holding the watermark; "
                "all sources quiet: the clock moves it"})
    max_pending: int = dataclasses.field(default=100_000, metadata={
        "help": "pending impressions (and buffered early actions) at most; full: stop reading "
                "that source"})
    request_id_field: str = dataclasses.field(default="request_id", metadata={
        "help": "the field joining an impression with its actions (one impression per value)"})
    event_time_field: str = dataclasses.field(default="event_time", metadata={
        "help": "the event time field: seconds since the epoch or ISO 8601"})
    action_field: str = dataclasses.field(default="action", metadata={
        "help": "the field of an action naming its type"})
    event_id_field: str = dataclasses.field(default="event_id", metadata={
        "help": "the field of an action identifying it: a repeat (a producer's retry) is dropped"})
    correction_column: str = dataclasses.field(default="correction", metadata={
        "help": "output column: 0 for a row, 1 for a late correction row"})
    partition: str = dataclasses.field(default="0/1", metadata={
        "help": "I/K: this joiner keeps only request ids whose crc32 modulo K is I"})
    on_bad_event: str = dataclasses.field(default="raise", metadata={
        "help": "an event without a request id or with a bad event time: stop with an error "
                "naming it (raise) or skip and count it (skip)", "choices": ("raise", "skip")})
    read_batch: int = dataclasses.field(default=2000, metadata={
        "help": "events read from a source per look"})
    output_rows: int = dataclasses.field(default=5000, metadata={
        "help": "rows per output batch (a Parquet part or one Redis transaction) at most"})
    flush_s: float = dataclasses.field(default=1.0, metadata={
        "help": "seconds a row may wait before its batch is written"})
    poll_s: float = dataclasses.field(default=0.1, metadata={
        "help": "seconds between looks at sources that had nothing new"})
    progress_every_s: float = dataclasses.field(default=10.0, metadata={
        "help": "seconds between progress lines (0: none)"})
    list_separator: str = dataclasses.field(default="|", metadata={
        "help": "Redis output: the separator joining list values"})
    exit_when_done: bool = dataclasses.field(default=True, metadata={
        "help": "exit once both sources have ended and every row is written"})


_POSITIVE = ("window_s", "read_batch", "output_rows", "max_pending")
_NOT_NEGATIVE = ("allowed_lateness_s", "idle_timeout_s", "flush_s", "poll_s", "progress_every_s")


def add_arguments(parser):
    """One flag per JoinConfig field (``window_s`` -> ``--window-s``), plus ``--config``."""
    parser.add_argument("--config", help="YAML file of join settings (flags override it)")
    for f in dataclasses.fields(JoinConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        kwargs = {"help": f.metadata["help"], "dest": f.name, "default": None}
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        if kind is bool:
            kwargs["type"] = _boolean
            kwargs["metavar"] = "{true,false}"
        elif kind is list:
            kwargs["type"] = _comma_list
        else:
            kwargs["type"] = kind
        parser.add_argument(flag, **kwargs)


def make_join_config(yaml_path=None, overrides=None):
    """A checked JoinConfig: defaults, then the YAML file's fields, then ``overrides`` (None
    values are not given)."""
    from hybridps.config import _load_yaml
    values = dict(_load_yaml(yaml_path)) if yaml_path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(JoinConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {yaml_path}" if yaml_path else ""
        raise ConfigError(f"unknown join setting(s){where}: {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(names))}")
    if isinstance(values.get("action_types"), str):
        values["action_types"] = _comma_list(values["action_types"])
    config = JoinConfig(**values)
    validate(config)
    return config


def validate(c):
    for name in ("impressions", "actions", "output", "state_dir"):
        if not getattr(c, name):
            raise ConfigError(f"join: {name} is not set (--{name.replace('_', '-')} or '{name}:' "
                              f"in the --config file)")
    for name in _POSITIVE:
        if not getattr(c, name) > 0:
            raise ConfigError(f"join setting '{name}': {getattr(c, name)!r} is invalid; allowed: > 0")
    for name in _NOT_NEGATIVE:
        if not getattr(c, name) >= 0:
            raise ConfigError(f"join setting '{name}': {getattr(c, name)!r} is invalid; allowed: >= 0")
    for f in dataclasses.fields(JoinConfig):
        if "choices" in f.metadata and getattr(c, f.name) not in f.metadata["choices"]:
            raise ConfigError(f"join setting '{f.name}': {getattr(c, f.name)!r} is invalid; "
                              f"allowed: {', '.join(f.metadata['choices'])}")
    if not isinstance(c.action_types, list) or not c.action_types or \
            len(set(c.action_types)) != len(c.action_types) or not all(isinstance(t, str) and t for t in c.action_types):
        raise ConfigError(f"join setting 'action_types': {c.action_types!r} is invalid; allowed: "
                          f"distinct names, e.g. click,conversion")
    if c.correction_column in c.action_types or (len(c.action_types) == 1 and c.correction_column == "label"):
        raise ConfigError(f"join setting 'correction_column': {c.correction_column!r} is also a label column")
    partition_of(c.partition)


def partition_of(text):
    """(I, K) of ``I/K``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match.group(2)) >= 1 or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"join setting 'partition': {text!r} is invalid; allowed: I/K with 0 <= I < K, e.g. 0/2")
    return int(match.group(1)), int(match.group(2))


def _base_type(annotation):
    if annotation in (int, float, str, bool):
        return annotation
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        return list
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return _base_type(args[0]) if args else str


def _comma_list(text):
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _boolean(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(text)
