"""Smoke tests of `hybridps bench train` and `hybridps bench compare` on 2 ranks with a tiny
workload: every case runs under mpirun in one of the tests and the output files have the
documented schema; what the bench plans (the default cases of each workload, --cases, the
straggler environment, --one-job's list of cases) is checked on a stubbed launcher. An mpirun
start and TensorFlow's import are most of a case's time, so the tests of several cases run
them in one job (--one-job); the multitask test runs each case as its own job (the default).
No speed is asserted: a measured time, rate or ratio is checked to be there, a finite float
and >= 0 (a loaded machine may time a phase as 0.0 ms), counts and losses against what they
must be."""
import json
import math
import os

import pytest

from tests.mpi_util import MPI_ENV, mpirun_available


def measured(value):
    """A measured time, rate or ratio as the reports give it: a finite float >= 0."""
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def fake_case_runs(monkeypatch, out_dir):
    """Replace the bench's mpirun by a stub writing each case's metrics file (no MPI job): for
    the tests of what the bench plans and reports, whose cases run for real in other tests.
    Returns the list of (case name, argv, env) launched."""
    from hybridps.bench import train as bench_train
    launched = []

    def fake_mpirun(ranks, argv, timeout, env=None):
        (path,) = [a for a in argv if os.path.dirname(a) == str(out_dir) and a.endswith(".json")]
        launched.append((os.path.basename(path)[:-len(".json")], argv, env))
        with open(path, "w") as fh:
            json.dump({"samples_per_s": 1.0, "final_loss": 0.5, "auc": 0.5}, fh)
        return 0.1

    monkeypatch.setattr(bench_train, "_mpirun", fake_mpirun)
    return launched


@pytest.fixture
def mpi_env(monkeypatch):
    """The oversubscription settings the benchmark's mpirun jobs inherit."""
    if not mpirun_available():
        pytest.skip("mpirun not on PATH")
    for key, value in MPI_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.mpi
def test_bench_compare_writes_every_case(tmp_path, mpi_env):
    from hybridps.bench.compare import run_compare_bench
    report = run_compare_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64,
                               dim=4, vocab_size=500, timeout=240, one_job=True)
    names = [c["name"] for c in report["cases"]]
    assert names == ["collective-bsp", "collective-ssp1", "collective-asp", "ps-bsp", "ps-asp", "tf-baseline"]
    for case in report["cases"]:
        for key in ("final_loss", "auc", "bytes_per_step", "peak_rss_mb"):
            assert isinstance(case[key], float) and math.isfinite(case[key]) and case[key] > 0, (case["name"], key)
        for key in ("samples_per_s", "samples_per_s_per_rank"):
            assert measured(case[key]), (case["name"], key)
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["ps-bsp"]["computing_ranks"] == 1 and by_name["collective-bsp"]["computing_ranks"] == 2
    assert by_name["ps-asp"]["samples_per_s_per_rank"] == by_name["ps-asp"]["samples_per_s"]
    with open(tmp_path / "compare.json") as fh:
        assert json.load(fh)["cases"] == report["cases"]
    assert (tmp_path / "compare.md").read_text().count("|") > 20
    assert os.path.getsize(tmp_path / "compare.png") > 1000


def test_repeated_cases_run_round_robin_and_report_the_median_run():
    from hybridps.bench.train import run_rounds
    figures = {"a": iter([5.0, 1.0, 3.0]), "b": iter([10.0, 30.0, 20.0, 40.0])}
    calls = []

    def run_case(name, argv):
        calls.append(name)
        return {"samples_per_s": next(figures[name]), "argv": argv, "round": calls.count(name)}

    chosen = run_rounds([("a", ["-x"]), ("b", [])], 3, run_case)
    assert calls == ["a", "b", "a", "b", "a", "b"]          # interleaved, not case by case
    assert chosen["a"]["samples_per_s"] == 3.0 and chosen["a"]["round"] == 3
    assert chosen["a"]["samples_per_s_runs"] == [5.0, 1.0, 3.0]
    assert chosen["b"]["samples_per_s"] == 20.0 and chosen["b"]["argv"] == []
    with pytest.raises(ValueError, match="repeats"):
        run_rounds([("a", [])], 0, run_case)
    # a whole round at once (--one-job): once per round, the median run of each case
    rounds = iter([{"a": {"samples_per_s": 2.0}, "b": {"samples_per_s": 7.0}},
                   {"a": {"samples_per_s": 4.0}, "b": {"samples_per_s": 5.0}},
                   {"a": {"samples_per_s": 3.0}, "b": {"samples_per_s": 6.0}}])
    planned = []
    chosen = run_rounds([("a", ["-x"]), ("b", [])], 3, None, lambda plan: planned.append(plan) or next(rounds))
    assert planned == [[("a", ["-x"]), ("b", [])]] * 3
    assert chosen["a"] == {"samples_per_s": 3.0, "samples_per_s_runs": [2.0, 4.0, 3.0]}
    assert chosen["b"] == {"samples_per_s": 6.0, "samples_per_s_runs": [7.0, 5.0, 6.0]}


@pytest.mark.mpi
def test_bench_train_writes_every_case(tmp_path, mpi_env):
    from hybridps.bench.train import run_train_bench
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64,
                             dim=4, vocab_size=500, timeout=240, one_job=True)
    names = [c["name"] for c in report["cases"]]
    assert names == ["hybridps-bsp", "hybridps-ssp1", "hybridps-ssp1-dense1", "hybridps-ssp4",
                     "hybridps-asp", "hybridps-bsp-straggler", "hybridps-ssp1-straggler",
                     "hybridps-asp-straggler", "tf-baseline", "hybridps-bsp-adam", "tf-baseline-adam",
                     "bare-ceiling", "hybridps-step-no-exchange"]
    for case in report["cases"]:
        for key in ("final_loss", "auc"):
            assert math.isfinite(case[key]) and case[key] > 0, (case["name"], key)
        assert measured(case["samples_per_s"]), case["name"]
        assert case["samples_per_s_runs"] == [case["samples_per_s"]]
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["hybridps-ssp1"]["staleness_max"] <= 1
    assert by_name["hybridps-ssp1-dense1"]["dense_staleness_max"] <= 1
    assert by_name["hybridps-bsp"]["dense_staleness_max"] == 0
    file_ratios = ("parquet_vs_synthetic", "tsv_vs_ceiling", "adam_tsv_vs_ceiling", "asp_tsv_vs_bsp_tsv",
                   "criteo_parquet_vs_ceiling", "criteo_parquet_cached_vs_ceiling", "tsv_vs_tf_baseline",
                   "criteo_parquet_vs_tf_baseline")
    assert set(report["ratios"]) == {"vs_tf_baseline", "vs_ceiling", "asp_vs_bsp", "ssp1_vs_bsp", *file_ratios}
    for absent in file_ratios:
        assert report["ratios"][absent] is None     # no file case in this run
    assert measured(report["other_ratios"]["adam_vs_tf_baseline_adam"])
    # the ceiling is the bare step; hybridps's own step without exchange is reported beside it
    assert measured(report["other_ratios"]["in_situ_vs_bare"])
    assert by_name["hybridps-bsp"]["fraction_of_ceiling"] == pytest.approx(
        by_name["hybridps-bsp"]["samples_per_s"] / by_name["bare-ceiling"]["samples_per_s"])
    with open(tmp_path / "tf-baseline-adam.json") as fh:
        assert json.load(fh)["optimizer"] == "adam"
    with open(tmp_path / "train.json") as fh:
        assert json.load(fh)["cases"] == report["cases"]
    assert (tmp_path / "train.md").read_text().count("|") > 20
    assert os.path.getsize(tmp_path / "train.png") > 1000


@pytest.mark.mpi
def test_bench_train_multitask_workload_runs_mmoe_on_two_tasks_against_its_ceiling(tmp_path, mpi_env):
    from hybridps.bench.train import run_train_bench
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64,
                             dim=4, vocab_size=500, timeout=240, workload="multitask", one_job=True)
    assert [c["name"] for c in report["cases"]] == ["hybridps-bsp", "hybridps-step-no-exchange"]
    for case in report["cases"]:
        assert math.isfinite(case["final_loss"]) and measured(case["samples_per_s"])
    assert measured(report["other_ratios"]["bsp_vs_step_no_exchange"])
    assert report["settings"]["model"] == "mmoe"
    assert [t["name"] for t in report["settings"]["features"]["labels"]] == ["click", "conversion"]


@pytest.mark.slow
def test_bench_multitask_reports_esmm_and_the_clicked_rows_model(tmp_path):
    """A tiny run of `hybridps bench multitask` (one process, two seeds, epochs 1 then 2 chosen
    on a validation file): every arm (ESMM, ESMM with the post-click task, naive and ipw, and
    the clicked-rows model) trains with the same pinned optimizer settings, the clicked-rows
    model is ESMM's pCVR tower, the clicked rows counted are those of each seed's own training
    file, the second count resumes the first's checkpoint, each arm's figures are those of the
    count with the best validation AUC, and the medians are those of the seeds."""
    import subprocess
    import sys
    import pyarrow.compute as pc
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score
    from tests.mpi_util import REPO
    proc = subprocess.run([sys.executable, "-m", "hybridps.cli", "bench", "multitask", "--out",
                           str(tmp_path), "--train-rows", "6000", "--heldout-rows", "3000",
                           "--validation-rows", "3000", "--batch-size", "512", "--epochs", "1,2",
                           "--seeds", "0,1", "--ctr", "0.2", "--learning-rate", "0.1"],
                          cwd=REPO, env=dict(os.environ, **MPI_ENV), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "multitask.json").read_text())
    assert [run["seed"] for run in report["runs"]] == report["seeds"] == [0, 1]
    assert report["epochs"] == [1, 2] and report["validation_impressions"] == 3000
    prefixes = {"esmm": "esmm", "esmm-postclick": "postclick", "esmm-postclick-ipw": "postclick_ipw",
                "cvr-clicked": "baseline"}
    for run in report["runs"]:
        seed_dir = tmp_path / f"seed{run['seed']}"
        clicks = pq.read_table(seed_dir / "train.parquet", columns=["click"])["click"]
        assert run["train_clicked"] == pc.sum(clicks).as_py() > 0
        for prefix in ("esmm", "postclick", "postclick_ipw"):
            for figure in ("cvr_auc_clicked", "cvr_auc_every_impression", "ctr_auc", "ctcvr_auc"):
                assert 0.0 <= run[f"{prefix}_{figure}"] <= 1.0, (prefix, figure)
        assert 0.0 <= run["baseline_cvr_auc_clicked"] <= 1.0
        tasks = {"esmm": [("click", None, False), ("conversion", None, False)],
                 "esmm-postclick": [("click", None, False), ("conversion", None, False), ("cvr", "click", False)],
                 "esmm-postclick-ipw": [("click", None, False), ("conversion", None, False), ("cvr", "click", True)],
                 "cvr-clicked": None}
        for arm, prefix in prefixes.items():
            rows = run["train_clicked"] if arm == "cvr-clicked" else 6000
            curve = run["curves"][arm]
            assert [(c["epochs"], c["steps"]) for c in curve] == [(e, max(1, e * rows // 512)) for e in (1, 2)]
            # the count chosen on the validation file (the first of equal ones), and its figures
            best = max(curve, key=lambda c: (c["validation_cvr_auc_clicked"], -c["epochs"]))
            assert run[f"{prefix}_epochs"] == best["epochs"], arm
            assert run[f"{prefix}_cvr_auc_clicked"] == best["cvr_auc_clicked"], arm
            assert run[f"{prefix}_steps"] == best["steps"], arm
            # the second count resumed the first's checkpoint
            metrics = json.loads((seed_dir / arm / "metrics.json").read_text())
            assert (metrics["first_step"], metrics["steps"]) == (curve[0]["steps"], curve[1]["steps"]), arm
            # the last count's held-out pCVR AUC over clicked rows, recomputed from its predictions
            scores = pq.read_table(seed_dir / arm / "predict-heldout.parquet").to_pydict()
            heldout = pq.read_table(seed_dir / "heldout.parquet", columns=["click", "conversion"]).to_pydict()
            clicked = np.asarray(heldout["click"]) == 1
            if arm == "cvr-clicked":
                p_cvr = np.asarray(scores["score"])
            elif arm == "esmm":
                p_cvr = np.asarray(scores["conversion"]) / np.maximum(np.asarray(scores["click"]), 1e-12)
            else:
                p_cvr = np.asarray(scores["cvr"])
            want = roc_auc_score(np.asarray(heldout["conversion"])[clicked], p_cvr[clicked])
            assert abs(curve[1]["cvr_auc_clicked"] - want) < 1e-9, arm
            manifest = sorted((seed_dir / arm / "ckpt").glob("ckpt-*/manifest.json"))[-1]
            config = json.loads(manifest.read_text())["config"]
            model = "hybridps.models.esmm:build_conversion_tower" if arm == "cvr-clicked" else "esmm"
            assert (config["model"], config["seed"]) == (model, run["seed"])
            assert (config["optimizer"], config["dense_optimizer"]) == ("adagrad", "adagrad")
            assert config["learning_rate"] == config["dense_learning_rate"] == 0.1
            assert config["steps"] == curve[1]["steps"]
            labels = config["features"].get("labels")
            got = None if labels is None else [(t["name"], t.get("given"), t.get("ipw", False)) for t in labels]
            assert got == tasks[arm], arm
    assert {f"{prefix}_epochs" for prefix in prefixes.values()} <= set(report["median"])
    for key, median in report["median"].items():
        assert median == sum(run[key] for run in report["runs"]) / 2, key


@pytest.mark.mpi
def test_bench_train_multihot_workload_on_synthetic_and_parquet_data(tmp_path, mpi_env):
    """The multihot workload's cases (test_bench_train_default_cases_of_each_workload_and_data
    checks its default lists) in one run: BSP, ASP and the step without exchange on the
    generator, and BSP on Parquet files of the generator's samples."""
    from hybridps.bench.train import run_train_bench
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64,
                             dim=4, vocab_size=500, timeout=240, workload="multihot", data="parquet",
                             cases="hybridps-bsp,hybridps-asp,hybridps-step-no-exchange,hybridps-bsp-parquet",
                             one_job=True)
    assert [c["name"] for c in report["cases"]] == ["hybridps-bsp", "hybridps-asp", "hybridps-step-no-exchange",
                                                    "hybridps-bsp-parquet"]
    for case in report["cases"]:
        assert math.isfinite(case["final_loss"]) and measured(case["samples_per_s"])
    # the bare DeepFM has single-valued fields only: no ceiling for lists and sequences
    assert report["ratios"]["vs_ceiling"] is None and report["ratios"]["vs_tf_baseline"] is None
    assert [f["pooling"] for f in report["settings"]["features"]["sparse"][26:]] == ["mean"] * 3 + ["none"]
    cases = {c["name"]: c for c in report["cases"]}
    # the files hold the generator's samples of these steps: the same losses, read from disk
    assert cases["hybridps-bsp-parquet"]["final_loss"] == pytest.approx(cases["hybridps-bsp"]["final_loss"],
                                                                         rel=1e-6)
    reader = report["parquet_reader"]
    assert reader["files"] == 2 and reader["reader_batches_timed"] == 20
    assert measured(reader["reader_ms_per_batch_median_seen"])
    assert measured(reader["reader_ms_per_batch_median"])
    assert measured(report["ratios"]["parquet_vs_synthetic"])
    assert "Parquet reader:" in (tmp_path / "train.md").read_text()


@pytest.mark.mpi
def test_bench_realtime_follows_a_stream_into_serving_with_timed_deltas(tmp_path, mpi_env):
    """The pipeline end to end at a small size: every file reaches serving, the exports are
    spaced by the wall clock (--delta-every-seconds), the first is a full one, and their stream
    positions only move forward."""
    from hybridps.bench.realtime import run_realtime_bench
    from hybridps.checkpoint.files import load_manifest_json
    # 16 s of production: the ranks start within it (TF import) and follow it for several deltas
    report = run_realtime_bench(str(tmp_path), files=16, rows_per_file=256, interval_s=1.0,
                                batch_size=64, delta_every_seconds=1.0, full_export_every=3,
                                requests_batch1=30, requests_batch256=3, timeout=400,
                                bursts=2, burst_files=2, burst_interval_s=0.5, pause_s=4.0)
    for key in ("freshness_p50_s", "freshness_p99_s", "serve_p50_ms_batch1", "serve_p99_ms_batch1",
                "serve_rows_per_s_batch256"):
        assert measured(report[key]), key
    assert report["files_covered"] == 16           # 4096 rows = 32 steps of 128: all consumed
    assert len(report["freshness_s"]) == 16 and all(measured(s) for s in report["freshness_s"].values())
    exports = sorted(os.listdir(tmp_path / "deltas"))
    manifests = [load_manifest_json(str(tmp_path / "deltas" / name / "manifest.json"),
                                  "hybridps-full-export" if name.startswith("full-") else "hybridps-delta")
                 for name in exports]
    manifests.sort(key=lambda m: m["sequence"])
    assert [m["sequence"] for m in manifests] == list(range(1, len(manifests) + 1))
    assert manifests[0]["kind"] == "full" and len(manifests) >= 3
    assert [m["kind"] for m in manifests] == [("full" if i % 3 == 0 else "delta") for i in range(len(manifests))]
    times = [m["created_unix"] for m in manifests]
    # wall-clock spacing: at least the interval, less the time of one step (the last one is the end's)
    assert all(b - a >= 0.8 for a, b in zip(times[:-2], times[1:-1])), times
    consumed = [m["position"]["rows_consumed"] for m in manifests]
    assert consumed == sorted(consumed) and consumed[-1] == 4096
    with open(tmp_path / "realtime.json") as fh:
        assert json.load(fh)["files"] == 16
    # the bursty case: a first file, then 2 bursts of 2 files (256 rows: 2 whole steps each),
    # each followed by a pause
    bursty = report["bursty"]
    assert bursty["files"] == bursty["files_covered"] == 5
    assert bursty["last_files"] == ["events-000002.parquet", "events-000004.parquet"]
    assert len(report["burst_last_file_freshness_s"]) == 2
    assert None not in report["burst_last_file_freshness_s"]
    assert report["burst_last_file_freshness_max_s"] == max(report["burst_last_file_freshness_s"])
    bursty_exports = os.listdir(tmp_path / "bursty" / "deltas")
    assert any(name.startswith("full-") for name in bursty_exports)
    assert (tmp_path / "realtime.md").read_text().count("|") > 10
    assert os.path.getsize(tmp_path / "realtime.png") > 1000


@pytest.mark.mpi
def test_bench_capacity_measures_bytes_per_row_and_trains_to_the_distinct_keys_asked(tmp_path, mpi_env):
    from hybridps.bench.capacity import run_capacity_bench
    report = run_capacity_bench(str(tmp_path), table_rows=300_000, train_rows=200_000,
                                vocab_size=20_000, zipf_a=0.3, batch_size=64)
    table = report["table"]
    assert table["rows"] == 300_000
    assert table["payload_bytes_per_row"] == 8 + 16 * 4 * 2 + 8 + 8 + 4     # dim 16, Adagrad
    # the hash slots (load <= 0.7) and at most an eighth of unused row capacity, never 2x
    assert table["payload_bytes_per_row"] < table["allocated_bytes_per_row"] < 1.6 * table["payload_bytes_per_row"]
    train = report["train"]
    assert 0.99 * 200_000 <= train["rows"] <= 26 * 20_000
    assert measured(train["samples_per_s_start"]) and measured(train["samples_per_s_end"])
    assert len(train["peak_rss_mb_per_rank"]) == 2
    assert "bytes per row" in (tmp_path / "capacity.md").read_text()


def test_bench_train_runs_only_the_cases_asked_for(tmp_path, monkeypatch):
    """--cases: only those cases are launched, in the plan's order (no MPI job here: both cases
    run for real in test_bench_train_writes_every_case)."""
    from hybridps.bench.train import run_train_bench
    launched = fake_case_runs(monkeypatch, tmp_path)
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                             vocab_size=500, timeout=240, cases="bare-ceiling,hybridps-asp")
    assert [name for name, _, _ in launched] == ["hybridps-asp", "bare-ceiling"]
    assert [c["name"] for c in report["cases"]] == ["hybridps-asp", "bare-ceiling"]
    assert report["ratios"]["vs_ceiling"] is None and measured(report["other_ratios"]["asp_vs_ceiling"])


@pytest.mark.parametrize("workload, data, names", [
    # writes the Criteo files, fills their parsed cache and times their readers: `make test` runs it
    pytest.param("criteo", "file", ["hybridps-bsp", "bare-ceiling", "hybridps-step-no-exchange",
                                    "hybridps-bsp-tsv", "hybridps-bsp-adam-tsv", "hybridps-asp-tsv",
                                    "hybridps-bsp-criteo-parquet", "hybridps-bsp-criteo-parquet-cached",
                                    "tf-baseline-tsv", "tf-baseline-criteo-parquet"], marks=pytest.mark.slow),
    ("multihot", "synthetic", ["hybridps-bsp", "hybridps-asp", "hybridps-step-no-exchange"]),
    ("multihot", "parquet", ["hybridps-bsp", "hybridps-bsp-parquet"]),
])
def test_bench_train_default_cases_of_each_workload_and_data(tmp_path, monkeypatch, workload, data, names):
    """Without --cases, the cases a workload and data source run (no MPI job here: the cases
    run for real in the tests of each workload)."""
    from hybridps.bench.train import run_train_bench
    launched = fake_case_runs(monkeypatch, tmp_path)
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                             vocab_size=500, timeout=240, workload=workload, data=data, file_rows=2000)
    assert [c["name"] for c in report["cases"]] == [name for name, _, _ in launched] == names


@pytest.mark.mpi
def test_bench_train_criteo_files_runs_bsp_on_a_tsv_and_its_parquet_copy(tmp_path, mpi_env):
    import pandas as pd
    import pyarrow.parquet as pq
    from hybridps.bench.train import run_train_bench
    # the file cases and the ceiling they are compared with (the default list, with hybridps-bsp
    # and the step without exchange on synthetic data, is test_bench_train_default_cases_of_each_
    # workload_and_data's; those two run for real in test_bench_train_writes_every_case)
    file_cases = ["bare-ceiling", "hybridps-bsp-tsv", "hybridps-bsp-adam-tsv", "hybridps-asp-tsv",
                  "hybridps-bsp-criteo-parquet", "hybridps-bsp-criteo-parquet-cached", "tf-baseline-tsv",
                  "tf-baseline-criteo-parquet"]
    report = run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                             vocab_size=500, timeout=240, data="file", file_rows=2000, cases=",".join(file_cases),
                             one_job=True)
    assert [c["name"] for c in report["cases"]] == file_cases
    # the two files hold the same rows (read independently: pandas and pyarrow)
    tsv = pd.read_csv(tmp_path / "criteo.tsv", sep="\t", header=None, dtype=str)
    table = pq.read_table(tmp_path / "criteo.parquet").to_pandas()
    assert len(tsv) == len(table) == 2000
    assert list(tsv[14]) == list(table["C1"]) and list(tsv[0].astype(int)) == list(table["label"])
    for ratio in ("tsv_vs_ceiling", "adam_tsv_vs_ceiling", "asp_tsv_vs_bsp_tsv",
                  "criteo_parquet_vs_ceiling", "tsv_vs_tf_baseline",
                  "criteo_parquet_vs_tf_baseline", "criteo_parquet_cached_vs_ceiling"):
        assert measured(report["ratios"][ratio]), ratio
    for name, data in (("tf-baseline-tsv", "criteo.tsv"), ("tf-baseline-criteo-parquet", "criteo.parquet")):
        with open(tmp_path / f"{name}.json") as fh:        # the baseline read the file
            assert json.load(fh)["data"] == str(tmp_path / data)
    tsv_case = next(c for c in report["cases"] if c["name"] == "hybridps-bsp-tsv")
    assert measured(tsv_case["parse_ms_per_batch"])
    assert "Criteo TSV reader" in (tmp_path / "train.md").read_text()
    assert measured(report["criteo_parquet_reader"]["reader_ms_per_batch_median_seen"])
    assert "once every value has been seen" in (tmp_path / "train.md").read_text()
    # the cached case read every batch from the cache prepare-data filled (16 row groups)
    assert report["parsed_cache_fill"]["converted"] == 16 and report["parsed_cache_fill"]["rows"] == 2000
    by_name = {c["name"]: c for c in report["cases"]}
    cached, plain = by_name["hybridps-bsp-criteo-parquet-cached"], by_name["hybridps-bsp-criteo-parquet"]
    assert cached["data_cache"]["misses"] == 0 and cached["data_cache"]["hits"] > 0
    assert cached["final_loss"] == plain["final_loss"]          # the same rows, the same training
    assert measured(report["criteo_parquet_reader_cached"]["reader_ms_per_batch_median"])
    assert "through the parsed cache" in (tmp_path / "train.md").read_text()


def test_bare_ceiling_deepfm_computes_what_the_hybridps_deepfm_computes():
    """The bare ceiling times the same model: with the hybridps DeepFM's weights, its plain
    Keras DeepFM on (B, fields, dim) embeddings gives the same logits as the hybridps DeepFM on
    the per-field input dict."""
    import numpy as np
    import tensorflow as tf
    from hybridps.bench.train_worker import bare_deepfm
    from hybridps.config import make_config
    from hybridps.data import preset_shape
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    config = make_config(overrides={"dim": 4, "num_fields": 3, "num_dense": 2, "hidden": [5, 3]})
    schema = build_schema(config, *preset_shape(config))
    reference = build_model("deepfm", schema, config)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 3, 4)).astype(np.float32)
    dense = rng.normal(size=(7, 2)).astype(np.float32)
    inputs = {"dense": dense, **{f.name: emb[:, j] for j, f in enumerate(schema.single_features)}}
    expected = np.reshape(reference(inputs), [-1])
    bare = bare_deepfm(tf, 3, 4, 2, [5, 3], seed=1)
    layers = {"dense_linear": reference.dense_linear, "field_projection": reference.field_projection,
              "mlp_0": reference.mlp.hidden_layers[0], "mlp_1": reference.mlp.hidden_layers[1],
              "deep_head": reference.deep_head}
    for name, layer in layers.items():
        bare.get_layer(name).set_weights(layer.get_weights())
    got = np.reshape(bare([emb, dense]), [-1])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bench_realtime_bursty_schedule_pauses_after_each_burst():
    from hybridps.bench.realtime import bursty_schedule
    offsets, end_at, last = bursty_schedule(bursts=2, burst_files=3, burst_interval_s=1.0, pause_s=10.0)
    assert offsets == [0.0, 1.0, 2.0, 12.0, 13.0, 14.0] and end_at == 24.0 and last == [2, 5]


def test_bench_train_straggler_cases_launch_with_the_loader_delay_aid(tmp_path, monkeypatch):
    """The *-straggler cases slow rank 1's loader by STRAGGLER_MS through the testing aid's
    environment (hybridps.testing_hooks), the other cases run without it (no MPI job here)."""
    from hybridps.bench import train as bench_train
    launched = fake_case_runs(monkeypatch, tmp_path)
    bench_train.run_train_bench(str(tmp_path), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                                vocab_size=500, timeout=60, cases="hybridps-bsp,hybridps-asp-straggler")
    by_case = {name: (argv, env) for name, argv, env in launched}
    assert set(by_case) == {"hybridps-bsp", "hybridps-asp-straggler"}
    assert by_case["hybridps-bsp"][1] is None
    assert by_case["hybridps-asp-straggler"][1] == {"HYBRIDPS_TEST_LOADER_DELAY_MS": f"{bench_train.STRAGGLER_MS:g}",
                                                   "HYBRIDPS_TEST_DELAY_RANK": "1"}
    assert not any(a.startswith("--loader-delay") or a.startswith("--delay-rank")
                   for _, argv, _ in launched for a in argv)


def test_tf_baseline_evaluation_scores_every_held_out_row(tmp_path):
    """tf-baseline --eval-data: every row of the held-out file is scored once, and the metrics
    are hybridps.evaluation's (a predictor that ranks each positive above each negative: AUC 1;
    a constant one: 0.5)."""
    import argparse
    import numpy as np
    from hybridps.bench.train_worker import _evaluate
    from hybridps.comm import SingleProcessComm
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    labels = [1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1]
    path = tmp_path / "held_out.csv"
    path.write_text("label,item\n" + "".join(f"{y},{i}\n" for i, y in enumerate(labels)))
    config = make_config(overrides={"features": {"label": "label", "sparse": [{"name": "item", "table": "t"}],
                                                 "tables": {"t": {"dim": 4}}}})
    schema = build_schema(config)
    args = argparse.Namespace(eval_data=str(path), batch_size=4)
    seen = []

    def by_label(batch):
        seen.extend(batch.labels.tolist())
        return 4.0 * batch.labels - 2.0
    metrics = _evaluate(SingleProcessComm(), config, schema, args, by_label)
    assert (metrics["rows"], metrics["positives"], metrics["auc"]) == (len(labels), sum(labels), 1.0)
    assert sorted(seen) == sorted(labels)
    constant = _evaluate(SingleProcessComm(), config, schema, args, lambda b: np.zeros(len(b.labels)))
    assert constant["auc"] == 0.5


def test_bench_train_reports_the_in_situ_tf_step_against_the_bare_step():
    """2 ranks of 4096 rows at 163,840 samples/s: a bare step of 2 * 4096 / 163840 s = 50 ms; a
    BSP case whose compute phase is 60 ms is 1.2x it, and its pull + push 14 + 9 = 23 ms."""
    from hybridps.bench.train import CEILING, in_situ_steps
    cases = [{"name": CEILING, "samples_per_s": 163840.0},
             {"name": "hybridps-bsp-tsv", "samples_per_s": 90000.0,
              "phase_ms_per_step": {"compute": 60.0, "dense": 0.1, "pull": 14.0, "push": 9.0}},
             {"name": "tf-baseline", "samples_per_s": 80000.0}]
    steps = in_situ_steps(cases, ranks=2, batch_size=4096)
    assert list(steps) == ["hybridps-bsp-tsv"]
    step = steps["hybridps-bsp-tsv"]
    assert step["bare_step_ms"] == pytest.approx(50.0)
    assert step["compute_vs_bare_step"] == pytest.approx(1.2)
    assert step["pull_push_ms"] == pytest.approx(23.0)
    assert in_situ_steps(cases[1:], ranks=2, batch_size=4096) == {}     # no bare ceiling ran


def test_one_job_runs_a_rounds_cases_in_one_mpirun_as_their_own_jobs_would(tmp_path, monkeypatch):
    """--one-job: one mpirun of hybridps.bench.shared_job for the round, listing each case with
    the command line and testing-aid environment its own job gets, and --timeout per case (no
    MPI job here: the cases run in one job for real in test_bench_train_writes_every_case)."""
    from hybridps.bench import train as bench_train
    cases = "hybridps-bsp,hybridps-asp-straggler,bare-ceiling"
    own_jobs = fake_case_runs(monkeypatch, tmp_path / "own")
    bench_train.run_train_bench(str(tmp_path / "own"), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                                vocab_size=500, timeout=60, cases=cases)
    launched = []

    def fake_mpirun(ranks, argv, timeout, env=None):
        launched.append((ranks, argv, timeout, env))
        with open(argv[2]) as fh:
            listed = json.load(fh)["cases"]
        for case in listed:
            (path,) = [a for a in case["argv"] if a.endswith(".json")]
            with open(path, "w") as fh:
                json.dump({"samples_per_s": 1.0, "final_loss": 0.5, "auc": 0.5}, fh)
        with open(argv[2] + ".walls.json", "w") as fh:
            json.dump({case["name"]: 2.0 + i for i, case in enumerate(listed)}, fh)
        return 9.0

    monkeypatch.setattr(bench_train, "_mpirun", fake_mpirun)
    one = tmp_path / "one"
    report = bench_train.run_train_bench(str(one), ranks=2, steps=4, warmup_steps=1, batch_size=64, dim=4,
                                         vocab_size=500, timeout=60, cases=cases, one_job=True)
    ((ranks, argv, timeout, env),) = launched
    assert (ranks, argv[:2], timeout, env) == (2, ["-m", "hybridps.bench.shared_job"], 3 * 60, None)
    with open(argv[2]) as fh:
        listed = json.load(fh)["cases"]
    own = str(tmp_path / "own")
    assert [(c["name"], [a.replace(str(one), own) for a in c["argv"]], c["env"]) for c in listed] == own_jobs
    assert [(c["name"], c["wall_s"]) for c in report["cases"]] == [
        ("hybridps-bsp", 2.0), ("hybridps-asp-straggler", 3.0), ("bare-ceiling", 4.0)]


def test_one_job_runs_the_cases_without_horovod_first_each_with_its_own_testing_aids(tmp_path, monkeypatch):
    """The job's worker (its MPI and programs stubbed): the bare ceiling and hybridps's step
    without exchange before the cases that start Horovod, otherwise in the listed order; a
    straggler case's loader delay set for that case alone; each case's wall time written."""
    from hybridps import comm as comm_module
    from hybridps import testing_hooks
    from hybridps.bench import shared_job

    class Comm:
        rank = 0

        def barrier(self):
            pass

    ran = []
    monkeypatch.setattr(comm_module, "init", lambda with_horovod: Comm())
    monkeypatch.setattr(shared_job, "_release_previous_case", lambda: ran.append("released"))
    monkeypatch.setattr(shared_job, "_cli_main", lambda argv: ran.append((argv[0], testing_hooks.active())))
    monkeypatch.setattr(shared_job, "_worker_main", lambda argv: ran.append((argv[0], testing_hooks.active())))
    straggler = testing_hooks.environment(loader_delay_ms=15.0, delay_rank=1)
    cases = [{"name": "bsp", "argv": ["-m", "hybridps.cli", "train"], "env": None},
             {"name": "tf", "argv": ["-m", "hybridps.bench.train_worker", "tf-baseline"], "env": None},
             {"name": "slow", "argv": ["-m", "hybridps.cli", "join"], "env": straggler},
             {"name": "step", "argv": ["-m", "hybridps.bench.train_worker", "hybridps-step"], "env": None},
             {"name": "bare", "argv": ["-m", "hybridps.bench.train_worker", "bare-ceiling"], "env": None}]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"cases": cases}))
    try:
        shared_job.main(str(path))
        after = testing_hooks.active()
    finally:
        testing_hooks.use()
    none, slow = testing_hooks.TestingHooks(), testing_hooks.TestingHooks(loader_delay_ms=15.0, delay_rank=1)
    assert ran == [("hybridps-step", none), "released", ("bare-ceiling", none), "released",
                   ("train", none), "released", ("tf-baseline", none), "released", ("join", slow)]
    assert after == none
    walls = json.loads((tmp_path / "cases.json.walls.json").read_text())
    assert list(walls) == ["step", "bare", "bsp", "tf", "slow"] and all(measured(w) for w in walls.values())


@pytest.mark.parametrize("case, message", [
    ({"name": "x", "argv": ["-m", "os", "rm"], "env": None}, "one job runs `-m` hybridps.cli or"),
    ({"name": "x", "argv": ["train.py"], "env": None}, "one job runs"),
    ({"name": "x", "argv": ["-m", "hybridps.cli", "train"], "env": {"PATH": "/tmp"}}, r"testing aids' variables only, got \['PATH'\]"),
])
def test_one_job_refuses_a_case_it_cannot_run_as_its_own_job_would(case, message):
    from hybridps.bench.shared_job import check_cases
    with pytest.raises(ValueError, match=message):
        check_cases([case])


def test_bench_multitask_epochs_are_one_count_or_several_ascending_ones():
    """--epochs of bench multitask: "20" or "2,5,10" as given; anything else names the flag."""
    from hybridps.bench.multitask import epoch_counts_of
    from hybridps.errors import ConfigError
    assert epoch_counts_of("20") == [20]
    assert epoch_counts_of("2,5,10") == [2, 5, 10]
    for bad in ("", "0", "5,2", "2,2", "two", "2,,5"):
        with pytest.raises(ConfigError, match="--epochs"):
            epoch_counts_of(bad)
