"""A checkpoint or export received from elsewhere is data.

Manifests: the checksum detects damage but not a recomputed edit; with
``HYBRIDPS_SIGNING_KEY_FILE`` an edited or unsigned manifest is refused.
"""
import hashlib
import hmac
import json
import os

import numpy as np
import pytest

from hybridps import checkpoint as ckpt
from hybridps._hashtable import EmbeddingHashTable
from hybridps.errors import CheckpointError, ConfigError


# ---------------------------------------------------------------------------- checksum, signature
def _small_checkpoint(root):
    table = EmbeddingHashTable(dim=4, optimizer="sgd", learning_rate=0.1, seed=1, table_id=0)
    table.lookup_or_insert(np.arange(1, 30, dtype=np.int64), step=0)
    ckpt.save_checkpoint(root, 1, tables=[table], num_buckets=16)
    return os.path.join(root, "ckpt-0000000001")


def _edit(path, key_file=None, monkeypatch=None):
    """Change the manifest's step and write it back with a recomputed checksum (and HMAC when
    ``key_file``): what anyone who can edit the file can do."""
    with open(os.path.join(path, "manifest.json")) as fh:
        manifest = json.load(fh)
    manifest["step"] = 99
    if key_file is None:
        monkeypatch.delenv("HYBRIDPS_SIGNING_KEY_FILE", raising=False)
    else:
        monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(key_file))
    with open(os.path.join(path, "manifest.json"), "wb") as fh:
        fh.write(ckpt.manifest_json_bytes(manifest))
    return manifest


def test_without_a_key_the_checksum_catches_damage_but_not_a_recomputed_edit(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDPS_SIGNING_KEY_FILE", raising=False)
    path = _small_checkpoint(tmp_path / "ckpt")
    with open(os.path.join(path, "manifest.json")) as fh:
        raw = json.load(fh)
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert raw["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert "manifest_hmac_sha256" not in raw
    _edit(path, monkeypatch=monkeypatch)
    summary = ckpt.inspect_checkpoint(path)
    assert summary["ok"] and summary["step"] == 99 and summary["signature"] == "unsigned"


def test_with_a_key_an_edited_or_unsigned_manifest_is_refused(tmp_path, monkeypatch):
    key_file, other_key = tmp_path / "key", tmp_path / "other-key"
    key_file.write_bytes(b"operator secret\n")
    other_key.write_bytes(b"someone else\n")
    monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(key_file))
    path = _small_checkpoint(tmp_path / "ckpt")
    with open(os.path.join(path, "manifest.json")) as fh:
        raw = json.load(fh)
    body = {k: v for k, v in raw.items() if k not in ("manifest_sha256", "manifest_hmac_sha256")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert raw["manifest_hmac_sha256"] == hmac.new(b"operator secret\n", canonical,
                                                   hashlib.sha256).hexdigest()
    assert ckpt.load_manifest(path)["_signature"] == "verified"
    assert ckpt.inspect_checkpoint(path)["signature"] == "verified"

    for signer, expected in ((other_key, "bad signature"), (None, "not signed")):
        _edit(path, signer, monkeypatch)
        monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(key_file))
        with pytest.raises(CheckpointError, match=expected):
            ckpt.load_manifest(path)
        summary = ckpt.inspect_checkpoint(path)
        assert not summary["ok"] and expected in summary["problems"][0]
    # a signed manifest read without the key: accepted, reported as not checked
    _edit(path, key_file, monkeypatch)
    monkeypatch.delenv("HYBRIDPS_SIGNING_KEY_FILE")
    assert ckpt.inspect_checkpoint(path)["signature"] == "unchecked"
    monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        ckpt.load_manifest(path)


def test_a_signed_export_edited_with_a_recomputed_checksum_is_refused(tmp_path, monkeypatch):
    from hybridps.export import load_export, write_delta
    key_file = tmp_path / "key"
    key_file.write_bytes(b"operator secret")
    monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(key_file))
    table = EmbeddingHashTable(dim=4, optimizer="sgd", learning_rate=0.1, seed=1, table_id=0)
    table.lookup_or_insert(np.arange(1, 30, dtype=np.int64), step=0)
    path = write_delta(tmp_path / "exports", 0, 1, tables=[table])
    assert load_export(path).to_step == 1
    _edit(path, None, monkeypatch)
    monkeypatch.setenv("HYBRIDPS_SIGNING_KEY_FILE", str(key_file))
    with pytest.raises(CheckpointError, match="not signed"):
        load_export(path)
