"""Raw feature values (as a request or a data file gives them) -> the serving module's inputs.

What lives here: :func:`request_columns` (a TF Serving REST body, row form ``instances`` or
column form ``inputs``, into one list of values per feature) and :func:`serving_inputs`
(columns of raw values into the arrays the ``serve`` signature of hybridps.export.saved_model
takes). Every error is a RequestError naming the feature. What does not: HTTP
(hybridps.serving.server), the hashing formulas (hybridps.data.hashing), the model.

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
import math
import numbers

import numpy as np

from hybridps.data.hashing import MISSING_ID, feature_keys, text_ids
from hybridps.errors import RequestError


def request_columns(body, schema):
    """The values of each feature of a predict request, and the number of rows.

    Args:
        body: the parsed JSON body: ``{"instances": [{feature: value, ...}, ...]}`` or
            ``{"inputs": {feature: [value, ...], ...}}``.
        schema: the model's FeatureSchema.
    Returns:
        (columns: {feature name: list of values}, rows).
    Raises:
        RequestError: not one of the two forms, an unknown feature, columns of unequal length.
    """
    known = _feature_names(schema)
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RequestError("the request body must be a JSON object with either 'instances' (a list "
                           "of rows, {feature: value}) or 'inputs' ({feature: [values]})")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not all(isinstance(r, dict) for r in instances):
            raise RequestError("'instances' must be a list of objects {feature: value, ...}")
        for i, row in enumerate(instances):
            for name in row:
                if name not in known:
                    raise RequestError(f"instances[{i}]: unknown feature {name!r}; the model's "
                                       f"features: {sorted(known)}")
        return {name: [row.get(name) for row in instances] for name in known}, len(instances)
    inputs = body["inputs"]
    if not isinstance(inputs, dict):
        raise RequestError("'inputs' must be an object {feature: [values, ...]}")
    rows = None
    for name, values in inputs.items():
        if name not in known:
            raise RequestError(f"inputs: unknown feature {name!r}; the model's features: {sorted(known)}")
        if not isinstance(values, list):
            raise RequestError(f"inputs[{name!r}]: must be a list of values, one per row")
        if rows is not None and len(values) != rows:
            raise RequestError(f"inputs[{name!r}]: {len(values)} values, other features have {rows}")
        rows = len(values)
    rows = rows or 0
    return {name: inputs.get(name, [None] * rows) for name in known}, rows


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
        raise RequestError(f"feature {feature.name!r} (dense), row {row}: {value!r} is not a finite number")
    return float(value)


def _single(feature, row, value):
    if isinstance(value, (list, dict)) or isinstance(value, (bool, float)):
        raise RequestError(f"feature {feature.name!r} (single-valued), row {row}: {value!r} is not "
                           f"an integer or a text")
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise RequestError(f"feature {feature.name!r}, row {row}: {value} is outside int64")
    return value


def _list(feature, row, value):
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"feature {feature.name!r} ({feature.kind}), row {row}: {value!r} is not "
                           f"a list")
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
                       f"text values (hex strings), got {value!r}")
