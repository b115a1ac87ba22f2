"""Checks shared by the YAML sections of a feature schema (hybridps.schema) and of its tasks
(hybridps.tasks): names, unknown keys, numbers. What does not live here: the sections
themselves."""
import re

from hybridps.errors import ConfigError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def no_unknown(mapping, allowed, where):
    """A ConfigError naming the keys of ``mapping`` (at ``where``) not in ``allowed``."""
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def check_name(name, where, what):
    """A ConfigError unless ``name`` (of a ``what``: feature, table, task) is an identifier."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is not a valid {what} name (letters, digits and "
                          f"_, not starting with a digit)")
