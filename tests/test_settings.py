"""Configuration as data: settings declared once (hybridps.settings) and what follows from them
(train's flags, value coercion, the reference page's groups), table_settings by table name, and
the testing aids of hybridps.testing_hooks. Single-process tests."""
import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import pytest

from hybridps import testing_hooks
from hybridps.config import TrainConfig, make_config, training_differences
from hybridps.errors import ConfigError
from hybridps.settings import add_dataclass_arguments, given_values, setting
from tests.mpi_util import REPO

# Every flag ``hybridps train`` had when its flags were written by hand (user flags only):
# each spelling must keep working.
OLD_TRAIN_FLAGS = (
    "--config --model --data --steps --batch-size --sync --staleness --mode --num-servers --seed "
    "--metrics-out --dim --hidden --optimizer --learning-rate --dense-optimizer --dense-learning-rate "
    "--table-layout --min-count --nonfinite --on-bad-line --shuffle --shuffle-buffer --data-cache "
    "--num-fields --num-dense --vocab-size --zipf-a --warmup-steps --log-every --no-progress "
    "--eval-data --eval-every --eval-batches --tensorboard-dir --dump-state --checkpoint-dir "
    "--checkpoint-every --keep-checkpoints --resume --resume-fresh --num-buckets --delta-export-dir "
    "--delta-every --delta-every-seconds --stream-poll-s --ttl-steps --max-rows --eviction "
    "--table-settings --full-export-every --max-inflight --dense-staleness --watchdog-timeout").split()
GROUPS = ["run", "model", "sparse embeddings", "dense parameters", "data", "consistency", "evaluation",
          "checkpoints and export", "streams", "operations"]


def _train_parser():
    from hybridps.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_old_train_flag_is_still_accepted():
    flags = {o for action in _train_parser()._actions for o in action.option_strings}
    assert set(OLD_TRAIN_FLAGS) <= flags


def test_train_help_shows_every_flag_in_its_group_with_its_help():
    text = _train_parser().format_help()
    headings = re.findall(r"^(\w[\w ]*):$", text, re.M)
    assert headings == ["options"] + GROUPS
    sparse = text.split("\nsparse embeddings:\n", 1)[1].split("\ndense parameters:\n", 1)[0]
    assert "--table-settings JSON" in sparse and "--eviction {lfu,lru}" in sparse
    assert "policy for --max-rows" in " ".join(sparse.split())
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("features", "table_groups"):         # YAML only
            flag = "--no-progress" if field.name == "progress" else "--" + field.name.replace("_", "-")
            assert re.search(rf"^  {flag}\b", text, re.M), flag


# A value other than the default for every field that has a flag, as typed on a command line,
# and the value the config holds then (written out by hand).
FLAG_VALUES = {
    "model": ("dcn", "dcn"), "data": ("sample", "sample"), "steps": ("7", 7), "batch_size": ("33", 33),
    "seed": ("4", 4), "dim": ("8", 8), "hidden": ("64,32", [64, 32]), "cross_layers": ("2", 2),
    "num_experts": ("3", 3), "expert_units": ("32,16", [32, 16]), "table_layout": ("per_field", "per_field"),
    "table_settings": ('{"C2": {"max_rows": 9}}', {"C2": {"max_rows": 9}}),
    "optimizer": ("adam", "adam"), "learning_rate": ("0.5", 0.5), "adam_catch_up": (None, True),
    "initializer": ("zeros", "zeros"),
    "init_std": ("0.25", 0.25), "min_count": ("3", 3), "ttl_steps": ("11", 11), "max_rows": ("99", 99),
    "eviction": ("lru", "lru"), "nonfinite": ("skip", "skip"), "dense_optimizer": ("sgd", "sgd"),
    "dense_learning_rate": ("0.125", 0.125), "on_bad_line": ("skip", "skip"), "shuffle": (None, True),
    "shuffle_buffer": ("64", 64), "data_cache": ("/c", "/c"), "num_fields": ("4", 4),
    "num_dense": ("2", 2), "vocab_size": ("77", 77), "zipf_a": ("1.5", 1.5),
    "list_mean_length": ("3.5", 3.5), "list_max_length": ("9", 9), "sync": ("asp", "asp"),
    "staleness": ("2", 2), "mode": ("ps", "ps"), "num_servers": ("2", 2),
    "max_inflight": ("6", 6), "dense_staleness": ("1", 1), "eval_data": ("synthetic", "synthetic"),
    "eval_every": ("5", 5), "eval_batches": ("3", 3), "checkpoint_dir": ("/k", "/k"),
    "checkpoint_every": ("4", 4), "checkpoint_every_seconds": ("2.5", 2.5), "keep_checkpoints": ("2", 2), "resume": (None, True),
    "resume_fresh": (None, True), "num_buckets": ("128", 128), "delta_export_dir": ("/d", "/d"),
    "delta_every": ("3", 3), "delta_every_seconds": ("1.5", 1.5), "full_export_every": ("2", 2),
    "stream_poll_s": ("0.5", 0.5), "stream_retry_seconds": ("7.5", 7.5), "metrics_out": ("/m", "/m"),
    "warmup_steps": ("1", 1), "log_every": ("2", 2), "auc_window": ("0.25", 0.25),
    "progress": (None, False), "tf_threads": ("2", 2), "dump_state": ("/s", "/s"),
    "tensorboard_dir": ("/t", "/t"), "watchdog_timeout": ("9.5", 9.5),
}


def test_every_flag_sets_its_field_with_the_fields_type():
    from hybridps.cli import build_parser
    flagged = {f.name for f in dataclasses.fields(TrainConfig)} - {"features", "table_groups"}
    assert set(FLAG_VALUES) == flagged
    argv = ["train"]
    for name, (text, _) in FLAG_VALUES.items():
        flag = "--no-progress" if name == "progress" else "--" + name.replace("_", "-")
        argv += [flag] + ([text] if text is not None else [])
    given = given_values(build_parser().parse_args(argv), TrainConfig)
    assert set(given) == set(FLAG_VALUES)
    from hybridps.config import _coerce
    for name, (_, expected) in FLAG_VALUES.items():
        value = _coerce(name, given[name])
        assert getattr(value, "value", value) == expected, name
    # nothing given: no field set (a flag's default is "not given", the YAML's value stays)
    assert given_values(build_parser().parse_args(["train"]), TrainConfig) == {}


def test_values_are_converted_by_the_fields_type():
    config = make_config(overrides={"dense_learning_rate": "0.5", "hidden": "64, 32", "shuffle": "yes",
                                    "data_cache": None, "table_groups": [["0", 1], [2]], "num_fields": 3})
    assert (config.dense_learning_rate, config.hidden, config.shuffle) == (0.5, [64, 32], True)
    assert config.table_groups == [[0, 1], [2]] and config.data_cache is None
    with pytest.raises(ConfigError, match=r"config field 'table_groups': expected a list of lists of "
                                          r"field indices, e.g. \[\[0, 1, 2\], \[3\]\], got 'x'"):
        make_config(overrides={"table_groups": "x"})
    with pytest.raises(ConfigError, match=r"config field 'features': expected a mapping \(label, dense, "
                                          r"sparse, tables\), got \[1\]"):
        make_config(overrides={"features": [1]})
    with pytest.raises(ConfigError, match=r"config field 'dense_learning_rate': expected float, got 'fast'"):
        make_config(overrides={"dense_learning_rate": "fast"})
    with pytest.raises(ConfigError, match=r"config field 'eviction': 'fifo' is invalid; allowed: lfu, lru"):
        make_config(overrides={"eviction": "fifo"})
    with pytest.raises(ConfigError, match=r"config field 'shuffle': expected bool, got 'perhaps'"):
        make_config(overrides={"shuffle": "perhaps"})


def test_the_generator_serves_any_dataclass_of_settings():
    @dataclass
    class JoinSettings:
        """How events are joined."""
        window_s: float = setting(60.0, "seconds an impression waits for its click")
        keys: List[int] = setting([1], "key columns", metavar="N,N")
        strict: bool = setting(False, "refuse late events")
        mode: str = setting("inner", "join kind", choices=("inner", "left"))
        out: Optional[str] = setting(None, "where joined rows go", flag="--joined-out")
        note: str = setting("", "YAML only", flag=False)

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, JoinSettings)
    args = parser.parse_args(["--window-s", "2.5", "--strict", "--mode", "left", "--joined-out", "/j",
                              "--keys", "3,4"])
    assert given_values(args, JoinSettings) == {"window_s": 2.5, "strict": True, "mode": "left",
                                                "out": "/j", "keys": "3,4"}
    assert "--note" not in parser.format_help() and "how events are joined" in parser.format_help().lower()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "outer"])
    only = argparse.ArgumentParser()
    add_dataclass_arguments(only, JoinSettings, only={"strict"})
    assert {o for a in only._actions for o in a.option_strings} == {"-h", "--help", "--strict"}


def test_a_bool_value_flag_takes_true_or_false_and_a_str_list_flag_is_stripped():
    from hybridps.settings import coerce

    @dataclass
    class Settings:
        """Some settings."""
        wait: bool = setting(True, "wait for more", bool_value=True)
        names: List[str] = setting(["a"], "names, comma-separated")

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Settings)
    assert "--wait {true,false}" in parser.format_help() and "--no-wait" not in parser.format_help()
    given = given_values(parser.parse_args(["--wait", "off", "--names", " x, y ,,z"]), Settings)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert {k: coerce(Settings, fields[k], v) for k, v in given.items()} == \
        {"wait": False, "names": ["x", "y", "z"]}
    assert given_values(parser.parse_args([]), Settings) == {}


def test_output_and_per_rank_roles_come_from_the_declarations():
    from hybridps.config import OUTPUT_FIELDS, PER_RANK_FIELDS
    # the sets hybridps had written out by hand (testing aids aside)
    assert PER_RANK_FIELDS == {"metrics_out", "progress", "dump_state", "tf_threads", "resume",
                               "resume_fresh", "watchdog_timeout", "tensorboard_dir"}
    assert OUTPUT_FIELDS == PER_RANK_FIELDS | {
        "log_every", "warmup_steps", "auc_window", "eval_data", "eval_every", "eval_batches",
        "checkpoint_dir", "checkpoint_every", "checkpoint_every_seconds", "keep_checkpoints", "delta_export_dir", "delta_every",
        "delta_every_seconds", "full_export_every", "stream_poll_s", "data_cache"}


# ---------------------------------------------------------------- table_settings by name
def _policies(config):
    from hybridps.schema import build_schema
    return {t.name: t.policy() for t in build_schema(config).tables}


def test_table_settings_by_name_for_every_layout_of_the_criteo_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("table_layout: per_field\nnum_fields: 3\ntable_settings:\n  C2: {max_rows: 10, eviction: lru}\n")
    policies = _policies(make_config(str(path)))
    assert list(policies) == ["C1", "C2", "C3"]
    assert policies["C2"] == {"min_count": 1, "ttl_steps": 0, "max_rows": 10, "eviction": "lru"}
    assert policies["C1"]["max_rows"] == policies["C3"]["max_rows"] == 0
    shared = make_config(overrides={"table_settings": {"criteo": {"min_count": 2}}})
    assert _policies(shared)["criteo"]["min_count"] == 2
    grouped = make_config(overrides={"num_fields": 3, "table_groups": [[0, 2], [1]],
                                     "table_settings": '{"group1": {"ttl_steps": 5}}'})
    assert _policies(grouped)["group1"]["ttl_steps"] == 5 and _policies(grouped)["group0"]["ttl_steps"] == 0


def test_table_settings_by_index_are_read_as_names_with_one_warning(capsys):
    from hybridps import config as config_module
    config_module._warned.clear()
    old = make_config(overrides={"table_layout": "per_field", "num_fields": 3,
                                 "table_settings": {1: {"max_rows": 10}}})
    new = make_config(overrides={"table_layout": "per_field", "num_fields": 3,
                                 "table_settings": {"C2": {"max_rows": 10}}})
    assert old.table_settings == new.table_settings == {"C2": {"max_rows": 10}}
    assert old.to_dict() == new.to_dict()
    again = make_config(overrides={"table_layout": "per_field", "num_fields": 3,
                                   "table_settings": '{"0": {"min_count": 2}}'})
    assert again.table_settings == {"C1": {"min_count": 2}}
    err = capsys.readouterr().err
    assert err.count("warning: table_settings by table index") == 1, err
    assert 'key the tables by name: table_settings: {"C2": {"max_rows": 10}}' in err


def test_a_table_settings_name_that_is_no_table_names_the_tables():
    with pytest.raises(ConfigError) as info:
        make_config(overrides={"table_layout": "per_field", "num_fields": 3,
                               "table_settings": {"C9": {"max_rows": 1}}})
    assert str(info.value) == ("config field 'table_settings': 'C9' is not a table of this layout "
                               "(table_layout=per_field, table_groups=None); its tables are C1, C2, C3")
    with pytest.raises(ConfigError, match=r"table 'C1' is given twice \(by its index 0 and by its name\)"):
        make_config(overrides={"table_layout": "per_field", "num_fields": 3,
                               "table_settings": {0: {"max_rows": 1}, "C1": {"min_count": 2}}})


def test_a_checkpoint_config_written_before_reads_as_the_same_training():
    """The legacy checkpoint's saved config (table_settings by index, the testing aids as
    fields, fields added since missing) against the run that wrote it: no training difference."""
    legacy = os.path.join(REPO, "tests", "data", "legacy_checkpoint_v1")
    with open(os.path.join(legacy, "ckpt", "ckpt-0000000003", "manifest.json")) as fh:
        saved = json.load(fh)["config"]
    # its dense optimizer was the default of its day (null: the sparse optimizer and rate)
    then = {"dense_optimizer": "adagrad", "dense_learning_rate": 0.05}
    config = make_config(os.path.join(legacy, "legacy.yaml"), then, warn_deprecated=False)
    assert config.table_settings == {"group1": {"min_count": 1}}
    assert training_differences(config, saved) == []
    now = make_config(os.path.join(legacy, "legacy.yaml"), warn_deprecated=False)
    assert training_differences(now, saved) == ["dense_learning_rate", "dense_optimizer"]
    changed = make_config(os.path.join(legacy, "legacy.yaml"), {"learning_rate": 0.1, "nonfinite": "skip", **then},
                          warn_deprecated=False)
    assert training_differences(changed, saved) == ["learning_rate", "nonfinite"]
    from hybridps.checkpoint.format import model_config_of
    recorded = model_config_of({"config": saved})
    assert recorded.table_settings == {"group1": {"min_count": 1}}


# ---------------------------------------------------------------- testing aids
def test_testing_hooks_are_read_from_the_environment_and_checked():
    env = testing_hooks.environment(fail_at_step=5, fail_rank=1, loader_delay_ms=2.5, delay_rank=0)
    assert env == {"HYBRIDPS_TEST_FAIL_AT_STEP": "5", "HYBRIDPS_TEST_FAIL_RANK": "1",
                   "HYBRIDPS_TEST_LOADER_DELAY_MS": "2.5", "HYBRIDPS_TEST_DELAY_RANK": "0"}
    assert testing_hooks.from_environment(env) == testing_hooks.TestingHooks(5, 1, 2.5, 0)
    assert testing_hooks.from_environment({}) == testing_hooks.TestingHooks()
    with pytest.raises(ConfigError, match=r"HYBRIDPS_TEST_FAIL_AT_STEP \(a testing aid\) must be an "
                                          r"integer, got 'soon'"):
        testing_hooks.from_environment({"HYBRIDPS_TEST_FAIL_AT_STEP": "soon"})
    with pytest.raises(ConfigError, match=r"HYBRIDPS_TEST_LOADER_DELAY_MS .* milliseconds >= 0, got -1"):
        testing_hooks.from_environment({"HYBRIDPS_TEST_LOADER_DELAY_MS": "-1"})


def test_testing_hooks_change_nothing_unset_and_act_on_their_rank_only():
    steps, batches = range(10), iter([1, 2])
    try:
        testing_hooks.use()
        assert testing_hooks.failing_steps(steps, 0) is steps
        assert testing_hooks.delayed_batches(batches, 0) is batches
        testing_hooks.use(fail_at_step=3, fail_rank=1, loader_delay_ms=1.0, delay_rank=0)
        assert testing_hooks.failing_steps(steps, 0) is steps
        assert testing_hooks.delayed_batches(batches, 1) is batches
        reached = []
        with pytest.raises(RuntimeError, match=r"injected failure at step 3 on rank 1 \(fail_at_step"):
            for step in testing_hooks.failing_steps(steps, 1):
                reached.append(step)
        assert reached == [0, 1, 2]
        assert list(testing_hooks.delayed_batches(iter([1, 2]), 0)) == [1, 2]
    finally:
        testing_hooks.use()
