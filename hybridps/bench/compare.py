"""``hybridps bench compare --ranks N --out DIR``: the same DeepFM workload in every design.

Cases, each with N ranks in total (servers included): collective BSP, SSP(1) and ASP; PS BSP
and ASP (``max(1, N // 4)`` servers, the rest workers); and the plain TensorFlow + Horovod
baseline. Same model, synthetic data, seed and optimizers everywhere, so a difference isolates
the parameter access. Writes DIR/compare.json, DIR/compare.md and DIR/compare.png (throughput
and AUC side by side) and prints the table. ``--repeats R`` runs the cases R times round-robin
and reports each case's median run (hybridps.bench.train.run_plan); ``--one-job`` runs a
round's cases one after another in one ``mpirun`` job (hybridps.bench.shared_job).

``samples_per_s_per_rank`` divides by the computing ranks only (PS servers excluded).
``bytes_per_step`` is per computing rank: sparse exchange bytes measured by hybridps (sent +
received), plus the dense traffic: measured for PS (chunks pulled and pushed), modelled for
Horovod's ring allreduce as 2 (N - 1) / N x 4 bytes x dense parameters sent and as much received.
The scaling model in docs/scaling.md states both designs' volumes and is checked against these.
"""
import json
import os
import sys

from hybridps.bench.report import bench_environment, markdown_table, write_json
from hybridps.bench.train import add_one_job_argument, run_plan
from hybridps.wording import counted

TARGETS = {"collective_bsp_vs_ps_bsp": 1.5, "collective_bsp_vs_ps_asp_per_rank": 1.0}


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ranks", type=int, default=2, help="ranks in every case, servers included")
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096, help="per computing rank")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per case")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every case this many times (round-robin); report the median run")
    add_one_job_argument(parser)


def ring_allreduce_bytes(ranks, parameters):
    """Bytes one rank sends plus receives in a ring allreduce of float32 parameters."""
    return 0 if ranks == 1 else 2 * (2 * (ranks - 1) / ranks) * 4 * parameters


def run_compare_bench(out_dir, ranks=2, steps=110, warmup_steps=10, batch_size=4096, dim=16,
                      vocab_size=100_000, timeout=1200, repeats=1, one_job=False):
    """Run every case, each in its own mpirun job or, with ``one_job``, a round's cases in one
    (hybridps.bench.shared_job); returns the compare.json object."""
    os.makedirs(out_dir, exist_ok=True)
    servers = max(1, ranks // 4)
    common = ["--steps", str(steps), "--warmup-steps", str(warmup_steps), "--batch-size",
              str(batch_size), "--dim", str(dim), "--vocab-size", str(vocab_size)]
    train = ["-m", "hybridps.cli", "train", "--model", "deepfm", "--data", "synthetic",
             "--optimizer", "adagrad", "--dense-optimizer", "adagrad", "--dense-learning-rate", "0.05",
             "--no-progress"]
    ps = ["--mode", "ps", "--num-servers", str(servers)]
    plan = [("collective-bsp", train + ["--sync", "bsp"]),
            ("collective-ssp1", train + ["--sync", "ssp", "--staleness", "1"]),
            ("collective-asp", train + ["--sync", "asp"]),
            ("ps-bsp", train + ps + ["--sync", "bsp"]),
            ("ps-asp", train + ps + ["--sync", "asp"]),
            ("tf-baseline", ["-m", "hybridps.bench.train_worker", "tf-baseline"])]
    plan = [(name, argv) for name, argv in plan
            if ranks - (servers if name.startswith("ps-") else 0) >= 1]

    def case_argv(name, argv):
        path = os.path.join(out_dir, f"{name}.json")
        metrics_flag = [path] if name == "tf-baseline" else ["--metrics-out", path]
        return argv + metrics_flag + common

    def case_result(name, wall_s):
        with open(os.path.join(out_dir, f"{name}.json")) as fh:
            result = json.load(fh)
        sys.stderr.write(f"  {name}: {result['samples_per_s']:,.0f} samples/s, auc {result['auc']:.4f}\n")
        return result

    chosen = run_plan("bench compare", plan, repeats, one_job, ranks, timeout,
                      os.path.join(out_dir, "one-job-cases.json"), case_argv, lambda name: None, case_result)
    cases = []
    for name, _ in plan:
        result = chosen[name]
        computing = result.get("computing_ranks", ranks)
        if "exchange" in result:
            sparse = result["exchange"]["bytes_sent_per_step"] + result["exchange"]["bytes_received_per_step"]
            dense = 0.0 if name.startswith("ps-") else ring_allreduce_bytes(ranks, result["dense_parameters"])
        else:   # baseline: allgathered IndexedSlices (B x F rows of dim floats + int64 index) + ring
            sparse = 2 * (ranks - 1) * batch_size * 26 * (4 * dim + 8) if ranks > 1 else 0
            dense = ring_allreduce_bytes(ranks, result.get("dense_parameters", 0))
        cases.append({"name": name, "samples_per_s": result["samples_per_s"],
                      "samples_per_s_runs": result["samples_per_s_runs"],
                      "samples_per_s_per_rank": result["samples_per_s"] / computing,
                      "final_loss": result["final_loss"], "auc": result["auc"],
                      "bytes_per_step": sparse + dense, "peak_rss_mb": result.get("peak_rss_mb"),
                      "ranks": ranks, "computing_ranks": computing})
    by_name = {c["name"]: c for c in cases}
    ratios = {}
    if "ps-bsp" in by_name:
        ratios["collective_bsp_vs_ps_bsp"] = by_name["collective-bsp"]["samples_per_s"] / by_name["ps-bsp"]["samples_per_s"]
        ratios["collective_bsp_vs_ps_asp_per_rank"] = (by_name["collective-bsp"]["samples_per_s_per_rank"]
                                                       / by_name["ps-asp"]["samples_per_s_per_rank"])
    report = {"cases": cases, "ratios": ratios, "targets": TARGETS,
              "settings": {"ranks": ranks, "ps_servers": servers, "steps": steps, "repeats": repeats,
                           "warmup_steps": warmup_steps, "batch_size_per_computing_rank": batch_size,
                           "dim": dim, "vocab_size": vocab_size, "model": "deepfm"},
              "machine": bench_environment()}
    write_json(os.path.join(out_dir, "compare.json"), report)
    table = markdown_table(cases, [("name", "case", ""), ("samples_per_s", "samples/s", ",.0f"),
                                   ("samples_per_s_per_rank", "per computing rank", ",.0f"),
                                   ("final_loss", "final loss", ".4f"), ("auc", "AUC", ".4f"),
                                   ("bytes_per_step", "bytes/step/rank", ",.0f"),
                                   ("peak_rss_mb", "peak RSS MB", ",.0f")])
    lines = [table, ""] + [f"{k} = {v:.2f} (target >= {TARGETS[k]}: {'met' if v >= TARGETS[k] else 'NOT met'})"
                           for k, v in ratios.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "compare.md"), "w") as fh:
        fh.write(text)
    _plot(os.path.join(out_dir, "compare.png"), cases, ranks)
    print(text)
    return report


def _plot(path, cases, ranks):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    names = [c["name"] for c in cases]
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "samples_per_s", "samples / s"),
                           (fig.add_subplot(1, 2, 2), "auc", "AUC")):
        ax.bar(range(len(cases)), [c[key] for c in cases], color="tab:blue")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label} ({counted(ranks, 'rank')} in total)")
        if key == "auc":
            ax.set_ylim(0.5, max(c["auc"] for c in cases) + 0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args):
    run_compare_bench(args.out, ranks=args.ranks, steps=args.steps, warmup_steps=args.warmup_steps,
                      batch_size=args.batch_size, dim=args.dim, vocab_size=args.vocab_size,
                      timeout=args.timeout, repeats=args.repeats, one_job=args.one_job)
