"""Issue 18 under real MPI (2 ranks): skip-mode reporting and the damaged-checkpoint resume
(one job, tests/parallel/hardening_scenarios.py), and two MPMD jobs whose ranks disagree: on a
config field (the error names it) and on the content of the same --data path (a relative path
resolved in two working directories, as node-local copies that differ would be).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.mpi_util import MPI_ENV, REPO, mpirun_available, run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = os.path.join(REPO, "tests", "parallel", "hardening_scenarios.py")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening")
    proc = run_mpi(2, [SCRIPT, out], timeout=400)
    return str(out), proc.stderr


def test_skip_mode_prints_one_summary_and_keeps_per_rank_figures(scenarios):
    out, stderr = scenarios
    bad = os.path.join(out, "bad.csv")
    summaries = [line for line in stderr.splitlines() if "data: skipped" in line]
    assert summaries == [f"[hybridps] data: skipped 5 malformed line(s) of 200 in {bad} (on_bad_line=skip; "
                         f"195 rows are used), e.g. line 3: label must be 0 or 1, got '7'; line 4: label "
                         f"must be 0 or 1, got '7'; line 10: label must be 0 or 1, got '7'; and 2 more "
                         f"(data_stats in the metrics)"], stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "is larger than rank" in line]
    assert len(warnings) == 1 and re.search(r"batch_size 512 is larger than rank [01]'s share of .*bad\.csv "
                                            r"\(9\d rows of 200 data lines over 2 ranks\).* 2 steps read the "
                                            r"share 1[01] times \(epochs\)", warnings[0]), warnings
    with open(os.path.join(out, "skip.json")) as fh:
        stats = json.load(fh)["data_stats"]
    assert (stats["data_lines"], stats["rows"], stats["bad_lines"], stats["world_size"]) == (200, 195, 5, 2)
    assert [p["rank"] for p in stats["per_rank"]] == [0, 1]
    assert sum(p["rows"] for p in stats["per_rank"]) == 195
    assert sum(p["bad_lines"] for p in stats["per_rank"]) == 5 and all(p["bad_lines"] for p in stats["per_rank"])
    assert [int(e.split(", line ")[1].split(":")[0]) for e in stats["bad_line_examples"]] == [3, 4, 10, 51, 52]
    assert "rank" not in stats and "epoch" not in stats


def test_resume_with_every_checkpoint_damaged_refuses_on_every_rank_then_fresh_keeps_them(scenarios):
    out, _ = scenarios
    with open(os.path.join(out, "resume-refused.json")) as fh:
        refused = json.load(fh)
    first, second = refused["messages"]
    assert first == second and first is not None
    for step in (2, 4):
        assert f"ckpt-{step:010d}/table-000.rank-00001.rows: truncated" in first
    assert refused["unchanged"]
    with open(os.path.join(out, "resume-fresh.json")) as fh:
        fresh = json.load(fh)
    assert fresh["first_step"] == 0 and fresh["aside_unchanged"]
    assert fresh["listing"] == ["ckpt-0000000002", "ckpt-0000000004", "ckpt-0000000006",
                                "damaged-ckpt-0000000002", "damaged-ckpt-0000000004", "latest"]


def _mpmd(contexts, timeout=120):
    """mpirun with one app context per rank: [(working directory, extra train flags)]."""
    if not mpirun_available():
        pytest.skip("mpirun not on PATH")
    command = ["mpirun", "--oversubscribe", "--bind-to", "none"]
    for i, (wdir, flags) in enumerate(contexts):
        command += ([":"] if i else []) + ["-np", "1", "-wdir", str(wdir), sys.executable, "-m",
                                           "hybridps.cli", "train", "--steps", "3", "--batch-size", "16",
                                           "--hidden", "8", "--dim", "4", "--no-progress"] + flags
    env = dict(os.environ, **MPI_ENV, PYTHONPATH=REPO)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_config_mismatch_names_the_differing_fields(tmp_path):
    proc = _mpmd([(REPO, ["--seed", "1", "--learning-rate", "0.1"]), (REPO, ["--seed", "2", "--learning-rate", "0.1"])])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ranks [1] run a different effective config than rank 0" in proc.stderr
    assert "differing field(s): seed (rank 0: 1, rank 1: 2). Give every rank" in proc.stderr, proc.stderr[-3000:]


def test_the_same_data_path_with_different_files_on_the_ranks_is_refused(tmp_path):
    from hybridps.data import SAMPLE_CRITEO_CSV
    lines = open(SAMPLE_CRITEO_CSV).read().splitlines()
    for name, body in (("a", lines), ("b", lines[:150])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.csv").write_text("\n".join(body) + "\n")
    proc = _mpmd([(tmp_path / "a", ["--data", "train.csv"]), (tmp_path / "b", ["--data", "train.csv"])])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: the data file train\.csv is not the same file on every rank \(rank 0: \d+ bytes "
                     r"on disk, 200 data lines, content blake2b [0-9a-f]{16}; rank 1: \d+ bytes on disk, 149 "
                     r"data lines", proc.stderr), proc.stderr[-3000:]
