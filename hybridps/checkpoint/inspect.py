"""``hybridps inspect``: summary and verification of a checkpoint or of a checkpoint root.

What lives here: :func:`inspect_checkpoint` (what is in a checkpoint, what is wrong with which
file, what ``latest`` names), its text form, and the command's arguments. What does not:
verification itself (hybridps.checkpoint.reader).
"""
import json
import os
import re

from hybridps.checkpoint.files import json_default
from hybridps.checkpoint.format import (CKPT_NAME, DAMAGED_PREFIX, LATEST, MANIFEST, list_checkpoints,
                                        recorded_model)
from hybridps.checkpoint.reader import load_manifest, verify_checkpoint
from hybridps.errors import CheckpointError
from hybridps.models.registry import is_user_model
from hybridps.wording import counted

_CHECKPOINT_DIR_NAME = re.compile(r"^(damaged-)?ckpt-\d{10}(\.\d+)?$")   # one checkpoint


def inspect_checkpoint(path, level="full"):
    """Summary and verification of one checkpoint directory (or a root's checkpoints).

    A directory is one checkpoint if it holds a ``manifest.json`` entry (file or not) or is
    named ``ckpt-<step>`` / ``damaged-ckpt-<step>``; otherwise it is a root.

    Returns:
        dict: for a checkpoint, ``path, ok, problems, step, world_size, mode, created,
        config_hash, model_hash, num_buckets, model, model_setting, user_model (True: a user
        build function, which commands run only when given as ``--model``), signature
        (``verified``, ``unchecked``: signed but no key here, ``unsigned``; a bad one is a
        problem), tables [{dim, optimizer, rows, candidates, bytes}], dense_variables,
        total_bytes, files``; for a root, ``root, latest,
        checkpoints [...], set_aside`` (damaged checkpoints a resume renamed), ``problems``
        (what is wrong with ``latest``, or no checkpoint at all) and ``ok`` (no problems: the
        checkpoint ``latest`` names is intact).
    """
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path) and not (os.path.lexists(os.path.join(path, MANIFEST))
                                    or _CHECKPOINT_DIR_NAME.match(name)):
        found = [inspect_checkpoint(p, level) for _, p in list_checkpoints(path)]
        latest, problems = _inspect_latest(path, found)
        if not found:
            problems.append(f"no checkpoint (ckpt-<step> directory) under {path}")
        set_aside = sorted(n for n in os.listdir(path) if n.startswith(DAMAGED_PREFIX))
        return {"root": path, "latest": latest, "checkpoints": found, "set_aside": set_aside,
                "problems": problems, "ok": not problems}
    summary = {"path": path, "problems": verify_checkpoint(path, level)}
    try:
        manifest = load_manifest(path)
    except CheckpointError:
        summary["ok"] = False
        return summary
    setting = recorded_model(manifest)
    table_bytes = {}
    for name, entry in manifest["files"].items():
        if "table" in entry:
            table_bytes[entry["table"]] = table_bytes.get(entry["table"], 0) + entry["bytes"]
    summary.update(
        ok=not summary["problems"], step=manifest["step"], world_size=manifest["world_size"],
        mode=manifest["mode"], created=manifest["created"], config_hash=manifest["config_hash"],
        model_hash=manifest["model_hash"], num_buckets=manifest["num_buckets"],
        model=manifest.get("model"), model_setting=setting,
        user_model=setting is not None and is_user_model(setting), signature=manifest["_signature"],
        tables=[{"table": t, "dim": info["dim"], "optimizer": info["optimizer"], "rows": info["rows"],
                 "candidates": info["candidates"], "bytes": table_bytes.get(t, 0),
                 "admission_eviction": info.get("admission_eviction")}
                for t, info in enumerate(manifest["tables"])],
        dense_variables=len(manifest["dense"]["model_variables"]) if manifest.get("dense") else 0,
        total_bytes=manifest["total_bytes"], files=len(manifest["files"]), level=level)
    return summary


def _inspect_latest(root, found):
    """(the name ``latest`` holds or None, problems with it) for a root's checkpoints."""
    path = os.path.join(root, LATEST)
    if not os.path.lexists(path):
        return None, ([f"{path} is missing (resume tries every checkpoint, newest first)"]
                      if found else [])
    if not os.path.isfile(path):
        return None, [f"{path} is not a file (it must be the pointer to the newest checkpoint)"]
    with open(path, errors="replace") as fh:
        latest = fh.read(200).strip()
    if not CKPT_NAME.match(latest):
        return latest, [f"{path} does not name a checkpoint (holds {latest[:60]!r})"]
    named = [c for c in found if os.path.basename(c["path"]) == latest]
    if not named:
        return latest, [f"{path} names {latest}, which does not exist"]
    if not named[0]["ok"]:
        return latest, [f"{path} names {latest}, which is damaged (see its problems above)"]
    return latest, []


_SIGNATURE_TEXT = {
    "verified": "signed, signature verified with HYBRIDPS_SIGNING_KEY_FILE",
    "unchecked": "signed, signature NOT checked (HYBRIDPS_SIGNING_KEY_FILE is not set); its "
                 "checksum detects accidental damage, not a deliberate edit",
    "unsigned": "unsigned: its checksum detects accidental damage, not a deliberate edit "
                "(set HYBRIDPS_SIGNING_KEY_FILE when writing and reading to sign and verify)"}


def _format_summary(summary):
    if "root" in summary:
        lines = [f"{summary['root']}: latest -> {summary['latest']}"]
        lines += [_format_summary(c) for c in summary["checkpoints"]] or ["  no checkpoints"]
        if summary.get("set_aside"):
            lines.append(f"  set aside by a resume (damaged, never pruned): {', '.join(summary['set_aside'])}")
        if summary["problems"]:
            lines.append(f"{summary['root']}: NOT OK")
            lines += [f"  - {p}" for p in summary["problems"]]
        return "\n".join(lines)
    if "step" not in summary:
        return f"{summary['path']}: DAMAGED\n" + "\n".join(f"  - {p}" for p in summary["problems"])
    lines = [f"{summary['path']}: step {summary['step']}, {counted(summary['world_size'], 'rank')}, mode "
             f"{summary['mode']}, {summary['num_buckets']} buckets, {summary['total_bytes']} bytes in "
             f"{summary['files']} files, {summary['dense_variables']} dense variables, created "
             f"{summary['created']}"]
    for t in summary["tables"]:
        policy = t.get("admission_eviction")
        policy_text = (f", min_count {policy['min_count']}, ttl_steps {policy['ttl_steps']}, "
                       f"max_rows {policy['max_rows']} ({policy['eviction']})") if policy else ""
        lines.append(f"  table {t['table']}: dim {t['dim']}, {t['optimizer']}, {t['rows']} rows, "
                     f"{t['candidates']} candidates, {t['bytes']} bytes{policy_text}")
    if summary["model_setting"] is None:
        lines.append("  model: none recorded (tables only)")
    else:
        lines.append(f"  model: {summary['model_setting']}" + (
            " (a user build function: serve, export, evaluate and predict run it only when given "
            "the same one with --model; hybridps never imports it because a manifest names it)"
            if summary["user_model"] else " (built-in)"))
    lines.append("  manifest: " + _SIGNATURE_TEXT[summary["signature"]])
    checked = "every sha256" if summary.get("level") == "full" else "sizes and small files"
    lines.append(f"  verification ({checked}): " + ("OK" if summary["ok"] else "DAMAGED"))
    lines += [f"  - {p}" for p in summary["problems"]]
    return "\n".join(lines)


def add_inspect_arguments(parser):
    """Arguments of ``hybridps inspect DIR``; sets ``func`` to :func:`inspect_main`."""
    parser.add_argument("dir", help="a checkpoint directory or a checkpoint root")
    parser.add_argument("--quick", action="store_true",
                        help="check sizes and small files only (skip the sha256 of row data)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=inspect_main)


def inspect_main(args):
    """``hybridps inspect DIR``: print the summary; exit code 1 if anything is damaged."""
    if not os.path.isdir(args.dir):
        raise CheckpointError(f"{args.dir} is not a directory")
    summary = inspect_checkpoint(args.dir, level="quick" if args.quick else "full")
    print(json.dumps(summary, indent=2, default=json_default) if args.json else _format_summary(summary))
    return 0 if summary["ok"] else 1
