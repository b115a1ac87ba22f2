"""Raw feature values (as a request or a data file gives them) -> the serving module's inputs.

What lives here: :func:`request_inputs` (a request body's bytes -> the model's inputs, within
:class:`RequestLimits`; the server runs it off its event loop), :func:`parse_json` (JSON no
deeper than a request needs), :func:`request_columns` (a TF Serving REST body, row form
``instances`` or column form ``inputs``, into one list of values per feature) and
:func:`serving_inputs` (columns of raw values into the arrays the ``serve`` signature of
hybridps.export.saved_model takes). Every error is a RequestError naming the feature (or the
limit). What does not: HTTP (hybridps.serving.server), the hashing formulas
(hybridps.data.hashing), the model.

Limits, so that one request cannot hold the server for long: at most ``max_rows`` rows
(instances, or values per column), ``max_ids_per_list`` values in one multi-hot or sequence
list, and JSON nested at most :data:`MAX_JSON_DEPTH` deep (the column form of a list feature,
``{"inputs": {"tags": [["a", "b"]]}}``, is the deepest a request needs). The nesting is
checked on the raw bytes before parsing, so a body like ``[[[[...`` is refused without being
built (Python's parser would otherwise recurse into it).

Values, per schema feature (named as the schema names it):

* dense: a number (or null / absent: the feature's ``fill``), untransformed: the module
  applies the schema's transforms;
* single-valued sparse: an integer or text (text is turned into an id with
  ``hybridps.data.hashing.text_ids``, as the readers do); null or absent is the missing id -1;
* multi-hot or sequence: a list of integers or texts (null or absent: an empty list; nulls in
  the list are dropped, as the readers drop them).

The Criteo preset (no ``features:`` schema) takes I1..I13 (raw counts; log1p(max(x, 0)) is
applied here, as the Criteo reader does) and C1..C26 as the Criteo file's text values, hashed
with ``feature_keys(field, value)``.
"""
import dataclasses
import json
import math
import numbers
import re

import numpy as np

from hybridps.data.hashing import MISSING_ID, feature_keys, text_ids
from hybridps.errors import RequestError


MAX_JSON_DEPTH = 4                  # {"inputs": {feature: [[id, ...], ...]}}
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one predict request may hold (``hybridps serve`` flags of the same names)."""
    max_rows: int = 10_000              # --max-rows-per-request
    max_ids_per_list: int = 1_000       # --max-ids-per-list
    max_body_bytes: int = 16 << 20      # --max-body-bytes (the HTTP server enforces it)


def request_inputs(raw, schema, limits=RequestLimits()):
    """A predict request's body (bytes) -> (the ``serve`` signature's inputs, rows, whether it
    is the column form ``inputs``: the answer takes the same form).

    Raises:
        RequestError: not JSON, nested too deeply, over a limit, or a bad value.
    """
    body = parse_json(raw)
    columns, rows = request_columns(body, schema, limits)
    return serving_inputs(schema, columns, rows), rows, "inputs" in body


def parse_json(raw, max_depth=MAX_JSON_DEPTH):
    """``json.loads(raw)`` for a body nested at most ``max_depth`` arrays/objects deep.

    Raises:
        RequestError: deeper (checked on the bytes, before anything is built), or not JSON.
    """
    brackets = _brackets_outside_strings(raw).translate(_AS_SQUARE)
    for _ in range(max_depth):          # strip the innermost pairs, one level at a time
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            break
    if brackets:
        if 2 * brackets.count(b"[") != len(brackets):
            raise RequestError("the request body is not JSON: its brackets do not match (cut short?)")
        raise RequestError(f"the request body nests arrays/objects more than {max_depth} levels deep; "
                           f"a request is {{'instances': [{{feature: value or [values]}}]}} or "
                           f"{{'inputs': {{feature: [values]}}}}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:     # UnicodeDecodeError is a ValueError
        raise RequestError(f"the request body is not JSON: {_shown(exc, 200)}") from None


def _brackets_outside_strings(raw):
    """The brackets of a JSON text that are not inside strings, in order (C-speed steps: a
    body is up to --max-body-bytes)."""
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)         # then every '"' opens or closes a string
    kept = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")   # strings without brackets
    return _STRING.sub(b"", kept).replace(b'"', b"")    # a '"' left: not JSON, json.loads says so


def request_columns(body, schema, limits=RequestLimits()):
    """The values of each feature of a predict request, and the number of rows.

    Args:
        body: the parsed JSON body: ``{"instances": [{feature: value, ...}, ...]}`` or
            ``{"inputs": {feature: [value, ...], ...}}``.
        schema: the model's FeatureSchema.
        limits: RequestLimits (rows, ids per list).
    Returns:
        (columns: {feature name: list of values}, rows).
    Raises:
        RequestError: not one of the two forms, an unknown feature, columns of unequal length,
            more rows or a longer list than the limits allow.
    """
    known = _feature_names(schema)
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RequestError("the request body must be a JSON object with either 'instances' (a list "
                           "of rows, {feature: value}) or 'inputs' ({feature: [values]})")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not all(isinstance(r, dict) for r in instances):
            raise RequestError("'instances' must be a list of objects {feature: value, ...}")
        _check_rows(len(instances), "instances", limits)
        for i, row in enumerate(instances):
            for name in row:
                if name not in known:
                    raise RequestError(f"instances[{i}]: unknown feature {_shown(name)}; the model's "
                                       f"features: {sorted(known)}")
        columns, rows = {name: [row.get(name) for row in instances] for name in known}, len(instances)
    else:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            raise RequestError("'inputs' must be an object {feature: [values, ...]}")
        rows = None
        for name, values in inputs.items():
            if name not in known:
                raise RequestError(f"inputs: unknown feature {_shown(name)}; the model's features: "
                                   f"{sorted(known)}")
            if not isinstance(values, list):
                raise RequestError(f"inputs[{name!r}]: must be a list of values, one per row")
            _check_rows(len(values), f"inputs[{name!r}]", limits)
            if rows is not None and len(values) != rows:
                raise RequestError(f"inputs[{name!r}]: {len(values)} values, other features have {rows}")
            rows = len(values)
        rows = rows or 0
        columns = {name: inputs.get(name, [None] * rows) for name in known}
    _check_lists(columns, limits)
    return columns, rows


def _check_rows(rows, where, limits):
    if rows > limits.max_rows:
        raise RequestError(f"{where}: {rows} rows; this server takes at most {limits.max_rows} rows per "
                           f"request (--max-rows-per-request): split the request")


def _check_lists(columns, limits):
    for name, values in columns.items():
        for row, value in enumerate(values):
            if isinstance(value, list) and len(value) > limits.max_ids_per_list:
                raise RequestError(f"feature {name!r}, row {row}: a list of {len(value)} values; this "
                                   f"server takes at most {limits.max_ids_per_list} per list "
                                   f"(--max-ids-per-list)")


def _shown(value, limit=60):
    """repr(value), shortened: error messages quote what a request sent."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def serving_inputs(schema, columns, rows=None):
    """The ``serve`` signature's inputs (numpy arrays, by input name) for columns of raw values.

    Args:
        schema: the model's FeatureSchema.
        columns: {feature name: sequence of raw values}; a feature not given reads missing.
        rows: the number of rows (default: the length of the first column).
    Returns:
        dict: ``dense`` float32 (rows, num_dense) and per sparse feature int64 (rows,) or
        (rows, longest list) padded with -1; the Criteo preset: ``dense`` and ``keys``.
    Raises:
        RequestError: a value of the wrong kind, naming the feature and the row.
    """
    if rows is None:
        rows = len(next(iter(columns.values()))) if columns else 0
    missing = [None] * rows
    dense = np.zeros((rows, schema.num_dense), np.float32)
    for j, feature in enumerate(schema.dense):
        dense[:, j] = [_number(feature, i, v) for i, v in enumerate(columns.get(feature.name, missing))]
    if schema.preset == "criteo":
        dense = np.log1p(np.maximum(dense, 0.0)).astype(np.float32)
        keys = np.empty((rows, len(schema.sparse)), np.int64)
        for f, feature in enumerate(schema.sparse):
            values = [_criteo_value(feature, i, v) for i, v in enumerate(columns.get(feature.name, missing))]
            keys[:, f] = feature_keys(f, values) if rows else []
        return {"dense": dense, "keys": keys}
    inputs = {"dense": dense}
    for feature in schema.sparse:
        cells = columns.get(feature.name, missing)
        if not feature.is_list:
            inputs[feature.name] = _ids(feature, [_single(feature, i, v) for i, v in enumerate(cells)])
            continue
        lists = [_ids(feature, _list(feature, i, v)) for i, v in enumerate(cells)]
        padded = np.full((rows, max([1] + [len(x) for x in lists])), MISSING_ID, np.int64)
        for i, ids in enumerate(lists):
            padded[i, :len(ids)] = ids
        inputs[feature.name] = padded
    return inputs


def _feature_names(schema):
    return {f.name for f in schema.dense} | {f.name for f in schema.sparse}


def _number(feature, row, value):
    if value is None:
        return feature.fill
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RequestError(f"feature {feature.name!r} (dense), row {row}: {_shown(value)} is not a finite "
                           f"number")
    return float(value)


def _single(feature, row, value):
    if isinstance(value, (list, dict)) or isinstance(value, (bool, float)):
        raise RequestError(f"feature {feature.name!r} (single-valued), row {row}: {_shown(value)} is "
                           f"not an integer or a text")
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise RequestError(f"feature {feature.name!r}, row {row}: {_shown(value)} is outside int64")
    return value


def _list(feature, row, value):
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"feature {feature.name!r} ({feature.kind}), row {row}: {_shown(value)} is "
                           f"not a list")
    return [_single(feature, row, v) for v in value if v is not None]


def _ids(feature, values):
    try:
        return text_ids(values)
    except (ValueError, TypeError) as exc:       # DataError is a ValueError
        raise RequestError(f"feature {feature.name!r}: {exc}") from None


def _criteo_value(feature, row, value):
    if value is None or isinstance(value, str):
        return value
    raise RequestError(f"feature {feature.name!r}, row {row}: the Criteo preset takes the file's "
                       f"text values (hex strings), got {_shown(value)}")
