"""Following an export directory: which export to apply next, loaded and verified, or refused.

What lives here: :class:`ServedVersion` (what a server holds: sequence, step, position, when
applied), :class:`Refusal`, and :class:`ExportFollower`, which looks at the directory
(hybridps.export.delta's layout: full exports and deltas on one sequence) and returns the next
export to apply, loaded and sha256-verified. What does not: applying it (hybridps.serving.live,
between model calls), HTTP (hybridps.serving.server), the file format (hybridps.export.delta).

Rules, for a server holding version (sequence) ``s`` at step ``k``:

* nothing held yet: the newest full export that verifies;
* the export numbered ``s + 1``: a delta is taken when it verifies, has the held model's hash
  and ``from_step == k``; a full export when it verifies;
* otherwise the newest full export after ``s`` that verifies (it needs no earlier delta);
* anything else is refused and reported once per (export, reason): a damaged export
  (checksum, missing or truncated file), a delta after a gap in the sequence, a delta whose
  ``from_step`` is not the held step, another model, a full export of a user model that the
  operator did not name with ``--model`` (an export never chooses code to run:
  hybridps.models.registry.model_to_build). The server keeps its version; once the
  gap is filled, the damaged export rewritten or a newer full export lands, it goes on;
* an export that appears with a sequence at or below ``s`` (the directory was emptied and
  refilled by another run, or an old export copied back) is stale: the server keeps the newer
  version it holds and reports it once (``Refusal.stale``).

A refused export is not read and hashed again on every poll: it is retried when one of its
files changes (size or modification time).
"""
import dataclasses
import os
import time

from hybridps.checkpoint.format import recorded_model
from hybridps.errors import CheckpointError, ConfigError
from hybridps.export.delta import check_applicable, list_exports, load_export
from hybridps.models.registry import model_to_build


@dataclasses.dataclass(frozen=True)
class ServedVersion:
    """The version a server holds: the export last applied."""
    sequence: int
    step: int
    position: object
    applied_at: float          # unix time of the apply
    kind: str                  # "full" or "delta"
    export: str                # the export's directory name
    model_hash: str


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An export the server did not apply, and why."""
    export: str
    sequence: int
    reason: str
    at: float
    stale: bool = False        # older than the served version (not damaged, not out of order)

    def to_dict(self):
        return dataclasses.asdict(self)


def _files_signature(path):
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)))
    except OSError:
        return None


def _identity(path):
    """An export directory's inode and modification time: a copy under an old name differs."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class ExportFollower:
    """Chooses, loads and verifies the next export of ``root`` (module doc).

    Args:
        root: the export directory (``--delta-export-dir`` of the training run).
        on_refusal: called with each new :class:`Refusal` (logging, metrics).
        model: the operator's ``--model`` (None: only exports of built-in models are served).
    """

    def __init__(self, root, on_refusal=None, model=None):
        self.root = os.path.abspath(root)
        self.model = model
        self.on_refusal = on_refusal or (lambda refusal: None)
        self.refusals = []
        self._reported = set()              # (export name, reason)
        self._damaged = {}                  # refused export name -> (files signature, reason)
        self._listed = None                 # {export name: identity} of the previous look

    @property
    def last_refusal(self):
        return self.refusals[-1] if self.refusals else None

    @property
    def stale_refusals(self):
        return [r for r in self.refusals if r.stale]

    def next_export(self, held, module=None):
        """The next export to apply onto ``held`` (a ServedVersion, or None: nothing held yet),
        as a LoadedExport, or None when there is nothing (good) to apply now.

        Args:
            held: the served version.
            module: the serving module holding it (its model hash and tables are checked).
        """
        entries = list_exports(self.root)
        listed = {e.name: _identity(e.path) for e in entries}
        appeared = [e for e in entries
                    if self._listed is not None and self._listed.get(e.name) != listed[e.name]]
        self._listed = listed
        if held is not None:
            self._refuse_stale(appeared, held)
        if held is None:
            for entry in reversed([e for e in entries if e.kind == "full"]):
                loaded = self._load(entry)
                if loaded is not None:
                    return loaded
            return None
        newer = [e for e in entries if e.sequence > held.sequence]
        following = [e for e in newer if e.sequence == held.sequence + 1]
        for entry in following:
            loaded = self._load(entry)
            if loaded is None:
                continue
            if entry.kind == "full":
                return loaded
            try:
                if module is not None:
                    check_applicable(module, loaded)
                elif loaded.from_step != held.step:
                    raise CheckpointError(f"it starts at step {loaded.from_step}, the server holds "
                                          f"step {held.step}")
            except CheckpointError as exc:
                self._damaged[entry.name] = (_files_signature(entry.path), str(exc))
                self._refuse(entry, f"out of order: {exc}")
                continue
            return loaded
        for entry in reversed([e for e in newer if e.kind == "full" and e not in following]):
            loaded = self._load(entry)
            if loaded is not None:
                return loaded
        if newer and not following:
            first = newer[0]
            self._refuse(first, f"out of order: sequence {first.sequence} follows the held "
                                f"{held.sequence}; export {held.sequence + 1} is missing")
        return None

    def _refuse_stale(self, appeared, held):
        for entry in appeared:
            if entry.sequence <= held.sequence and entry.name != held.export:
                self._refuse(entry, f"stale: {entry.kind} export {entry.sequence} (step {entry.to_step}) "
                                    f"appeared, not newer than the served version {held.sequence} "
                                    f"(step {held.step}, {held.export}); keeping the served one. Was "
                                    f"the directory refilled by another run? Restart the server to "
                                    f"serve what it holds now", stale=True)

    def _load(self, entry):
        signature = _files_signature(entry.path)
        damaged = self._damaged.get(entry.name)
        if damaged is not None and damaged[0] == signature:
            return None
        try:
            loaded = load_export(entry.path)
            if loaded.sequence != entry.sequence or loaded.kind != entry.kind:
                raise CheckpointError(f"{entry.path}: the manifest says {loaded.kind} "
                                      f"{loaded.sequence}, the name {entry.kind} {entry.sequence}")
        except CheckpointError as exc:
            self._damaged[entry.name] = (signature, str(exc))
            self._refuse(entry, f"damaged: {exc}")
            return None
        if loaded.kind == "full":
            try:
                model_to_build(recorded_model(loaded.manifest), self.model, entry.path)
            except ConfigError as exc:
                self._damaged[entry.name] = (signature, str(exc))
                self._refuse(entry, f"not served: {exc}")
                return None
        self._damaged.pop(entry.name, None)
        return loaded

    def _refuse(self, entry, reason, stale=False):
        if (entry.name, reason) in self._reported:
            return
        self._reported.add((entry.name, reason))
        refusal = Refusal(entry.name, entry.sequence, reason, time.time(), stale)
        self.refusals.append(refusal)
        self.on_refusal(refusal)
