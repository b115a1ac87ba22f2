"""The checkpoint format: names, record layout, the manifest and the model signature.

What lives here: the on-disk names (``ckpt-<step>``, shard files, ``latest``), the packed row
and candidate records, the RNG state in JSON, :func:`model_signature` (what a restore must
share with the checkpoint), :func:`build_manifest`, and reading a manifest back into the
run's FeatureSchema and model settings (:func:`schema_of`, :func:`model_config_of`), also for
checkpoints written before the feature schema existed. What does not: file I/O
(hybridps.checkpoint.files), writing and reading shards (writer, reader).
"""
import dataclasses
import hashlib
import os
import re
import time

import numpy as np

from hybridps.checkpoint.files import FORMAT_VERSION, MANIFEST, TMP_PREFIX, canonical_json
from hybridps.models.registry import model_spec_name, model_to_build
from hybridps.sparse.routing import DEFAULT_NUM_BUCKETS, OWNER_FUNCTION

FORMAT = "hybridps-checkpoint"
CKPT_PREFIX = "ckpt-"
DAMAGED_PREFIX = "damaged-"              # a refused checkpoint set aside by a resume (never pruned)
LATEST = "latest"
DENSE_FILE = "dense.npz"
CANDIDATE_DTYPE = np.dtype([("key", "<i8"), ("hits", "<i8")])
CKPT_NAME = re.compile(r"^ckpt-(\d{10})$")
META_FIELDS = ("hits", "last_update_step", "update_count")
__all__ = ["FORMAT_VERSION", "MANIFEST", "TMP_PREFIX", "OWNER_FUNCTION"]


def row_record_dtype(row_width):
    """The packed record of one row in a ``.rows`` file."""
    return np.dtype([("key", "<i8"), ("hits", "<i8"), ("last_update_step", "<i8"),
                     ("update_count", "<i8"), ("row", "<f4", (row_width,))])


def shard_names(table_index, rank):
    base = f"table-{table_index:03d}.rank-{rank:05d}"
    return base + ".rows", base + ".cands", base + ".index.npz"


def checkpoint_name(step):
    return f"{CKPT_PREFIX}{int(step):010d}"


def list_checkpoints(root):
    """Complete checkpoint directories under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = CKPT_NAME.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


@dataclasses.dataclass
class CheckpointInfo:
    """What :func:`save_checkpoint` wrote. ``total_bytes`` covers every rank's files."""
    path: str
    step: int
    bytes_written: int
    total_bytes: int
    seconds: float
    files: list


@dataclasses.dataclass
class RestoreReport:
    """What :func:`restore_checkpoint` read and restored on this rank.

    Attributes:
        bytes_read: bytes read per kind (``data`` = row and candidate records, ``index``,
            ``dense``, ``state``, ``manifest``) and ``total``.
        rows / candidates: rows and candidates restored into each table on this rank.
        data_state: this rank's dataset position (pass to ``dataset.restore``).
        counters: per table, the counters this rank restores (see :func:`restore_checkpoint`).
        warnings: config differences that do not prevent the restore.
    """
    path: str
    step: int
    saved_world_size: int
    num_buckets: int
    bytes_read: dict
    rows: list
    candidates: list
    data_state: object
    rng_state: object = dataclasses.field(repr=False)
    counters: list = None
    warnings: list = None
    seconds: float = 0.0


@dataclasses.dataclass
class ResumePoint:
    """The newest intact checkpoint under a root (``path`` None if there is none).

    ``damaged``: (path, problems) of every newer checkpoint that verification refused.
    """
    path: object
    step: int
    warnings: list
    damaged: list = dataclasses.field(default_factory=list)


def numpy_rng_state():
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def set_numpy_rng_state(state):
    np.random.set_state((state["kind"], np.asarray(state["key"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def model_signature(config=None, schema=None, tables=None, num_buckets=None):
    """What a checkpoint must share with the run that restores it (JSON-able dict).

    The model kind and shapes, the features and their tables (dims, sparse optimizers: their
    slots are in the checkpoint), the dense optimizer and num_buckets. Learning rates, step
    counts, paths and the like may change between a save and a resume, so they are not part
    of it. For the Criteo preset the signature has the form earlier hybridps wrote (field
    groups, table dims, global dim), so their checkpoints still restore.
    """
    signature = {"num_buckets": int(num_buckets or getattr(config, "num_buckets", None)
                                    or DEFAULT_NUM_BUCKETS)}
    if schema is not None:
        if schema.preset == "criteo":
            signature.update(schema.signature())
        else:
            signature["features"] = schema.signature()
    elif tables is not None:
        signature["tables"] = [{"dim": int(t.dim), "optimizer": t.optimizer} for t in tables]
    if config is not None:
        signature.update(model=model_spec_name(config.model), hidden=[int(h) for h in config.hidden],
                         cross_layers=config.cross_layers if config.model == "dcn" else None,
                         dense_optimizer=config.effective_dense_optimizer,
                         num_dense=int(schema.num_dense if schema is not None else config.num_dense))
        if schema is None or schema.preset == "criteo":
            signature.update(dim=config.dim, optimizer=config.optimizer,
                             num_fields=int(len(schema.sparse) if schema is not None else config.num_fields))
    return signature


# The settings a checkpoint's model and tables depend on (hybridps export rebuilds the model
# from these; everything else of the saved config belongs to the training run).
MODEL_SETTINGS = ("model", "dim", "hidden", "cross_layers", "num_experts", "expert_units", "seed", "optimizer", "learning_rate",
                  "dense_optimizer", "dense_learning_rate", "initializer", "init_std", "min_count",
                  "ttl_steps", "max_rows", "eviction", "table_layout", "table_groups",
                  "table_settings", "num_fields", "num_dense", "features", "num_buckets")


def model_summary(config, schema):
    """The ``model`` section of a manifest: what the model is, for a reader (the model is
    rebuilt from the recorded config's MODEL_SETTINGS, not from this)."""
    return {"name": config.model, "num_fields": len(schema.sparse) if schema else config.num_fields,
            "num_dense": schema.num_dense if schema else config.num_dense, "dim": config.dim,
            "hidden": [int(h) for h in config.hidden], "cross_layers": config.cross_layers,
            "num_experts": config.num_experts, "expert_units": config.expert_units,
            "tasks": list(schema.task_names) if schema else ["label"], "seed": config.seed}


def recorded_model(manifest):
    """The ``model`` setting a checkpoint's or export's manifest records (a string, never run)."""
    return (manifest.get("config") or {}).get("model") or (manifest.get("model") or {}).get("name")


def model_config_of(manifest, model=None, where="the checkpoint"):
    """A TrainConfig with the model settings of a checkpoint or export (MODEL_SETTINGS of its
    config) whose ``model`` is the one to build: the recorded built-in, or the operator's
    ``model`` (``--model``) when it matches the recorded one (hybridps.models.registry
    :func:`model_to_build`: a manifest never chooses code to run).

    Raises:
        CheckpointError: no config recorded.
        ConfigError: a user model recorded and no matching ``model`` given (``where`` named).
    """
    return _recorded_config(manifest, model_to_build(recorded_model(manifest), model, where))


def _recorded_config(manifest, model=None):
    """The recorded model settings as a TrainConfig, with ``model`` when given (else the
    recorded one, only a name here)."""
    from hybridps.config import make_config
    saved = manifest.get("config")
    if not saved:
        from hybridps.errors import CheckpointError
        raise CheckpointError("the checkpoint was saved without a config (no model description); "
                              "cannot rebuild the model")
    settings = {k: saved[k] for k in MODEL_SETTINGS if k in saved and saved[k] is not None}
    if model is not None:
        settings["model"] = model
    # an older checkpoint's table_settings by table index are read as its tables' names, quietly
    return make_config(overrides=settings, warn_deprecated=False)


def schema_of(manifest):
    """The FeatureSchema a checkpoint was trained with: its recorded ``schema``, or, for
    checkpoints written before the schema existed, the Criteo preset of its config."""
    from hybridps.schema import criteo_preset, schema_from_dict
    if manifest.get("schema"):
        return schema_from_dict(manifest["schema"])
    info = manifest.get("model") or {}
    config = _recorded_config(manifest)
    return criteo_preset(config, int(info.get("num_fields", config.num_fields)),
                         int(info.get("num_dense", config.num_dense)))


def signature_hash(signature):
    return hashlib.sha256(canonical_json(signature)).hexdigest()


def full_config_hash(config):
    if config is None:
        return None
    from hybridps.config import config_hash
    return config_hash(config)


def build_manifest(step, world_size, config, schema, tables, num_buckets, gathered, extra):
    """The manifest of a checkpoint (JSON-able; signed by hybridps.checkpoint.files)."""
    signature = model_signature(config, schema, tables, num_buckets)
    files = {}
    for rank_info in gathered:
        for entry in rank_info["entries"]:
            files[entry["name"]] = {k: v for k, v in entry.items() if k != "name"}
    table_list = []
    for t, table in enumerate(tables):
        per_rank = [g["tables"][t] for g in gathered]
        table_config = schema.tables[t] if schema is not None else None
        table_list.append({
            "table_id": int(table.table_id), "dim": int(table.dim), "optimizer": table.optimizer,
            "name": table_config.name if table_config else None,
            "optimizer_slots": list(table.optimizer_slot_names),
            "row_width": int(table.row_width), "num_buckets": num_buckets,
            "initializer": table.initializer, "seed": int(table.seed),
            "min_count": int(table.min_count),
            "admission_eviction": table_config.policy() if table_config else None,
            "fields": ([int(f) for f in schema.field_groups[t]] if schema is not None and schema.field_groups
                       else [f.name for f in schema.features_of_table(t)] if schema is not None else None),
            "record_bytes": row_record_dtype(table.row_width).itemsize,
            "rows": sum(p["rows"] for p in per_rank),
            "candidates": sum(p["candidates"] for p in per_rank),
            "rows_per_rank": [p["rows"] for p in per_rank],
            "candidates_per_rank": [p["candidates"] for p in per_rank],
            "counters_per_rank": [p["counters"] for p in per_rank],
        })
    from hybridps import __version__
    model_info = model_summary(config, schema) if config is not None else None
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hybridps_version": __version__,
        "step": step, "world_size": world_size,
        "mode": getattr(getattr(config, "mode", None), "value", "collective"),
        "sync": getattr(getattr(config, "sync", None), "value", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_buckets": num_buckets, "owner_function": OWNER_FUNCTION,
        "model_signature": signature, "model_hash": signature_hash(signature),
        "config_hash": full_config_hash(config),
        "config": config.to_dict() if config is not None else None,
        "schema": schema.to_dict() if schema is not None else None,
        "model": model_info,
        "tables": table_list,
        "dense": gathered[0]["dense"],
        "data_state": [g["data_state"] for g in gathered],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "extra": extra,
    }
