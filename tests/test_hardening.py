"""Issue 18 (hardening), one process: output paths, inspect, skip-mode reporting, nonfinite,
refused configs, the SIGTERM message and the watchdog's stale states.

Each test holds what a hostile new user found: a late failure or traceback, a misleading
message, or a setting accepted silently. CLI runs go through ``python -m hybridps.cli`` and
check the exit code and that no traceback is printed.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hybridps.config import make_config
from hybridps.errors import ConfigError, OutputError
from tests.mpi_util import MPI_ENV, REPO

SMALL = ["--steps", "3", "--batch-size", "16", "--hidden", "8", "--dim", "4", "--vocab-size", "300",
         "--num-fields", "3", "--num-dense", "2", "--warmup-steps", "1", "--no-progress"]


def cli(args, timeout=180, env=None):
    env = dict(os.environ, **MPI_ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hybridps.cli"] + [str(a) for a in args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a full disk on demand); skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(directory):
    """Fill a file system until a write fails."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


# ---------------------------------------------------------------- 4. output paths
def test_output_paths_are_checked_at_start(tmp_path):
    from hybridps.startup import output_path_problems
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    ckpt_with_bad_latest = tmp_path / "ckpt"
    (ckpt_with_bad_latest / "latest").mkdir(parents=True)

    def problems(rank=0, **fields):
        return output_path_problems(make_config(overrides=fields), rank)

    assert problems(metrics_out=str(tmp_path / "new" / "m.json"), dump_state=str(tmp_path / "d"),
                    checkpoint_dir=str(tmp_path / "c"), delta_export_dir=str(a_dir)) == []
    assert problems(metrics_out=str(a_dir)) == [
        f"config field 'metrics_out': {a_dir} is a directory; give a file name such as {a_dir}/metrics.json"]
    assert problems(rank=1, metrics_out=str(a_dir)) == []          # rank 0 writes the metrics
    assert problems(metrics_out=str(a_file / "m.json")) == [
        f"config field 'metrics_out': cannot create {a_file}/m.json: {a_file} is not a directory"]
    assert problems(dump_state=str(a_file)) == [f"config field 'dump_state': {a_file} exists and is not a directory"]
    assert problems(rank=1, checkpoint_dir=str(a_file)) == [
        f"config field 'checkpoint_dir': {a_file} exists and is not a directory"]
    assert problems(delta_export_dir=str(a_file / "sub"), delta_every=5) == [
        f"config field 'delta_export_dir': cannot create {a_file}/sub: {a_file} is not a directory"]
    assert "latest is not a file" in problems(checkpoint_dir=str(ckpt_with_bad_latest))[0]


@pytest.mark.slow
def test_output_path_problems_stop_the_cli_at_start_without_traceback(tmp_path):
    (tmp_path / "latest-dir" / "latest").mkdir(parents=True)
    proc = cli(["train", *SMALL, "--metrics-out", tmp_path, "--dump-state", __file__,
                "--checkpoint-dir", tmp_path / "latest-dir"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: config field 'metrics_out': ") and f"{tmp_path} is a directory" in error
    assert f"'dump_state': {__file__} exists and is not a directory" in error
    assert f"{tmp_path}/latest-dir/latest is not a file" in error


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_write_failures_at_the_end_are_one_clear_error_and_leave_no_temporary_file(tiny_tmpfs):
    from hybridps.metrics import write_summary
    from hybridps.checkpoint.dump import save_npz
    fill(tiny_tmpfs)
    before = sorted(os.listdir(tiny_tmpfs))
    target = tiny_tmpfs / "metrics.json"
    with pytest.raises(OutputError, match=rf"cannot write the metrics file {target}: No space left on device"):
        write_summary(str(target), {"loss_trajectory": list(range(50_000))})
    with pytest.raises(OutputError, match=r"cannot write .*table0\.rank0\.npz: No space left on device"):
        save_npz(str(tiny_tmpfs / "table0.rank0.npz"), keys=np.arange(100_000))
    assert sorted(os.listdir(tiny_tmpfs)) == before
    proc = cli(["train", *SMALL, "--metrics-out", target])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the metrics file {target}: No space left on device; the metrics of "
        f"this run were not saved")
    assert sorted(os.listdir(tiny_tmpfs)) == before


# ---------------------------------------------------------------- 6. skip-mode reporting
def _criteo_with_bad_lines(tmp_path, bad_lines):
    from hybridps.data import SAMPLE_CRITEO_CSV
    lines = open(SAMPLE_CRITEO_CSV).read().splitlines()
    for number in bad_lines:                      # physical line numbers (1 is the header)
        lines[number - 1] = "2" + lines[number - 1][1:]          # label 2: malformed
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_stats_sum_only_what_adds_up_and_keep_examples_of_every_rank(tmp_path):
    from hybridps.data import CriteoReader
    from hybridps.data.stats import combine_data_stats, skipped_lines_summary
    path = _criteo_with_bad_lines(tmp_path, [3, 4, 10, 50, 51, 52, 53])
    readers = [CriteoReader(path, rank=r, world_size=2, on_bad_line="skip") for r in range(2)]
    combined = combine_data_stats([r.stats() for r in readers] + [None])     # + a PS server
    assert combined["data_lines"] == 200 and combined["world_size"] == 2   # the file's, not summed
    assert combined["bad_lines"] == 7 and combined["rows"] == 193
    assert combined["positives"] == sum(int(r.labels.sum()) for r in readers)
    assert [p["rank"] for p in combined["per_rank"]] == [0, 1]
    assert [p["rows"] for p in combined["per_rank"]] == [r.num_rows for r in readers]
    assert all(p["epoch"] == 0 and "parse_seconds" in p for p in combined["per_rank"])
    lines = [int(e.split(", line ")[1].split(":")[0]) for e in combined["bad_line_examples"]]
    assert lines == [3, 4, 10, 50, 51, 52, 53]       # both ranks' lines (data line i -> rank i % 2)
    assert all(e.startswith(f"{path}, line ") and "label must be 0 or 1" in e
               for e in combined["bad_line_examples"])
    summary = skipped_lines_summary(combined)
    assert summary.startswith(f"data: skipped 7 malformed line(s) of 200 in {path} (on_bad_line=skip; "
                              f"193 rows are used), e.g. line 3: label must be 0 or 1, got '2'; line 4: ")
    assert summary.endswith("; and 4 more (data_stats in the metrics)") and "\n" not in summary
    assert skipped_lines_summary(combine_data_stats([None])) is None
    clean = _criteo_with_bad_lines(tmp_path, [])
    assert skipped_lines_summary(combine_data_stats([CriteoReader(clean).stats()])) is None


# ---------------------------------------------------------------- 7. nonfinite
def test_nonfinite_is_a_config_field_and_flag_that_reaches_the_tables():
    from hybridps.cli import build_parser
    from hybridps.errors import NonFiniteGradientError
    from hybridps.schema import build_schema
    from hybridps.sparse.table import make_table as make_schema_table

    def make_table(config, table_id):
        return make_schema_table(build_schema(config).tables[table_id], table_id, config.seed,
                                 config.nonfinite)
    keys, grads = np.array([1, 2, 3]), np.ones((3, 4), np.float32)
    grads[1, 2] = np.nan
    strict = make_table(make_config(overrides={"dim": 4}), table_id=0)
    strict.lookup_or_insert(keys)
    with pytest.raises(NonFiniteGradientError) as info:
        strict.apply_gradients(keys, grads, step=1)
    advice = str(info.value)
    assert "--nonfinite skip" in advice and "nonfinite: skip" in advice
    args = build_parser().parse_args(["train", "--nonfinite", "skip", "--dim", "4"])
    config = make_config(None, {k: v for k, v in vars(args).items()
                                if k not in ("command", "config", "func")})
    assert config.nonfinite == "skip"
    lenient = make_table(config, table_id=0)
    lenient.lookup_or_insert(keys)
    lenient.apply_gradients(keys, grads, step=1)
    assert lenient.skipped_nonfinite_grads == 1 and lenient.applied_row_updates == 2
    with pytest.raises(ConfigError, match=r"'nonfinite': 'ignore' is invalid; allowed: raise, skip"):
        make_config(overrides={"nonfinite": "ignore"})


# ---------------------------------------------------------------- 8. refused or warned
def test_ssp_needs_a_staleness_and_asp_takes_none(tmp_path):
    with pytest.raises(ConfigError, match=r"'staleness': sync=ssp needs a staleness bound"):
        make_config(overrides={"sync": "ssp"})
    path = tmp_path / "ssp.yaml"
    path.write_text("sync: ssp\n")
    with pytest.raises(ConfigError, match=r"'staleness': sync=ssp needs a staleness bound"):
        make_config(str(path))
    assert make_config(str(path), {"staleness": 2}).staleness == 2
    assert make_config(overrides={"sync": "ssp", "staleness": 0}).staleness == 0   # explicit: BSP
    for mode in ("collective", "ps"):
        with pytest.raises(ConfigError, match=r"'staleness': 3 applies to sync=ssp only; asp has no"):
            make_config(overrides={"sync": "asp", "staleness": 3, "mode": mode})


def test_a_yaml_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model: dcn\nbatch_size: 64\nsteps: 5\nbatch_size: 128\n")
    with pytest.raises(ConfigError) as info:
        make_config(str(path))
    assert str(info.value) == (f"config file {path}: key 'batch_size' is given twice (line 2 and line 4); "
                               f"give each field once")
    path.write_text("table_settings:\n  0: {max_rows: 5, max_rows: 6}\n")
    with pytest.raises(ConfigError, match=r"key 'max_rows' is given twice \(line 2 and line 2\)"):
        make_config(str(path))
    path.write_text("\ufeffmodel: dcn\nhidden: [8]\n")          # a BOM is fine in YAML too
    assert make_config(str(path)).model == "dcn"


def test_settings_that_name_a_rank_the_job_does_not_have():
    from hybridps import testing_hooks
    from hybridps.backends.ps.protocol import PSRoles

    def check(world_size, data_ranks, mode=None, **hooks):    # mode ps: data_ranks < world_size
        testing_hooks.check_job(world_size, data_ranks, testing_hooks.TestingHooks(**hooks))

    check(2, 2, loader_delay_ms=5, delay_rank=1)
    check(1, 1)
    with pytest.raises(ConfigError, match=r"'delay_rank': 7 is not a training rank of this 1-rank job "
                                          r"\(allowed: 0\)"):
        check(1, 1, delay_rank=7)
    with pytest.raises(ConfigError, match=r"'delay_rank': -1 is not a training rank .*loader_delay_ms \(now 5\)"):
        check(2, 2, loader_delay_ms=5)
    with pytest.raises(ConfigError, match=r"'delay_rank': 2 is not a training rank of this 3-rank job "
                                          r"\(allowed: 0\.\.1\)"):
        check(3, 2, mode="ps", loader_delay_ms=5, delay_rank=2)
    check(2, 1, mode="ps", fail_at_step=3, fail_rank=0)
    with pytest.raises(ConfigError, match=r"'fail_rank': rank 1 is a parameter server: the failure is "
                                          r"injected in the training loop of the workers \(allowed: 0\)"):
        check(2, 1, mode="ps", fail_at_step=3, fail_rank=1)
    with pytest.raises(ConfigError, match=r"'fail_rank': rank 5 is not a rank of this 2-rank job"):
        check(2, 2, fail_at_step=3, fail_rank=5)
    with pytest.raises(ConfigError, match=r"'mode': ps needs at least 2 ranks .* this job has 1; start it "
                                          r"with mpirun -np 2 or more, or use mode=collective"):
        PSRoles(1, 1)


def test_a_utf8_bom_before_the_header_is_accepted(tmp_path):
    from hybridps.data import SAMPLE_CRITEO_CSV, CriteoReader
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + open(SAMPLE_CRITEO_CSV, "rb").read())
    with_bom, plain = CriteoReader(path), CriteoReader(SAMPLE_CRITEO_CSV)
    assert with_bom.format == "csv-header" and with_bom.num_rows == 200
    np.testing.assert_array_equal(with_bom.keys, plain.keys)
    np.testing.assert_array_equal(with_bom.dense, plain.dense)
    assert with_bom.fingerprint()["content_blake2b"] == plain.fingerprint()["content_blake2b"]


def test_a_batch_larger_than_a_share_warns_with_the_epochs_and_different_files_are_named(tmp_path):
    from hybridps.data import CriteoReader
    from hybridps.data.stats import combine_data_stats, data_file_differences, small_share_warning
    path = _criteo_with_bad_lines(tmp_path, [])
    lines = path.read_text().splitlines()
    ten = tmp_path / "ten.csv"
    ten.write_text("\n".join(lines[:11]) + "\n")                  # header + 10 data lines
    readers = [CriteoReader(ten, rank=r, world_size=2) for r in range(2)]
    combined = combine_data_stats([r.stats() for r in readers])
    assert small_share_warning(combined, 512, 100) == (
        f"warning: batch_size 512 is larger than rank 0's share of {ten} (5 rows of 10 data lines over "
        f"2 ranks): every batch repeats each row about 102 times, and 100 steps read the share 10240 "
        f"times (epochs). Use a smaller batch_size, fewer ranks or more data.")
    assert small_share_warning(combined, 5, 100) is None
    assert data_file_differences([r.fingerprint() for r in readers] + [None]) is None
    other = tmp_path / "other.csv"
    other.write_text("\n".join(lines[:10] + [lines[12]]) + "\n")   # same size class, one row differs
    message = data_file_differences([readers[0].fingerprint(), CriteoReader(other).fingerprint()])
    assert message.startswith(f"the data file {ten} is not the same file on every rank (rank 0: ")
    assert "; rank 1: " in message and "content blake2b" in message


@pytest.mark.slow
def test_rank_settings_out_of_range_stop_the_cli_at_start_without_traceback():
    from hybridps.testing_hooks import environment
    for flags, env, expected in (([], environment(delay_rank=7), "error: testing aid 'delay_rank': 7 is not "
                                                               "a training rank of this 1-rank job (allowed: 0)"),
                                 (["--mode", "ps"], {}, "error: config field 'mode': ps needs at least 2 ranks")):
        proc = cli(["train", *SMALL, *flags], env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-2000:]


# ---------------------------------------------------------------- 9. watchdog: stale states
def test_a_state_file_not_refreshed_is_marked_with_the_process_state():
    import signal
    import socket
    import time
    from hybridps.watchdog import describe_state
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.2)
        now = time.time()
        state = {"rank": 1, "size": 2, "host": socket.gethostname(), "pid": sleeper.pid, "refresh_s": 1.25,
                 "written": now - 25.0, "collectives": [], "last": None,
                 "main": {"step": 0, "where": ["trainer.py:140 __init__"]}}
        text = describe_state(state, now=now)
        first, second = text.splitlines()
        assert first == (f"  rank 1 ({state['host']}, pid {sleeper.pid}): NO UPDATE for 25.0s although a "
                         f"running rank refreshes its state every 1.25s: the rank is stopped (SIGSTOP, a "
                         f"debugger) or hung outside Python (a C call holding the GIL); the process is "
                         f"stopped (SIGSTOP/SIGTSTP). Its last state, 25.0s old:")
        assert second.startswith(f"  rank 1 ({state['host']}, pid {sleeper.pid}, state written 25.0s ago): "
                                 f"not in a collective (step 0)")
        fresh = describe_state(dict(state, written=now - 2.0), now=now)
        assert "NO UPDATE" not in fresh and len(fresh.splitlines()) == 1
        assert "NO UPDATE" not in describe_state({k: v for k, v in state.items() if k != "refresh_s"}, now=now)
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- 2 and 3 through the CLI
@pytest.mark.slow
def test_damaged_inputs_stop_the_cli_with_the_file_named_and_no_traceback(tmp_path):
    import gzip
    from hybridps.data import SAMPLE_CRITEO_CSV
    data = gzip.compress(open(SAMPLE_CRITEO_CSV, "rb").read())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[:len(data) // 2])
    proc = cli(["train", *SMALL, "--data", cut, "--on-bad-line", "skip"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"^error: {re.escape(str(cut))}, line \d+: damaged gzip file \(truncated",
                     proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    root = tmp_path / "ckpt"
    (root / "ckpt-0000000010").mkdir(parents=True)              # a checkpoint without its manifest
    (root / "latest").write_text("ckpt-0000000010\n")
    before = sorted(os.listdir(root))
    proc = cli(["train", *SMALL, "--checkpoint-dir", root, "--resume"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot resume: no intact checkpoint under {root} (ckpt-0000000010: "
                            f"{root}/ckpt-0000000010/manifest.json is missing"), error
    assert sorted(os.listdir(root)) == before and not os.listdir(root / "ckpt-0000000010")
