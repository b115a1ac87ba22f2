"""Config validation, YAML + flags, the cross-rank config check, the CLI, and the metrics math.

Single-process tests except the config-mismatch one, which starts two ranks with different
flags (MPMD mpirun) and expects a clear error instead of a hang.
"""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from hybridps.config import Sync, config_hash, make_config
from hybridps.errors import ConfigError

from hybridps.metrics import AUCAccumulator
from tests.mpi_util import MPI_ENV, REPO, mpirun_available



def table_groups(config):
    """Field indices of each table of the Criteo preset (hybridps.schema)."""
    from hybridps.schema import criteo_field_groups
    return criteo_field_groups(config, config.num_fields)

def test_defaults_are_valid_and_typed():
    c = make_config()
    assert c.sync is Sync.BSP and c.model == "deepfm" and c.batch_size == 512


def test_the_dense_default_is_adam_and_a_null_dense_optimizer_follows_the_sparse_one(tmp_path):
    # docs/benchmarks.md, "Accuracy on public data": dense Adam 0.001 is the default; a YAML
    # (or a recorded config: checkpoints written before that default) with null keeps meaning
    # the sparse optimizer and its rate
    c = make_config()
    assert (c.effective_dense_optimizer, c.effective_dense_learning_rate) == ("adam", 0.001)
    assert (c.optimizer, c.learning_rate) == ("adagrad", 0.05)
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: sgd\nlearning_rate: 0.2\ndense_optimizer: null\ndense_learning_rate: null\n")
    c = make_config(str(path))
    assert (c.effective_dense_optimizer, c.effective_dense_learning_rate) == ("sgd", 0.2)


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: dcn\nbatch_size: 128\nhidden: [64, 32]\nlearning_rate: 0.1\n")
    c = make_config(str(path), {"batch_size": 256, "learning_rate": None})
    assert (c.model, c.batch_size, c.hidden, c.learning_rate) == ("dcn", 256, [64, 32], 0.1)


@pytest.mark.parametrize("overrides, field", [
    ({"model": "xgboost"}, "model"),
    ({"steps": -1}, "steps"),          # 0 is valid: until the stream ends or SIGTERM
    ({"batch_size": "many"}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"sync": "eventually"}, "sync"),
    ({"staleness": 2}, "staleness"),          # staleness > 0 with bsp
    ({"dense_staleness": 1}, "dense_staleness"),                   # only with sync=ssp
    ({"dense_staleness": 1, "sync": "asp"}, "dense_staleness"),    # asp: max_inflight bounds it
    ({"dense_staleness": 1, "sync": "ssp", "mode": "ps"}, "dense_staleness"),
    ({"dense_staleness": -1, "sync": "ssp"}, "dense_staleness"),
    ({"hidden": "a,b"}, "hidden"),
    ({"table_groups": [[0, 1]], "num_fields": 3}, "table_groups"),
    ({"dim": 2.5}, "dim"),
    ({"adam_catch_up": True}, "adam_catch_up"),                   # the default tables are adagrad
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        make_config(overrides=overrides)


def test_adam_catch_up_reaches_the_adam_tables_only():
    from hybridps.schema import build_schema
    from hybridps.sparse.shard import OwnerShard
    features = {"label": "label", "sparse": [{"name": "a", "table": "a"}, {"name": "b", "table": "b"}],
                "tables": {"a": {"optimizer": "adam"}, "b": {"optimizer": "adagrad"}}}
    c = make_config(overrides={"features": features, "adam_catch_up": True})   # valid: table a
    tables = OwnerShard(build_schema(c), seed=0, adam_catch_up=c.adam_catch_up).tables
    assert [(t.optimizer, t.adam_catch_up) for t in tables] == [("adam", True), ("adagrad", False)]


def test_unknown_yaml_field_is_reported_with_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle: deepfm\n")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) 'modle' \(did you mean "
                                          r"'mode' or 'model'\?\) in .*c.yaml"):
        make_config(str(path))


TEST_HOOKS = {"fail_at_step", "fail_rank", "loader_delay_ms", "delay_rank"}   # hybridps.testing_hooks


def test_an_unknown_field_suggests_the_closest_and_lists_only_user_fields(tmp_path):
    import dataclasses
    from hybridps.config import TrainConfig
    path = tmp_path / "c.yaml"
    path.write_text("optimiser: adam\nbatch-size: 64\nqwxz: 1\ncheckpoint: /c\n")
    with pytest.raises(ConfigError) as caught:
        make_config(str(path))
    message = str(caught.value)
    guesses = dict(re.findall(r"'([\w-]+)' \(did you mean ([^?]*)\?\)", message))
    assert guesses.keys() == {"batch-size", "checkpoint", "optimiser"}      # qwxz: nothing close
    assert guesses["batch-size"] == "'batch_size'" and guesses["optimiser"] == "'optimizer'"
    assert guesses["checkpoint"].startswith("'checkpoint_dir', ")           # the closest first
    assert set(re.findall(r"'(\w+)'", guesses["checkpoint"])) == {"checkpoint_dir", "checkpoint_every",
                                                                   "keep_checkpoints"}
    assert message.startswith("unknown config field(s) 'batch-size' (") and f"qwxz' in {path};" in message
    listed = message.split("known fields: ")[1].split(", ")
    assert set(listed) == {f.name for f in dataclasses.fields(TrainConfig)} - TEST_HOOKS
    # a test hook is not suggested either: it is no config field (hybridps.testing_hooks)
    with pytest.raises(ConfigError) as caught:
        make_config(overrides={"fail_at_stepp": 3})
    assert "did you mean" not in str(caught.value)
    for hook in TEST_HOOKS:
        with pytest.raises(ConfigError, match=rf"unknown config field\(s\) '{hook}'"):
            make_config(overrides={hook: 1})


def test_config_differences_leave_out_where_a_run_writes():
    from hybridps.config import training_differences
    base = make_config(overrides={"checkpoint_dir": "/a"})
    elsewhere = make_config(overrides={"checkpoint_dir": "/b", "metrics_out": "/m.json", "resume": True,
                                       "tensorboard_dir": "/tb", "progress": False, "dump_state": "/d",
                                       "delta_export_dir": "/x", "delta_every": 5, "log_every": 3})
    assert training_differences(elsewhere, base.to_dict()) == []
    changed = make_config(overrides={"checkpoint_dir": "/b", "learning_rate": 0.2, "seed": 4})
    assert training_differences(changed, base.to_dict()) == ["learning_rate", "seed"]


def _resume_messages(config):
    """A tables-only resume from ``config.checkpoint_dir`` in one process, as the Trainer does:
    its log lines."""
    from hybridps import checkpoint as ckpt
    from hybridps._hashtable import EmbeddingHashTable
    from hybridps.backends.base import BackendState
    from hybridps.comm import SingleProcessComm
    from hybridps.schema import build_schema
    table = EmbeddingHashTable(dim=4, optimizer="adagrad", learning_rate=0.05, seed=5, table_id=0, min_count=1)
    messages = []
    manager = ckpt.CheckpointManager(config, build_schema(config), SingleProcessComm(), log=messages.append)
    state = BackendState(tables=[table], shard=(0, 1), model=None, dense_optimizer=None)
    assert manager.resume(state)[0] == 7
    return messages


def test_a_resume_notes_only_training_differences_and_counts_one_rank(tmp_path):
    from hybridps import checkpoint as ckpt
    from hybridps._hashtable import EmbeddingHashTable
    tables_only = dict(dim=4, optimizer="adagrad", num_fields=1, num_dense=0, num_buckets=32)
    table = EmbeddingHashTable(dim=4, optimizer="adagrad", learning_rate=0.05, seed=5, table_id=0, min_count=1)
    table.lookup_or_insert(np.arange(1, 50, dtype=np.int64), step=1)
    saved = make_config(overrides=dict(tables_only, checkpoint_dir=str(tmp_path)))
    ckpt.save_checkpoint(str(tmp_path), 7, tables=[table], config=saved)
    # the directory named another way, a metrics file, --resume: where the run writes, not what it trains
    outputs = dict(tables_only, checkpoint_dir=str(tmp_path) + "/", resume=True,
                   metrics_out=str(tmp_path / "m.json"), log_every=5)
    messages = _resume_messages(make_config(overrides=outputs))
    assert not any("config differs" in m for m in messages), messages
    assert "saved on 1 rank, restored on 1 rank)" in messages[-1]
    notes = [m for m in _resume_messages(make_config(overrides=dict(outputs, learning_rate=0.2)))
             if "config differs" in m]
    assert len(notes) == 1 and "differs from the checkpoint's in learning_rate (" in notes[0]


def test_rank_counts_are_worded_in_the_right_number():
    from hybridps import launch
    from hybridps.wording import counted
    assert (counted(1, "rank"), counted(0, "rank"), counted(3, "rank")) == ("1 rank", "0 ranks", "3 ranks")
    env = launch.Environment(cores=1, is_root=True, mpi_flavor="openmpi", mpirun="/usr/bin/mpirun",
                             horovodrun=None, srun=None, python="/venv/bin/python")
    notes = launch.build_plan(["/venv/bin/python", "-m", "hybridps.cli", "train"], env, num_ranks=1).notes
    assert any(n.startswith("1 rank per node on 1 usable core:") for n in notes), notes


def test_ps_mode_needs_a_worker():
    from hybridps.backends.ps.protocol import PSRoles
    with pytest.raises(ConfigError, match="'num_servers': 2 servers leave no worker among 2 ranks"):
        PSRoles(2, 2)


def test_table_groups_from_layout():
    assert table_groups(make_config(overrides={"num_fields": 3})) == [[0, 1, 2]]
    assert table_groups(make_config(overrides={"num_fields": 3, "table_layout": "per_field"})) == [[0], [1], [2]]
    assert table_groups(make_config(overrides={"num_fields": 3, "table_groups": [[2, 0], [1]]})) == [[2, 0], [1]]


def test_config_hash_ignores_per_rank_fields_only():
    base = make_config()
    assert config_hash(base) == config_hash(make_config(overrides={"metrics_out": "/tmp/x", "progress": False}))
    assert config_hash(base) != config_hash(make_config(overrides={"seed": 1}))


def test_histogram_auc_matches_exact_pairwise_auc():
    rng = np.random.default_rng(0)
    labels = (rng.random(3000) < 0.3).astype(np.float32)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.15), 0, 1)
    acc = AUCAccumulator()
    acc.update(labels[:1000], scores[:1000])
    acc.update(labels[1000:], scores[1000:])
    pos, neg = scores[labels == 1], scores[labels == 0]
    exact = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(AUCAccumulator.auc_from_histograms(acc.positives, acc.negatives) - exact) < 1e-3


def _cli(args, timeout=180):
    env = dict(__import__("os").environ, **MPI_ENV)
    return subprocess.run([sys.executable, "-m", "hybridps.cli"] + [str(a) for a in args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_single_process_train_without_mpirun_writes_metrics_and_shows_admission_and_eviction(tmp_path):
    """One `hybridps train` process (TensorFlow's import is its main cost) for both: the metrics
    file of a run without mpirun, and a row budget (lru, ttl) and an admission threshold at work
    in its counters."""
    out = tmp_path / "m.json"
    proc = _cli(["train", "--model", "dcn", "--steps", "12", "--batch-size", "256", "--hidden", "32",
                 "--warmup-steps", "2", "--no-progress", "--max-rows", "3000", "--eviction", "lru",
                 "--ttl-steps", "4", "--min-count", "2", "--vocab-size", "5000", "--metrics-out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    for key in ("steps", "ranks", "global_batch_size", "samples_per_s", "final_loss", "auc", "mode", "sync"):
        assert key in metrics
    assert (metrics["steps"], metrics["ranks"], metrics["global_batch_size"]) == (12, 1, 256)
    assert isinstance(metrics["samples_per_s"], float) and math.isfinite(metrics["samples_per_s"])
    assert metrics["samples_per_s"] >= 0 and 0 <= metrics["auc"] <= 1
    assert metrics["exchange"]["keys_sent_per_step"] > 0 and sum(metrics["table_rows"]) > 0
    assert json.loads(proc.stdout)["final_loss"] == pytest.approx(metrics["final_loss"])
    counters = metrics["table_counters"][0]
    assert metrics["table_rows"][0] <= 3000                 # one rank: the budget holds globally
    assert counters["evicted_rows"] > 0
    assert counters["dropped_unadmitted_grads"] > 0         # keys seen once read zeros, get no update
    assert counters["admitted_keys"] - counters["evicted_rows"] == metrics["table_rows"][0]


def _listed_commands(help_text, title):
    """{name: summary} of the lines under ``title:`` of an argparse help text (to the next blank line)."""
    lines = help_text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    parsed = [re.fullmatch(r"  (\S+) {2,}(\S.*)", line) for line in lines]
    assert all(parsed), lines                    # one line each: a name, then its summary
    return {m.group(1): m.group(2) for m in parsed}


def _registered_commands(parser):
    import argparse
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("columns", ["80", "200"])
def test_help_lists_every_registered_command_on_one_clean_line(monkeypatch, columns):
    from hybridps.cli import BENCH_RUNNERS, build_parser
    monkeypatch.setenv("COLUMNS", columns)
    parser = build_parser()
    commands = _registered_commands(parser)
    assert {"train", "bench", "prepare-data", "serve", "export"} <= set(commands)
    helps = {"commands": parser.format_help(), "runners": commands["bench"].format_help()}
    for text in helps.values():
        assert "``" not in text and not any(line.rstrip().endswith("|") for line in text.splitlines())
    listed = _listed_commands(helps["commands"], "commands")
    assert list(listed) == list(commands)
    runners = _listed_commands(helps["runners"], "runners")
    assert list(runners) == list(_registered_commands(commands["bench"])) == [n for n, _ in BENCH_RUNNERS]


def test_no_progress_hides_the_step_lines_but_not_the_evaluations(tmp_path):
    proc = _cli(["train", "--model", "dcn", "--steps", "4", "--batch-size", "64", "--hidden", "16",
                 "--dim", "4", "--warmup-steps", "1", "--log-every", "1", "--no-progress",
                 "--eval-data", "synthetic", "--eval-every", "2", "--eval-batches", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^eval after step (\d+): auc ", proc.stderr, re.M) == ["2", "4"]
    assert not re.search(r"^step \d+/4 rank-0 loss", proc.stderr, re.M)
    assert json.loads(proc.stdout)["eval"]["step"] == 4


def test_cli_reports_config_errors_without_traceback():
    proc = _cli(["train", "--steps", "-1"])
    assert proc.returncode == 2
    assert "error: config field 'steps'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.mpi
def test_ranks_with_different_configs_stop_with_a_clear_message(tmp_path):
    if not mpirun_available():
        pytest.skip("mpirun not on PATH")
    env = dict(__import__("os").environ, **MPI_ENV)
    common = ["-m", "hybridps.cli", "train", "--steps", "3", "--batch-size", "32", "--no-progress"]
    command = (["mpirun", "--oversubscribe", "-np", "1", sys.executable] + common + ["--seed", "1", ":",
               "-np", "1", sys.executable] + common + ["--seed", "2"])
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ranks [1] run a different effective config than rank 0" in proc.stderr


# ---------------------------------------------------------------- per-table admission and eviction
def table_policy(config, table):
    """Table ``table``'s admission and eviction in the Criteo preset's schema."""
    from hybridps.schema import build_schema
    return build_schema(config).tables[table].policy()


def test_table_settings_from_yaml_and_json_override_the_global_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("table_layout: per_field\nnum_fields: 4\nmax_rows: 500\n"
                    "table_settings:\n  1: {max_rows: 10, eviction: lru}\n  3: {min_count: 4}\n")
    config = make_config(str(path))
    assert table_policy(config, 0) == {"min_count": 1, "ttl_steps": 0, "max_rows": 500, "eviction": "lfu"}
    assert table_policy(config, 1) == {"min_count": 1, "ttl_steps": 0, "max_rows": 10, "eviction": "lru"}
    assert table_policy(config, 3)["min_count"] == 4 and table_policy(config, 3)["max_rows"] == 500
    same = make_config(overrides={"table_layout": "per_field", "num_fields": 4, "max_rows": 500,
                                  "table_settings": '{"1": {"max_rows": 10, "eviction": "lru"}, '
                                                    '"3": {"min_count": "4"}}'})
    assert same.table_settings == config.table_settings
    assert config_hash(same) == config_hash(config)
    # the dict form survives a JSON round trip (checkpoint manifests store the config as JSON)
    again = make_config(overrides=json.loads(json.dumps(config.to_dict())))
    assert again.table_settings == config.table_settings


@pytest.mark.parametrize("settings, message", [
    ('{"4": {"max_rows": 1}}', "table(s) [4] do not exist: this layout has 4 table(s)"),
    ('{"0": {"maxrows": 1}}', "table 0: unknown setting(s) ['maxrows']"),
    ('{"0": {"max_rows": -1}}', "'table_settings.0.max_rows': -1 is invalid"),
    ('{"0": {"eviction": "fifo"}}', "'table_settings.0.eviction': 'fifo' is invalid"),
    ('{"0": {"min_count": "x"}}', "table 0: config field 'min_count': expected int"),
    ('{"zero": {}}', "'zero' is not a table of this layout (table_layout=per_field, table_groups=None); "
                     "its tables are C1, C2, C3, C4"),
    ('{not json', "'table_settings': not valid JSON"),
])
def test_bad_table_settings_say_what_and_where(settings, message):
    with pytest.raises(ConfigError) as info:
        make_config(overrides={"table_layout": "per_field", "num_fields": 4, "table_settings": settings})
    assert message in str(info.value)


@pytest.mark.slow
def test_per_table_admission_and_eviction_during_training(tmp_path):
    """Table 0 has a row budget (lru), table 1 an admission threshold, tables 2-3 neither:
    the counters of each table show its own policy only, and the checkpoint records them."""
    out, ckpt_dir = tmp_path / "m.json", tmp_path / "ckpt"
    settings = {"0": {"max_rows": 40, "eviction": "lru"}, "1": {"min_count": 3}}
    proc = _cli(["train", "--steps", "10", "--batch-size", "128", "--hidden", "8", "--warmup-steps", "1",
                 "--no-progress", "--table-layout", "per_field", "--num-fields", "4", "--num-dense", "2",
                 "--vocab-size", "3000", "--table-settings", json.dumps(settings),
                 "--checkpoint-dir", ckpt_dir, "--metrics-out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    counters, rows = metrics["table_counters"], metrics["table_rows"]
    assert rows[0] <= 40 < rows[2] and counters[0]["evicted_rows"] > 0
    assert counters[1]["dropped_unadmitted_grads"] > 0 and counters[1]["evicted_rows"] == 0
    for t in (2, 3):
        assert counters[t]["evicted_rows"] == 0 and counters[t]["dropped_unadmitted_grads"] == 0
    assert counters[0]["dropped_unadmitted_grads"] == 0
    for t in range(4):
        assert counters[t]["admitted_keys"] - counters[t]["evicted_rows"] == rows[t]
    assert metrics["table_policies"][0]["max_rows"] == 40 and metrics["table_policies"][1]["min_count"] == 3
    from hybridps import checkpoint
    manifest = checkpoint.load_manifest(checkpoint.resolve_checkpoint(str(ckpt_dir)))
    policies = [t["admission_eviction"] for t in manifest["tables"]]
    assert policies[0] == {"min_count": 1, "ttl_steps": 0, "max_rows": 40, "eviction": "lru"}
    assert policies[1]["min_count"] == manifest["tables"][1]["min_count"] == 3
    assert manifest["tables"][1]["candidates"] > 0 and manifest["tables"][0]["candidates"] == 0


def test_a_resume_keeps_a_checkpoints_dense_layers_that_followed_the_sparse_optimizer():
    """A checkpoint of hybridps before dense Adam became the default recorded dense_optimizer
    null (the MLP followed the sparse optimizer and rate): the same command resumes it the same."""
    from hybridps.config import keep_recorded_dense, make_config
    old = {"optimizer": "adagrad", "learning_rate": 0.05, "dense_optimizer": None, "dense_learning_rate": None}
    config = make_config(overrides={"optimizer": "adagrad", "learning_rate": 0.05, "resume": True,
                                    "checkpoint_dir": "/c"})
    kept, note = keep_recorded_dense(config, old, given={"optimizer", "learning_rate", "resume"})
    assert (kept.effective_dense_optimizer, kept.dense_learning_rate) == ("adagrad", None)
    assert "followed the sparse optimizer (adagrad, learning rate 0.05)" in note
    # a dense setting given by the run, a checkpoint of today's defaults, or none: nothing changes
    for recorded, given in ((old, {"dense_optimizer"}), (old, {"dense_learning_rate"}),
                            ({**old, "dense_optimizer": "adam"}, set()), (None, set())):
        assert keep_recorded_dense(config, recorded, given) == (config, None)
