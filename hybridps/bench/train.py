"""``hybridps bench train``: DeepFM training throughput on N ranks, every case in one run.

Cases (docs/benchmarks.md; 26 categorical fields, 13 dense, dim 16, batch 4096 per rank,
Zipf IDs, Adagrad):
  * ``hybridps-bsp``: ``hybridps train --sync bsp`` (sharded hash tables over alltoallv,
    dense allreduce through Horovod);
  * ``hybridps-ssp1``, ``hybridps-ssp4``, ``hybridps-asp``: the same with ``--sync ssp
    --staleness 1`` / ``4`` and ``--sync asp``; ``hybridps-ssp1-dense1`` adds
    ``--dense-staleness 1`` to SSP(1);
  * ``hybridps-bsp-straggler``, ``hybridps-ssp1-straggler``, ``hybridps-asp-straggler``: BSP,
    SSP(1) and ASP with rank 1's data loader sleeping ``STRAGGLER_MS`` per batch (a slow disk
    or preprocessing on one node): what not waiting for the slower rank is worth;
  * ``tf-baseline``: plain TF + Horovod, fixed-size Embedding over hashed buckets, gradients
    through hvd.DistributedGradientTape (hybridps.bench.train_worker);
  * ``hybridps-bsp-adam``, ``tf-baseline-adam``: both with Adam instead (hybridps: lazy Adam
    on the rows a step touches; Keras: both moment slots of the whole bucket table decay
    every step);
  * ``bare-ceiling``: the compute ceiling, the bare TF step of the same DeepFM in plain Keras
    layers on embeddings already in memory as (B, fields, dim) tensors, no hybridps code in
    the step (hybridps.bench.train_worker); every ``fraction_of_ceiling`` is against it;
  * ``hybridps-step-no-exchange``: hybridps's own TF step (the gathers from unique rows, the
    gradient sums per row, the separate dense apply) on rows already in memory, no
    communication: the in-situ step, next to the bare one (``in_situ_vs_bare``);
  * ``hybridps-bsp-tsv``, ``hybridps-bsp-criteo-parquet`` (``--data file``): BSP on a 300k-line
    Criteo TSV (the Criteo reader, which parses its share at start-up) and on the same rows as
    Parquet (a ``features:`` schema of 26 text and 13 log1p columns), against the ceiling, and
    ``tf-baseline-tsv``, ``tf-baseline-criteo-parquet``: the TF baseline on the same files
    through the same readers; ``hybridps-bsp-adam-tsv`` and ``hybridps-asp-tsv``: Adam and ASP
    on the TSV, whose keys have Criteo's hot heads and long tails (Zipf(1.2) per field);
    ``hybridps-bsp-criteo-parquet-cached``: BSP on the Parquet copy
    through a cache of its parsed row groups (``--data-cache``) that ``hybridps prepare-data``
    filled before the first round (its time reported as ``parsed_cache_fill``), and
    ``hybridps-asp-criteo-parquet-cached``, the same with ``--sync asp`` (only when named in
    ``--cases``);
  * ``--workload multitask``: MMoE on two tasks (a click and a conversion after a click,
    hybridps.data.synthetic_schema) over 26 single-valued fields and 13 dense:
    ``hybridps-bsp`` against ``hybridps-step-no-exchange`` (hybridps's MMoE step, no
    communication: ``bsp_vs_step_no_exchange``; there is no bare MMoE);
  * ``hybridps-bsp-parquet`` (``--workload multihot --data parquet``): BSP reading the same
    workload from Parquet files written first (hybridps.bench.parquet_data), against
    ``hybridps-bsp`` on the synthetic generator; the reader's ms per batch on one core is
    measured on the files too.
Each case is its own ``mpirun`` job, run one after another on the same machine, so the
ratios compare like with like; with ``--one-job`` a round's cases run one after another in one
``mpirun`` job instead (hybridps.bench.shared_job: one TensorFlow import and MPI start for all,
for quick checks of small runs; each case still has its own model, data, timers and result
file). With ``--repeats R`` the whole list runs R times round-robin (so a slow spell of a shared machine hits every case alike) and each case reports the run with
its median samples/s, plus every run's figure. Writes DIR/train.json, DIR/train.md, DIR/train.png.
"""
import json
import os
import subprocess
import sys
import time

from hybridps import testing_hooks
from hybridps.bench.report import bar_chart, bench_environment, markdown_table, write_json
from hybridps.bench.shared_job import run_cases_in_one_job
from hybridps.wording import counted

OVERSUBSCRIBE_ENV = {"OMPI_MCA_mpi_yield_when_idle": "1", "OMP_NUM_THREADS": "1",
                     "HYBRIDPS_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                     "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

# every *_vs_ceiling ratio is against the bare ceiling (the TF step with no hybridps code)
TARGETS = {"vs_tf_baseline": 5.0, "vs_ceiling": 0.7, "asp_vs_bsp": 1.15, "ssp1_vs_bsp": 1.1,
           "parquet_vs_synthetic": 0.9, "tsv_vs_ceiling": 0.7, "adam_tsv_vs_ceiling": 0.65,
           "asp_tsv_vs_bsp_tsv": 1.15, "criteo_parquet_vs_ceiling": 0.7,
           "criteo_parquet_cached_vs_ceiling": 0.7, "tsv_vs_tf_baseline": 1.3,
           "criteo_parquet_vs_tf_baseline": 1.3}
CEILING = "bare-ceiling"
# upper bounds: a hybridps case's TF step (its compute phase) against the bare step, and its
# pull + push per step on a Criteo-like file
STEP_TARGETS = {"compute_vs_bare_step": 1.1, "pull_push_ms": 25.0}
PARQUET_BATCHES_PER_RANK = 32     # row groups written per rank (longer runs wrap the epoch)


def multihot_features(num_fields=26, num_dense=13, dim=16, multi_hot=3, max_len=50):
    """The ``features:`` schema of the multihot workload: ``num_fields`` single-valued fields in
    one table (each its own key space, as the Criteo preset keeps its fields apart), ``multi_hot``
    mean-pooled list fields in a second table, one sequence of at most ``max_len`` ids in a
    third; every table at ``dim`` (DeepFM's FM term needs one dim). List lengths follow the
    synthetic generator's law (mean list_mean_length 10, at most list_max_length 50)."""
    return {"label": "label",
            "dense": [{"name": f"I{i + 1}"} for i in range(num_dense)],
            "sparse": ([{"name": f"C{i + 1}", "table": "fields", "key_space": f"C{i + 1}"}
                        for i in range(num_fields)]
                       + [{"name": f"tags{i + 1}", "table": "tags", "pooling": "mean",
                           "key_space": f"tags{i + 1}"} for i in range(multi_hot)]
                       + [{"name": "history", "table": "items", "pooling": "none", "max_len": max_len}]),
            "tables": {"fields": {"dim": dim}, "tags": {"dim": dim}, "items": {"dim": dim}}}


def multitask_features(num_fields=26, num_dense=13, dim=16):
    """The ``features:`` schema of the multitask workload: ``num_fields`` single-valued fields in
    one table (each its own key space), ``num_dense`` dense features, and two binary tasks: the
    click and the conversion (over every impression: 0 without a click)."""
    return {"labels": [{"name": "click"}, {"name": "conversion"}],
            "dense": [{"name": f"I{i + 1}"} for i in range(num_dense)],
            "sparse": [{"name": f"C{i + 1}", "table": "fields", "key_space": f"C{i + 1}"}
                       for i in range(num_fields)],
            "tables": {"fields": {"dim": dim}}}


# Cases per workload (the multihot workload has no TF baseline: a fixed Embedding layer has no
# pooling of lists in the baseline program; nor has the multitask one: the baseline's loss is
# one logloss). Their yardstick is hybridps's own step without exchange (no bare model of them).
WORKLOADS = {"criteo": None, "multihot": ("hybridps-bsp", "hybridps-asp", "hybridps-step-no-exchange"),
             "multitask": ("hybridps-bsp", "hybridps-step-no-exchange")}
WORKLOAD_FEATURES = {"multihot": multihot_features, "multitask": multitask_features}
WORKLOAD_MODELS = {"multitask": "mmoe"}        # the others: deepfm
STRAGGLER_MS = 15.0      # about a quarter of a DeepFM step at batch 4096 on this machine
# the *-straggler cases: rank 1's loader sleeps STRAGGLER_MS per batch (hybridps.testing_hooks)
STRAGGLER_ENV = testing_hooks.environment(loader_delay_ms=STRAGGLER_MS, delay_rank=1)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096, help="per rank")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=100_000, help="ids per field")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per case")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every case this many times (round-robin); report the median run")
    add_one_job_argument(parser)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="criteo",
                        help="criteo: 26 single-valued fields (docs/benchmarks.md); multihot: 26 "
                             "single-valued fields, 3 mean-pooled multi-hot fields and a sequence; "
                             "multitask: MMoE on a click and a conversion task")
    parser.add_argument("--cases", help="comma-separated case names to run (default: all of the workload)")
    parser.add_argument("--data", choices=["synthetic", "parquet", "file"], default="synthetic",
                        help="multihot workload: parquet writes the workload to Parquet files first "
                             "and runs BSP on them next to BSP on the synthetic generator; criteo "
                             "workload: file runs BSP on a 300k-line Criteo TSV and on its Parquet "
                             "copy next to BSP on synthetic data and the compute ceiling")


def add_one_job_argument(parser):
    """The ``--one-job`` flag of bench train and bench compare."""
    parser.add_argument("--one-job", action="store_true",
                        help="run a round's cases one after another in one mpirun job (one TensorFlow "
                             "import and MPI start for all; each case keeps its own model, data, timers "
                             "and result file; hybridps.bench.shared_job) instead of one job per case; "
                             "--timeout stays per case")


def _mpirun(ranks, argv, timeout, env=None):
    command = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none",
               sys.executable] + argv
    env = dict(os.environ, **OVERSUBSCRIBE_ENV, **(env or {}))
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case failed ({' '.join(command)}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started


def in_situ_steps(cases, ranks, batch_size):
    """{case: its TF step (the compute phase, ms, max over ranks), the bare step's ms, their
    ratio and its pull + push ms} for every hybridps case with phases, when the bare ceiling ran.
    The bare step's ms: each of ``ranks`` ranks steps through ``batch_size`` rows, so one step
    takes ranks * batch_size / (its samples/s) seconds."""
    bare = next((c for c in cases if c["name"] == CEILING), None)
    if bare is None or not bare["samples_per_s"]:
        return {}
    bare_ms = 1000.0 * ranks * batch_size / bare["samples_per_s"]
    steps = {}
    for case in cases:
        phases = case.get("phase_ms_per_step")
        if phases:
            steps[case["name"]] = {"compute_ms": phases["compute"], "bare_step_ms": bare_ms,
                                   "compute_vs_bare_step": phases["compute"] / bare_ms,
                                   "pull_push_ms": phases["pull"] + phases["push"]}
    return steps


def run_rounds(plan, repeats, run_case, run_round=None):
    """Run ``run_case(name, argv)`` for every case of ``plan`` ``repeats`` times, round-robin
    (or, given ``run_round``, ``run_round(plan)`` -> {name: result} once per round: every case
    of a round in one job); returns {name: the result whose samples_per_s is the median of its
    runs (the upper one of an even count), with every run's figure in ``samples_per_s_runs``}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = {name: [] for name, _ in plan}
    for round_index in range(repeats):
        if run_round is not None:
            if repeats > 1:
                sys.stderr.write(f"round {round_index + 1}/{repeats}:\n")
            results = run_round(plan)
            for name, _ in plan:
                runs[name].append(results[name])
            continue
        for name, argv in plan:
            if repeats > 1:
                sys.stderr.write(f"round {round_index + 1}/{repeats}: ")
            runs[name].append(run_case(name, argv))
    chosen = {}
    for name, results in runs.items():
        ordered = sorted(results, key=lambda r: r["samples_per_s"])
        median = dict(ordered[len(ordered) // 2])
        median["samples_per_s_runs"] = [r["samples_per_s"] for r in results]
        chosen[name] = median
    return chosen


def run_plan(label, plan, repeats, one_job, ranks, timeout, list_path, case_argv, case_env,
             case_result, what=""):
    """Run the cases of ``plan`` ``repeats`` times (:func:`run_rounds`), each in its own
    ``mpirun`` job of ``ranks`` ranks or, with ``one_job``, a round's cases in one
    (hybridps.bench.shared_job, its list of cases written to ``list_path``).
    ``case_argv(name, argv)`` is a case's command line, ``case_env(name)`` its testing aids'
    environment (or None), ``case_result(name, wall_s)`` its result read back; ``label`` and
    ``what`` word the progress lines. Returns run_rounds's {name: median result}."""
    def run_case(name, argv):
        sys.stderr.write(f"{label}: {name} on {counted(ranks, 'rank')}{what} ...\n")
        return case_result(name, _mpirun(ranks, case_argv(name, argv), timeout, case_env(name)))

    def run_round(plan):
        sys.stderr.write(f"{label}: {counted(len(plan), 'case')} in one job on {counted(ranks, 'rank')}{what} ...\n")
        walls = run_cases_in_one_job(_mpirun, ranks, [
            {"name": name, "argv": case_argv(name, argv), "env": case_env(name)} for name, argv in plan],
            timeout * len(plan), list_path)
        return {name: case_result(name, walls[name]) for name, _ in plan}

    return run_rounds(plan, repeats, run_case, run_round if one_job else None)


def run_train_bench(out_dir, ranks=2, steps=110, warmup_steps=10, batch_size=4096, dim=16,
                    vocab_size=100_000, timeout=1200, repeats=1, workload="criteo", cases=None,
                    data="synthetic", file_rows=300_000, one_job=False):
    """Run every case (``repeats`` rounds) of a workload, each in its own mpirun job or, with
    ``one_job``, a round's cases in one (hybridps.bench.shared_job); returns the train.json object."""
    os.makedirs(out_dir, exist_ok=True)
    if data == "parquet" and workload != "multihot":
        raise SystemExit("bench train: --data parquet needs --workload multihot (a schema workload; "
                         "the criteo workload's TF baseline reads synthetic data only); --data file "
                         "runs the criteo workload on a TSV file and its Parquet copy")
    if data == "file" and workload != "criteo":
        raise SystemExit("bench train: --data file runs the criteo workload (a Criteo TSV and its "
                         "Parquet copy); the multihot workload takes --data parquet")
    common = ["--steps", str(steps), "--warmup-steps", str(warmup_steps), "--batch-size",
              str(batch_size), "--dim", str(dim), "--vocab-size", str(vocab_size)]
    model = WORKLOAD_MODELS.get(workload, "deepfm")
    if workload in WORKLOAD_FEATURES:
        import yaml
        config = os.path.join(out_dir, f"{workload}.yaml")
        with open(config, "w") as fh:
            yaml.safe_dump({"features": WORKLOAD_FEATURES[workload](dim=dim)}, fh, sort_keys=False)
        common += ["--config", config]
    common += ["--model", model]

    def hybridps_train(optimizer):
        return ["-m", "hybridps.cli", "train", "--data", "synthetic",
                "--mode", "collective", "--optimizer", optimizer, "--no-progress",
                # the baselines' optimizer and rate on every variable, the dense ones too
                "--dense-optimizer", optimizer, "--dense-learning-rate", "0.05"]
    train = hybridps_train("adagrad")
    plan = [
        ("hybridps-bsp", train + ["--sync", "bsp", "--metrics-out"]),
        ("hybridps-ssp1", train + ["--sync", "ssp", "--staleness", "1", "--metrics-out"]),
        ("hybridps-ssp1-dense1", train + ["--sync", "ssp", "--staleness", "1", "--dense-staleness", "1",
                                          "--metrics-out"]),
        ("hybridps-ssp4", train + ["--sync", "ssp", "--staleness", "4", "--metrics-out"]),
        ("hybridps-asp", train + ["--sync", "asp", "--metrics-out"]),
        ("hybridps-bsp-straggler", train + ["--sync", "bsp", "--metrics-out"]),
        ("hybridps-ssp1-straggler", train + ["--sync", "ssp", "--staleness", "1", "--metrics-out"]),
        ("hybridps-asp-straggler", train + ["--sync", "asp", "--metrics-out"]),
        ("tf-baseline", ["-m", "hybridps.bench.train_worker", "tf-baseline"]),
        ("hybridps-bsp-adam", hybridps_train("adam") + ["--sync", "bsp", "--metrics-out"]),
        ("tf-baseline-adam", ["-m", "hybridps.bench.train_worker", "tf-baseline", "--optimizer", "adam"]),
        ("bare-ceiling", ["-m", "hybridps.bench.train_worker", "bare-ceiling"]),
        ("hybridps-step-no-exchange", ["-m", "hybridps.bench.train_worker", "hybridps-step"]),
    ]
    if workload == "multihot":       # the bare DeepFM has single-valued fields only
        plan = [(name, argv) for name, argv in plan if name != CEILING]
    reader = None
    if data == "file":
        from hybridps.bench.parquet_data import criteo_file_features, write_criteo_files
        import yaml
        sys.stderr.write(f"bench train: writing a Criteo TSV and its Parquet copy to {out_dir} ...\n")
        tsv, parquet = write_criteo_files(out_dir, rows=file_rows, vocab_size=vocab_size)
        schema_config = os.path.join(out_dir, "criteo-parquet.yaml")
        with open(schema_config, "w") as fh:
            yaml.safe_dump({"features": criteo_file_features(dim)}, fh, sort_keys=False)
        plan.append(("hybridps-bsp-tsv", train + ["--sync", "bsp", "--data", tsv, "--metrics-out"]))
        plan.append(("hybridps-bsp-adam-tsv", hybridps_train("adam") + ["--sync", "bsp", "--data", tsv,
                                                                       "--metrics-out"]))
        plan.append(("hybridps-asp-tsv", train + ["--sync", "asp", "--data", tsv, "--metrics-out"]))
        plan.append(("hybridps-bsp-criteo-parquet", train + ["--sync", "bsp", "--data", parquet,
                                                             "--config", schema_config, "--metrics-out"]))
        parsed_cache = os.path.join(out_dir, "parsed-cache")
        plan.append(("hybridps-bsp-criteo-parquet-cached", train + [
            "--sync", "bsp", "--data", parquet, "--config", schema_config, "--data-cache", parsed_cache,
            "--metrics-out"]))
        plan.append(("hybridps-asp-criteo-parquet-cached", train + [     # only with --cases
            "--sync", "asp", "--data", parquet, "--config", schema_config, "--data-cache", parsed_cache,
            "--metrics-out"]))
        baseline = ["-m", "hybridps.bench.train_worker", "tf-baseline"]
        plan.append(("tf-baseline-tsv", baseline + ["--data", tsv]))
        plan.append(("tf-baseline-criteo-parquet", baseline + ["--data", parquet, "--config", schema_config]))
    if data == "parquet":
        files, reader = _parquet_files(out_dir, config, ranks, batch_size, vocab_size)
        plan.append(("hybridps-bsp-parquet", train + ["--sync", "bsp", "--data", files, "--metrics-out"]))
    wanted = set(cases.split(",")) if cases else (
        ("hybridps-bsp", "hybridps-bsp-parquet") if data == "parquet" else
        ("hybridps-bsp", "hybridps-bsp-tsv", "hybridps-bsp-adam-tsv", "hybridps-asp-tsv",
         "hybridps-bsp-criteo-parquet", "hybridps-bsp-criteo-parquet-cached", CEILING,
         "hybridps-step-no-exchange", "tf-baseline-tsv", "tf-baseline-criteo-parquet")
        if data == "file" else WORKLOADS[workload])
    if wanted is not None:
        unknown = sorted(set(wanted) - {name for name, _ in plan})
        if unknown:
            raise SystemExit(f"bench train: unknown case(s) {unknown}; cases: {[n for n, _ in plan]}")
        plan = [(name, argv) for name, argv in plan if name in wanted]
    cache_fill = None
    if any(name.endswith("-criteo-parquet-cached") for name, _ in plan):
        cache_fill = _fill_parsed_cache(parsed_cache, parquet, schema_config)

    def case_argv(name, argv):
        return argv + [os.path.join(out_dir, f"{name}.json")] + common

    def case_env(name):
        return STRAGGLER_ENV if name.endswith("-straggler") else None

    def case_result(name, wall):
        with open(os.path.join(out_dir, f"{name}.json")) as fh:
            result = json.load(fh)
        sys.stderr.write(f"  {name}: {result['samples_per_s']:,.0f} samples/s, loss {result['final_loss']:.4f}, "
                         f"auc {result['auc']:.4f}\n")
        return dict(result, wall_s=wall)

    chosen = run_plan("bench train", plan, repeats, one_job, ranks, timeout,
                      os.path.join(out_dir, "one-job-cases.json"), case_argv, case_env, case_result,
                      f", {steps} steps")
    cases = []                       # the list of results (``cases`` named the wanted ones)
    for name, _ in plan:
        result = chosen[name]
        case = {"name": name, "samples_per_s": result["samples_per_s"],
                "samples_per_s_runs": result["samples_per_s_runs"],
                "final_loss": result["final_loss"], "auc": result["auc"], "ranks": ranks,
                "wall_s": result["wall_s"]}
        if "phase_ms_per_step_max_over_ranks" in result:
            case["phase_ms_per_step"] = result["phase_ms_per_step_max_over_ranks"]
            case["staleness_max"] = result["staleness_max"]
            case["staleness_mean"] = result["staleness_mean"]
            case["dense_staleness_max"] = result.get("dense_staleness_max")
            case["bytes_per_step"] = (result["exchange"]["bytes_sent_per_step"]
                                      + result["exchange"]["bytes_received_per_step"])
        if "cache" in (result.get("data_stats") or {}):
            case["data_cache"] = {k: result["data_stats"]["cache"][k] for k in ("hits", "misses")}
        per_rank = (result.get("data_stats") or {}).get("per_rank") or []
        if any("parse_seconds" in r for r in per_rank):     # readers that parse at start-up
            slowest = max(per_rank, key=lambda r: r.get("parse_seconds", 0.0))
            case["parse_ms_per_batch"] = 1000.0 * slowest["parse_seconds"] / max(slowest["rows"] / batch_size, 1e-9)
        cases.append(case)
    by_name = {c["name"]: c["samples_per_s"] for c in cases}
    ours, ceiling = by_name.get("hybridps-bsp"), by_name.get(CEILING)
    for case in cases:
        case["fraction_of_ceiling"] = case["samples_per_s"] / ceiling if ceiling else None
        case["vs_bsp"] = case["samples_per_s"] / ours if ours else None

    def ratio(a, b):
        return by_name[a] / by_name[b] if a in by_name and b in by_name else None

    ratios = {"vs_tf_baseline": ratio("hybridps-bsp", "tf-baseline"),
              "vs_ceiling": ratio("hybridps-bsp", CEILING),
              "asp_vs_bsp": ratio("hybridps-asp", "hybridps-bsp"),
              "ssp1_vs_bsp": ratio("hybridps-ssp1", "hybridps-bsp"),
              "parquet_vs_synthetic": ratio("hybridps-bsp-parquet", "hybridps-bsp"),
              "tsv_vs_ceiling": ratio("hybridps-bsp-tsv", CEILING),
              "adam_tsv_vs_ceiling": ratio("hybridps-bsp-adam-tsv", CEILING),
              "asp_tsv_vs_bsp_tsv": ratio("hybridps-asp-tsv", "hybridps-bsp-tsv"),
              "criteo_parquet_vs_ceiling": ratio("hybridps-bsp-criteo-parquet", CEILING),
              "criteo_parquet_cached_vs_ceiling": ratio("hybridps-bsp-criteo-parquet-cached", CEILING),
              "tsv_vs_tf_baseline": ratio("hybridps-bsp-tsv", "tf-baseline-tsv"),
              "criteo_parquet_vs_tf_baseline": ratio("hybridps-bsp-criteo-parquet", "tf-baseline-criteo-parquet")}
    informational = {"in_situ_vs_bare": ratio("hybridps-step-no-exchange", CEILING),
                     # the multihot and multitask workloads' yardstick (no bare model of them)
                     "bsp_vs_step_no_exchange": ratio("hybridps-bsp", "hybridps-step-no-exchange"),
                     "adam_vs_tf_baseline_adam": ratio("hybridps-bsp-adam", "tf-baseline-adam"),
                     "adam_vs_ceiling": ratio("hybridps-bsp-adam", CEILING),
                     "asp_vs_ceiling": ratio("hybridps-asp", CEILING),
                     "asp_criteo_parquet_cached_vs_ceiling": ratio("hybridps-asp-criteo-parquet-cached",
                                                                   CEILING),
                     "ssp1_dense1_vs_bsp": ratio("hybridps-ssp1-dense1", "hybridps-bsp"),
                     "ssp1_vs_bsp_with_straggler": ratio("hybridps-ssp1-straggler", "hybridps-bsp-straggler"),
                     "asp_vs_bsp_with_straggler": ratio("hybridps-asp-straggler", "hybridps-bsp-straggler")}
    step_times = in_situ_steps(cases, ranks, batch_size)
    report = {"cases": cases, "ratios": ratios, "targets": TARGETS, "other_ratios": informational,
              "in_situ_steps": step_times,
              "workload": workload,
              "settings": {"ranks": ranks, "steps": steps, "warmup_steps": warmup_steps, "repeats": repeats,
                           "straggler_ms": STRAGGLER_MS, "workload": workload,
                           "batch_size_per_rank": batch_size, "dim": dim, "vocab_size": vocab_size,
                           "model": model, "num_fields": 26, "num_dense": 13},
              "machine": bench_environment()}
    if workload in WORKLOAD_FEATURES:
        report["settings"]["features"] = WORKLOAD_FEATURES[workload](dim=dim)
    if reader is not None:
        report["parquet_reader"] = reader
    if data == "file":
        from hybridps.bench.parquet_data import time_reader
        from hybridps.config import make_config
        from hybridps.schema import build_schema
        schema = build_schema(make_config(schema_config, {}))
        report["criteo_parquet_reader"] = time_reader([parquet], schema, batch_size)
        if cache_fill is not None:
            report["parsed_cache_fill"] = cache_fill
            report["criteo_parquet_reader_cached"] = time_reader([parquet], schema, batch_size,
                                                                 data_cache=parsed_cache)
    write_json(os.path.join(out_dir, "train.json"), report)
    table = markdown_table(cases, [("name", "case", ""), ("samples_per_s", "samples/s", ",.0f"),
                                   ("fraction_of_ceiling", "of ceiling", ".2f"), ("vs_bsp", "vs BSP", ".2f"),
                                   ("final_loss", "final loss", ".4f"), ("auc", "AUC", ".4f"),
                                   ("staleness_max", "staleness max", ""),
                                   ("staleness_mean", "staleness mean", ".2f"),
                                   ("dense_staleness_max", "dense staleness max", ""), ("ranks", "ranks", "")])
    labels = {"vs_tf_baseline": "hybridps-bsp / tf-baseline", "vs_ceiling": f"hybridps-bsp / {CEILING}",
              "asp_vs_bsp": "hybridps-asp / hybridps-bsp", "ssp1_vs_bsp": "hybridps-ssp1 / hybridps-bsp",
              "parquet_vs_synthetic": "hybridps-bsp-parquet / hybridps-bsp",
              "tsv_vs_ceiling": f"hybridps-bsp-tsv / {CEILING}",
              "adam_tsv_vs_ceiling": f"hybridps-bsp-adam-tsv / {CEILING}",
              "asp_tsv_vs_bsp_tsv": "hybridps-asp-tsv / hybridps-bsp-tsv",
              "criteo_parquet_vs_ceiling": f"hybridps-bsp-criteo-parquet / {CEILING}",
              "criteo_parquet_cached_vs_ceiling": f"hybridps-bsp-criteo-parquet-cached / {CEILING}",
              "tsv_vs_tf_baseline": "hybridps-bsp-tsv / tf-baseline-tsv",
              "criteo_parquet_vs_tf_baseline": "hybridps-bsp-criteo-parquet / tf-baseline-criteo-parquet"}
    lines = [table, "", f"workload: {workload}"] + [
        f"{labels[k]} = {ratios[k]:.2f} (target >= {TARGETS[k]}: {'met' if ratios[k] >= TARGETS[k] else 'NOT met'})"
        for k in labels if ratios[k] is not None]
    lines += [f"{name} = {value:.2f} (no target)" for name, value in informational.items() if value is not None]
    lines += [f"{name}: TF step in situ {t['compute_ms']:.1f} ms = {t['compute_vs_bare_step']:.2f}x the bare "
              f"step ({t['bare_step_ms']:.1f} ms; target <= {STEP_TARGETS['compute_vs_bare_step']}: "
              f"{'met' if t['compute_vs_bare_step'] <= STEP_TARGETS['compute_vs_bare_step'] else 'NOT met'}); "
              f"pull + push {t['pull_push_ms']:.1f} ms (target <= {STEP_TARGETS['pull_push_ms']:g} on a file: "
              f"{'met' if t['pull_push_ms'] <= STEP_TARGETS['pull_push_ms'] else 'NOT met'})"
              for name, t in step_times.items()]
    if reader is not None:
        lines.append(f"Parquet reader: {reader['reader_ms_per_batch_median']:.2f} ms per batch of "
                     f"{reader['batch_size']} rows (median of {reader['reader_batches_timed']}, one "
                     f"core; mean {reader['reader_ms_per_batch_mean']:.2f} ms)")
    if data == "file":
        tsv_case = next((c for c in cases if c["name"] == "hybridps-bsp-tsv"), {})
        if "parse_ms_per_batch" in tsv_case:
            lines.append(f"Criteo TSV reader: {tsv_case['parse_ms_per_batch']:.2f} ms of parsing per batch of "
                         f"{batch_size} rows, at start-up (its share is held in memory; a step then "
                         f"only slices it)")
        timing = report["criteo_parquet_reader"]
        lines.append(f"Criteo Parquet reader: {timing['reader_ms_per_batch_median']:.2f} ms per batch of "
                     f"{batch_size} rows in its first pass, {timing['reader_ms_per_batch_median_seen']:.2f} ms "
                     f"once every value has been seen (medians of {timing['reader_batches_timed']}, one "
                     f"core)")
        if cache_fill is not None:
            cached = report["criteo_parquet_reader_cached"]
            lines.append(f"Criteo Parquet reader through the parsed cache: "
                         f"{cached['reader_ms_per_batch_median']:.2f} ms per batch (filled once by "
                         f"hybridps prepare-data in {cache_fill['seconds']:.1f} s, "
                         f"{cache_fill['bytes_written'] / 2 ** 20:.0f} MiB)")
    if repeats > 1:
        lines.append(f"median of {repeats} runs per case; every run's samples/s: " + "; ".join(
            f"{c['name']} " + ", ".join(f"{x:,.0f}" for x in c["samples_per_s_runs"]) for c in cases))
    for case in cases:
        if "phase_ms_per_step" in case:
            lines.append(f"{case['name']} per-step phases (ms, max over ranks): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in case["phase_ms_per_step"].items()))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "train.md"), "w") as fh:
        fh.write(text)
    bar_chart(os.path.join(out_dir, "train.png"), [c["name"] for c in cases],
              {"samples/s": [c["samples_per_s"] for c in cases]},
              title=f"{'MMoE' if model == 'mmoe' else 'DeepFM'} training throughput ({workload} "
                    f"workload), {counted(ranks, 'rank')}",
              ylabel="samples / s")
    print(text)
    return report


def _fill_parsed_cache(directory, parquet, schema_config):
    """Empty the bench's parsed cache and fill it with ``hybridps prepare-data`` (in this
    process); returns prepare-data's summary."""
    import shutil
    from hybridps.config import make_config
    from hybridps.data.prepare import prepare
    shutil.rmtree(directory, ignore_errors=True)
    sys.stderr.write(f"bench train: filling the parsed cache {directory} (hybridps prepare-data) ...\n")
    return prepare(make_config(schema_config, {"data": parquet, "data_cache": directory}))


def _parquet_files(out_dir, config_path, ranks, batch_size, vocab_size):
    """Write the multihot workload to Parquet (one file per rank) and time the reader on it;
    returns (the directory, the reader timing)."""
    from hybridps.bench.parquet_data import time_reader, write_workload_parquet
    from hybridps.config import make_config
    from hybridps.schema import build_schema
    config = make_config(config_path, {"vocab_size": vocab_size})
    schema = build_schema(config)
    directory = os.path.join(out_dir, "parquet")
    sys.stderr.write(f"bench train: writing {ranks} x {PARQUET_BATCHES_PER_RANK} batches of "
                     f"{batch_size} rows to {directory} ...\n")
    paths = write_workload_parquet(directory, schema, config, ranks, PARQUET_BATCHES_PER_RANK, batch_size)
    timing = time_reader(paths, schema, batch_size)
    timing["files"] = len(paths)
    timing["bytes"] = sum(os.path.getsize(p) for p in paths)
    return directory, timing


def main(args):
    run_train_bench(args.out, ranks=args.ranks, steps=args.steps, warmup_steps=args.warmup_steps,
                    batch_size=args.batch_size, dim=args.dim, vocab_size=args.vocab_size,
                    timeout=args.timeout, repeats=args.repeats, workload=args.workload,
                    cases=args.cases, data=args.data, one_job=args.one_job)
