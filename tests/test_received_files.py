"""A checkpoint or export received from elsewhere is data: it never chooses code to run.

A checkpoint and an export whose manifests name a user model file (``received/code/
marker_model.py:build``, which writes ``IMPORTED`` beside itself when imported): ``export``,
``serve``, ``evaluate``, ``predict`` and ``inspect`` never import it; with the operator's own
``--model`` of the same name (``operator/marker_model.py``) the model is rebuilt from the
operator's file, a different ``--model`` is refused naming both. ``train --resume`` runs the
operator's model whatever the manifest says. Manifests: the checksum detects damage but not
a recomputed edit; with ``HYBRIDPS_SIGNING_KEY_FILE`` an edited or unsigned manifest is
refused. The watchdog's predictable state directory: a planted symlink is never followed.
"""
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from hybridps import checkpoint as ckpt
from hybridps._hashtable import EmbeddingHashTable
from hybridps.config import make_config
from hybridps.errors import CheckpointError, ConfigError
from tests.mpi_util import MPI_ENV, REPO

MARKER_MODEL = '''
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "IMPORTED"), "a") as fh:
    fh.write("imported\\n")


def build(schema, config):
    from hybridps.models.deepfm import build as deepfm
    return deepfm(schema, config)
'''
SETTINGS = dict(dim=4, num_fields=3, num_dense=2, hidden=[8], optimizer="adagrad",
                dense_optimizer="adagrad", num_buckets=16, table_groups=[[0, 2], [1]], seed=1,
                min_count=1)


def cli(args, timeout=180, env=None):
    full_env = dict(os.environ, **MPI_ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hybridps.cli"] + [str(a) for a in args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def cli_at_once(commands, timeout=180):
    """Run independent ``hybridps`` commands side by side (each pays its own TensorFlow import:
    together they take about the time of the slowest); [CompletedProcess] in their order."""
    procs = [subprocess.Popen([sys.executable, "-m", "hybridps.cli"] + [str(a) for a in args], cwd=REPO,
                              env=dict(os.environ, **MPI_ENV), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    done = []
    try:
        for args, proc in zip(commands, procs):
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow
    return tensorflow


@pytest.fixture(scope="module")
def received(tmp_path_factory, tf):
    """A checkpoint and an export directory whose manifests name received/code/marker_model.py,
    the operator's own marker_model.py, and a differently named model file."""
    from hybridps.export import DeltaExporter, model_description
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    from hybridps.step import build_on_sample
    base = tmp_path_factory.mktemp("received")
    paths = {}
    for name, folder in (("received", "received/code"), ("operator", "operator"), ("other", "other")):
        os.makedirs(base / folder)
        file_name = "other_model.py" if name == "other" else "marker_model.py"
        (base / folder / file_name).write_text(MARKER_MODEL)
        paths[name] = f"{base / folder / file_name}:build"
        paths[name + "_marker"] = base / folder / "IMPORTED"
    builtin = make_config(overrides=dict(SETTINGS, model="deepfm"))
    named = make_config(overrides=dict(SETTINGS, model=paths["received"]))
    schema = build_schema(builtin)
    tf.keras.utils.set_random_seed(0)
    model = build_on_sample(tf, build_model("deepfm", schema, builtin), schema)
    rng = np.random.default_rng(0)
    tables = []
    for t in range(2):
        table = EmbeddingHashTable(dim=4, optimizer="adagrad", learning_rate=0.1, seed=1, table_id=t)
        keys = np.arange(1, 50, dtype=np.int64) * 7919
        table.lookup_or_insert(keys, step=0)
        table.apply_gradients(keys, rng.standard_normal((len(keys), 4)).astype(np.float32), step=0)
        tables.append(table)
    ckpt.save_checkpoint(base / "ckpt", 3, tables=tables, config=named, model=model)
    exporter = DeltaExporter(base / "exports", tables, model=model, every=1, full_every=1,
                             description=model_description(named, schema), model_hash="run-1")
    exporter.maybe_export(1)
    paths.update(base=base, ckpt=base / "ckpt", exports=base / "exports", model=model)
    return paths


def _never_imported(received):
    assert not os.path.exists(received["received_marker"])


def test_export_and_inspect_never_import_the_model_a_checkpoint_names(received, capsys):
    import argparse
    from hybridps.export import export_saved_model
    with pytest.raises(ConfigError, match="--model path/to/marker_model.py:build"):
        export_saved_model(received["ckpt"], received["base"] / "savedmodel")
    parser = argparse.ArgumentParser()
    ckpt.add_inspect_arguments(parser)
    args = parser.parse_args([str(received["ckpt"])])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "model: " + received["received"] in text and "--model" in text
    summary = ckpt.inspect_checkpoint(str(received["ckpt"] / "ckpt-0000000003"))
    assert summary["ok"] and summary["user_model"] and summary["signature"] == "unsigned"
    _never_imported(received)
    assert not os.path.exists(received["base"] / "savedmodel")


def test_export_runs_the_operators_matching_model_and_refuses_another(received, tf):
    from hybridps.export import export_saved_model
    for wrong in (received["other"], "deepfm"):
        with pytest.raises(ConfigError) as refused:
            export_saved_model(received["ckpt"], received["base"] / "wrong", model=wrong)
        assert wrong in str(refused.value) and received["received"] in str(refused.value)
    assert not os.path.exists(received["other_marker"])
    result = export_saved_model(received["ckpt"], received["base"] / "savedmodel-ok",
                                model=received["operator"])
    assert result["step"] == 3 and os.path.exists(received["operator_marker"])
    loaded = tf.saved_model.load(str(received["base"] / "savedmodel-ok"))
    for served, trained in zip(loaded.dense_variables, received["model"].variables):
        np.testing.assert_array_equal(served.numpy(), trained.numpy())
    _never_imported(received)


def test_serve_refuses_an_export_of_an_unnamed_user_model_and_serves_the_operators(received):
    from hybridps.serving.live import LiveModel
    live = LiveModel(received["exports"])
    assert live.catch_up() is None
    assert "--model path/to/marker_model.py:build" in live.follower.last_refusal.reason
    live = LiveModel(received["exports"], model=received["other"])
    assert live.catch_up() is None
    reason = live.follower.last_refusal.reason
    assert received["other"] in reason and received["received"] in reason
    _never_imported(received)
    live = LiveModel(received["exports"], model=received["operator"])
    assert live.catch_up().sequence == 1 and live.follower.last_refusal is None
    _never_imported(received)


def test_serve_export_evaluate_predict_take_model_on_the_command_line():
    import argparse
    from hybridps.export import add_export_arguments
    from hybridps.inference import add_evaluate_arguments, add_predict_arguments
    from hybridps.serving.server import add_serve_arguments
    for add, required in ((add_serve_arguments, ["--model-dir", "d"]),
                          (add_export_arguments, ["--checkpoint", "c", "--out", "o"]),
                          (add_evaluate_arguments, ["--checkpoint", "c", "--data", "synthetic"]),
                          (add_predict_arguments, ["--checkpoint", "c", "--data", "x", "--out", "o"])):
        parser = argparse.ArgumentParser()
        add(parser)
        assert parser.parse_args(required + ["--model", "m.py:build"]).model == "m.py:build"
        assert parser.parse_args(required).model is None


@pytest.mark.slow
def test_evaluate_and_predict_refuse_an_unnamed_user_model_and_run_the_operators(received, tmp_path):
    refused = [command + ["--checkpoint", received["ckpt"]] for command in (
        ["evaluate", "--data", "synthetic"],
        ["predict", "--data", "synthetic", "--out", tmp_path / "p.parquet"],
        ["evaluate", "--data", "synthetic", "--model", received["other"]])]
    operators = ["evaluate", "--checkpoint", received["ckpt"], "--data", "synthetic", "--batches", "2",
                 "--batch-size", "64", "--model", received["operator"]]
    *refusals, proc = cli_at_once(refused + [operators])      # four processes, one import time
    for refusal in refusals:
        assert refusal.returncode != 0 and "Traceback" not in refusal.stderr, refusal.stderr
        assert "--model" in refusal.stderr and received["received"] in refusal.stderr
    _never_imported(received)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checkpoint_step"] == 3
    _never_imported(received)


@pytest.mark.slow
def test_train_resume_runs_the_operators_model_whatever_the_manifest_names(received, tmp_path):
    small = ["--batch-size", "16", "--hidden", "8", "--dim", "4", "--vocab-size", "300",
             "--num-fields", "3", "--num-dense", "2", "--warmup-steps", "1", "--no-progress",
             "--checkpoint-dir", tmp_path / "ckpt"]
    first = cli(["train", "--steps", "2"] + small)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "ckpt" / "ckpt-0000000002" / "manifest.json"
    manifest = ckpt.load_manifest(str(path.parent))
    manifest["config"]["model"] = received["received"]            # edited, checksum recomputed
    path.write_bytes(ckpt.manifest_json_bytes(manifest))
    resumed = cli(["train", "--steps", "4", "--resume", "--metrics-out", tmp_path / "m.json"] + small)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    with open(tmp_path / "m.json") as fh:
        assert json.load(fh)["model"] == "deepfm"
    _never_imported(received)


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


def test_without_a_key_the_checksum_catches_damage_but_not_a_recomputed_edit(tmp_path, monkeypatch,
                                                                             capsys):
    import argparse
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
    assert summary["model_setting"] is None and not summary["user_model"]     # tables only
    parser = argparse.ArgumentParser()
    ckpt.add_inspect_arguments(parser)
    args = parser.parse_args([path])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "model: none recorded" in text and "unsigned: its checksum detects accidental damage" in text


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


def test_an_unreadable_signing_key_stops_a_command_at_its_start(tmp_path):
    proc = cli(["inspect", tmp_path], env={"HYBRIDPS_SIGNING_KEY_FILE": str(tmp_path / "missing")},
               timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"HYBRIDPS_SIGNING_KEY_FILE={tmp_path / 'missing'}: cannot read the signing key" in proc.stderr


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


# ---------------------------------------------------------------------------- watchdog state dir
def _watchdog_writing_into(monkeypatch, tmp_root, job_key="job1"):
    from hybridps import watchdog
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    default = os.path.join(tempfile.gettempdir(), f"hybridps-watchdog-{job_key}")
    dog = watchdog._Watchdog(0, 2, lambda code: None, default, job_key)
    dog.owns_dir = True
    return dog, default


def test_a_planted_symlink_as_the_watchdog_directory_is_not_followed(tmp_path, monkeypatch, capsys):
    tmp_root, outside = tmp_path / "tmp", tmp_path / "outside"
    tmp_root.mkdir()
    outside.mkdir()
    dog, default = _watchdog_writing_into(monkeypatch, tmp_root)
    os.symlink(outside, default)
    dog._write_state([], time.monotonic())
    assert os.listdir(outside) == []
    assert dog.state_dir != default and os.path.dirname(dog.state_dir) == str(tmp_root)
    assert stat.S_IMODE(os.lstat(dog.state_dir).st_mode) == 0o700
    with open(os.path.join(dog.state_dir, "rank0.json")) as fh:
        assert json.load(fh)["rank"] == 0
    assert default in capsys.readouterr().err
    dog.remove_state()
    assert os.listdir(outside) == [] and not os.path.exists(dog.state_dir)


def test_a_writable_watchdog_directory_is_not_used(tmp_path, monkeypatch):
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    dog, default = _watchdog_writing_into(monkeypatch, tmp_root)
    os.mkdir(default)
    os.chmod(default, 0o777)
    dog._write_state([], time.monotonic())
    assert os.listdir(default) == [] and dog.state_dir != default


def test_planted_symlinks_at_the_state_file_names_are_not_followed(tmp_path, monkeypatch):
    tmp_root, victim = tmp_path / "tmp", tmp_path / "victim.txt"
    tmp_root.mkdir()
    victim.write_text("precious")
    dog, default = _watchdog_writing_into(monkeypatch, tmp_root)
    os.mkdir(default, 0o700)
    for name in ("rank0.json.tmp", "rank0.json"):
        os.symlink(victim, os.path.join(default, name))
    dog._write_state([], time.monotonic())
    assert victim.read_text() == "precious" and dog.state_dir == default
    state_file = os.path.join(default, "rank0.json")
    assert not os.path.islink(state_file)
    with open(state_file) as fh:
        assert json.load(fh)["rank"] == 0
    dog.remove_state()
    assert victim.read_text() == "precious"
