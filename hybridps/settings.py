"""Settings declared once, as dataclass fields, and what is generated from them.

What lives here: :func:`setting`, a ``dataclasses.field`` whose metadata carries the field's
help text, its command-line flag, its allowed values and its role (what a run trains, or only
where it writes and how this machine runs it); :func:`add_dataclass_arguments`, the argparse
options of any dataclass declared that way (one argument group per settings group, the group's
docstring as its description); :func:`given_values`, the values a command line set;
:func:`load_yaml`, a YAML file's mapping of field: value, and :func:`unknown_fields_error`,
the error for a key that is no field (with the close field names);
:func:`coerce`, a YAML or flag value converted to its field's annotated type (an enum, bool,
int, float, str, a list of ints, a list of lists of ints, a mapping; ``Optional`` allows none),
with a ConfigError naming the field; :func:`settings_groups` and :func:`type_name` for the
configuration reference page (hybridps.config_reference). What does not: the settings of a
training run and their range checks (hybridps.config), those of ``hybridps join``
(hybridps.join.config).

A settings group is a dataclass whose fields are all made with :func:`setting`; a configuration
made of several groups inherits from them (``class TrainConfig(RunSettings, ModelSettings, ...)``),
so its fields stay flat attributes and flat YAML keys.
"""
import dataclasses
import enum
import functools
import os
import typing

from hybridps.errors import ConfigError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def setting(default, help, *, flag=True, choices=None, metavar=None, expected=None, parse=None,
            output=False, per_rank=False, bool_value=False):
    """A dataclass field with its documentation and command-line form.

    Args:
        default: the default value (a list is copied for every instance).
        help: one line saying what the field does (flag help and the reference page).
        flag: True: ``--field-name`` (a bool defaulting to true: ``--no-field-name``); a str:
            that spelling; False: YAML only.
        choices: the allowed values (an enum-typed field takes its members').
        metavar: the flag's value placeholder in ``--help``.
        expected: what a structured value looks like, for its type error ("a list of lists of
            field indices, e.g. [[0, 1], [2]]").
        parse: ``value -> value`` converting a YAML/flag value when the type is not enough
            (it raises ConfigError itself).
        output: the field says where a run writes, what it reports or how this machine runs it,
            not what it trains (left out of a resumed run's note on config differences).
        per_rank: ranks may set it differently (left out of the config hash ranks compare);
            implies ``output``.
        bool_value: a bool field's flag takes its value (``--field-name false``) instead of
            setting the opposite of its default.
    """
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None,
                "metavar": metavar, "expected": expected, "parse": parse,
                "output": output or per_rank, "per_rank": per_rank, "bool_value": bool_value}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(_copy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value):
    import copy
    return copy.deepcopy(value)


def default_of(field):
    """A field's default value (a fresh copy for list and dict defaults)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


@functools.lru_cache(maxsize=None)
def _hints(cls):
    return typing.get_type_hints(cls)


def field_type(cls, name):
    """The annotated type of field ``name`` of dataclass ``cls``."""
    return _hints(cls)[name]


def _optional(kind):
    """(the type inside ``Optional[...]``, True) or (kind, False)."""
    if typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        return rest[0], True
    return kind, False


def _is_enum(kind):
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def choices_of(cls, field):
    """The allowed values of a field (its metadata's, or its enum's), or None."""
    if field.metadata.get("choices"):
        return field.metadata["choices"]
    kind, _ = _optional(field_type(cls, field.name))
    return tuple(m.value for m in kind) if _is_enum(kind) else None


def flag_of(field):
    """The command-line flag of a field, or None (YAML only)."""
    flag = field.metadata.get("flag", True)
    if flag is True:
        negative = field.default is True and not field.metadata.get("bool_value")
        return ("--no-" if negative else "--") + field.name.replace("_", "-")
    return flag or None


def type_name(kind):
    """A reader's name of an annotated type: "int", "list of int", "str or none", "mapping"."""
    inner, optional = _optional(kind)
    if optional:
        return f"{type_name(inner)} or none"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if _is_enum(kind):
        return "str"
    return getattr(kind, "__name__", str(kind))


# ---------------------------------------------------------------------------- groups
def settings_groups(cls):
    """[(group class, [its fields])] of a configuration dataclass: its dataclass bases in the
    order written, or the class itself when it is one group."""
    bases = [b for b in cls.__bases__ if dataclasses.is_dataclass(b)]
    groups = bases or [cls]
    return [(g, [f for f in dataclasses.fields(cls) if f.name in _own_fields(g)]) for g in groups]


def _own_fields(group):
    return set(group.__dict__.get("__annotations__", {}))


def group_title(group):
    """A group's title: its ``TITLE`` attribute (else its class name)."""
    return getattr(group, "TITLE", group.__name__)


def group_description(group):
    """The first paragraph of a group's docstring, on one line."""
    doc = (group.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


# ---------------------------------------------------------------------------- argparse
def add_dataclass_arguments(parser, cls, only=None):
    """Add a flag for every field of dataclass ``cls`` that has one, grouped as
    :func:`settings_groups` says. Every flag's default is None (not given), so the values a
    command line set are :func:`given_values`; a bool field's flag sets the opposite of its
    default. ``only``: add these fields' flags only (another command sharing some settings).
    """
    for group, fields in settings_groups(cls):
        chosen = [f for f in fields if flag_of(f) and (only is None or f.name in only)]
        if not chosen:
            continue
        target = parser.add_argument_group(group_title(group).lower(), group_description(group))
        for f in chosen:
            target.add_argument(flag_of(f), **_argument_options(cls, f))


def _argument_options(cls, field):
    kind, _ = _optional(field_type(cls, field.name))
    options = {"dest": field.name, "default": None, "help": field.metadata.get("help")}
    if kind is bool and field.metadata.get("bool_value"):       # the value is coerce()d
        shown = f"{options['help']} (default: {str(field.default).lower()})" if options["help"] else None
        return dict(options, metavar="{true,false}", help=shown)
    if kind is bool:
        return dict(options, action="store_const", const=not field.default)
    default = default_of(field)
    if default is not None and options["help"]:
        shown = ",".join(map(str, default)) if isinstance(default, list) else getattr(default, "value", default)
        options["help"] += f" (default: {shown})"
    choices = choices_of(cls, field)
    if choices:
        options["choices"] = list(choices)
    if kind in (int, float) and field.metadata.get("parse") is None:   # parse: the text is its
        options["type"] = kind
    if field.metadata.get("metavar"):
        options["metavar"] = field.metadata["metavar"]
    return options


def given_values(args, cls):
    """{field: value} of the flags of ``cls`` an argparse namespace was given (None: not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# ---------------------------------------------------------------------------- YAML files
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


def load_yaml(path):
    """The mapping of field: value in YAML file ``path`` (a key given twice is an error).

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or repeats a key.
    """
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


def unknown_fields_error(cls, unknown, yaml_path=None, what="config field"):
    """The ConfigError for names that are not fields of dataclass ``cls``: each with up to 3
    close field names (difflib), then all of them. ``what``: what a field is called in the
    message ("config field", "join setting")."""
    import difflib
    known = sorted(f.name for f in dataclasses.fields(cls))
    named = []
    for name in unknown:
        close = [repr(c) for c in difflib.get_close_matches(str(name).replace("-", "_").lower(),
                                                            known, n=3, cutoff=0.75)]
        guess = " or ".join(filter(None, [", ".join(close[:-1]), close[-1]])) if close else ""
        named.append(f"{name!r}" + (f" (did you mean {guess}?)" if guess else ""))
    where = f" in {yaml_path}" if yaml_path else ""
    return ConfigError(f"unknown {what}(s) {', '.join(named)}{where}; known fields: "
                       f"{', '.join(known)}")


# ---------------------------------------------------------------------------- values
def coerce(cls, field, value):
    """``value`` (from YAML or a flag) as field ``field`` of ``cls`` holds it.

    Raises:
        ConfigError: naming the field, the value and what it should be.
    """
    name = field.name
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse(value)
    kind, optional = _optional(field_type(cls, name))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{name}' may not be empty")
    if _is_enum(kind):
        try:
            return kind(value.value if isinstance(value, kind) else str(value).lower())
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ConfigError(f"config field '{name}': {value!r} is not one of {allowed}") from None
    expected = field.metadata.get("expected")
    try:
        return _convert(kind, value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}': expected {expected or type_name(kind)}, "
                          f"got {value!r}") from None


def _convert(kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        if isinstance(value, str) and args and args[0] in (int, float, str):
            value = [v.strip() for v in value.split(",") if v.strip()]     # a flag: "256,128"
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise TypeError(value)
        return [_convert(args[0], v) if args else v for v in value]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is typing.Any:
        return value
    return kind(value)
