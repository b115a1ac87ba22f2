"""Command line: ``hybridps COMMAND``, the commands registered in :func:`build_parser` (train,
launch, doctor, bench RUNNER, inspect, export, evaluate, predict, prepare-data, serve).

Run training as any MPI program: ``mpirun -np 2 hybridps train --model deepfm --steps 100``
(or ``python -m hybridps.cli train ...``), or alone without mpirun. Flags override the YAML
file given with ``--config``; every flag is a field of hybridps.config.TrainConfig.
Heavy imports (TensorFlow, MPI) happen only inside the subcommand that needs them.
"""
import argparse
import json
import sys

from hybridps.errors import HybridPSError


def _add_train_arguments(parser):
    parser.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    parser.add_argument("--model", help="a built-in model (deepfm, wide_deep, dcn, din) or your "
                                         "own build function: path/to/file.py:build or "
                                         "package.module:build")
    parser.add_argument("--data", help="'synthetic' (built-in generator), 'sample' (the bundled Criteo "
                                        "sample), a Criteo TSV/CSV path, or, with a 'features:' "
                                        "schema in --config, CSV/TSV, Parquet or TFRecord files of "
                                        "those columns, or a stream: stream:DIR, redis://HOST:PORT/STREAM")
    parser.add_argument("--steps", type=int, help="steps to train; 0: until the stream ends or SIGTERM")
    parser.add_argument("--batch-size", type=int, help="samples per rank per step")
    parser.add_argument("--sync", choices=["bsp", "ssp", "asp"])
    parser.add_argument("--staleness", type=int, help="SSP bound in steps")
    parser.add_argument("--mode", choices=["collective", "ps"])
    parser.add_argument("--num-servers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--metrics-out", help="write the JSON summary here (rank 0)")
    parser.add_argument("--dim", type=int, help="embedding dimension")
    parser.add_argument("--hidden", help="MLP sizes, comma-separated, e.g. 256,128")
    parser.add_argument("--optimizer", choices=["sgd", "adagrad", "adam", "ftrl"],
                        help="sparse (embedding) optimizer")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--dense-optimizer", choices=["sgd", "adagrad", "adam"])
    parser.add_argument("--dense-learning-rate", type=float)
    parser.add_argument("--table-layout", choices=["shared", "per_field"])
    parser.add_argument("--min-count", type=int, help="feature admission threshold (hits)")
    parser.add_argument("--nonfinite", choices=["raise", "skip"],
                        help="a NaN/Inf embedding gradient: stop with an error (raise, default) or "
                             "skip that row's update and count it (skip)")
    parser.add_argument("--on-bad-line", choices=["raise", "skip"])
    parser.add_argument("--shuffle", action="store_const", const=True,
                        help="Parquet/TFRecord: shuffle parts and rows every epoch (seeded by --seed)")
    parser.add_argument("--shuffle-buffer", type=int, help="rows in the shuffle buffer (with --shuffle)")
    parser.add_argument("--data-cache", metavar="DIR",
                        help="Parquet/TFRecord: keep every part's parsed rows in DIR and read them "
                             "from there in later epochs and runs (hybridps prepare-data fills it)")
    parser.add_argument("--num-fields", type=int, help="synthetic data: categorical fields")
    parser.add_argument("--num-dense", type=int, help="synthetic data: dense features")
    parser.add_argument("--vocab-size", type=int, help="synthetic data: ids per field")
    parser.add_argument("--zipf-a", type=float, help="synthetic data: Zipf exponent of the ids (1.2; "
                                                     "smaller spreads them wider)")
    parser.add_argument("--warmup-steps", type=int, help="steps excluded from samples_per_s")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                        help="no progress bar or periodic step lines (eval lines, warnings and "
                             "the summary still print)")
    parser.add_argument("--eval-data", help="held-out data to evaluate on during training (collective "
                                             "mode): a file spec like --data, or 'synthetic'")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (0: only at the end)")
    parser.add_argument("--eval-batches", type=int, help="batches per rank of synthetic held-out data (10)")
    parser.add_argument("--tensorboard-dir", help="rank 0 writes TensorBoard scalars (loss, AUC, "
                                                   "samples/s, exchange bytes, staleness, eval) here")
    parser.add_argument("--dump-state", help="write final dense weights and table shards (npz) here")
    parser.add_argument("--checkpoint-dir", help="write sharded checkpoints here (atomic; keeps the last K)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only at the end)")
    # elastic restarts
    parser.add_argument("--checkpoint-every-seconds", type=float,
                        help="also checkpoint when this many seconds have passed since the last "
                             "(bounds the work an unattended run loses in a restart; 0: off)")
    parser.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep (3)")
    parser.add_argument("--resume", action="store_const", const=True,
                        help="continue from the newest intact checkpoint in --checkpoint-dir "
                             "(none there: start at step 0; only damaged ones: refuse)")
    parser.add_argument("--resume-fresh", action="store_const", const=True,
                        help="with --resume: if every checkpoint is damaged, keep them aside as "
                             "damaged-ckpt-<step> and start from step 0 instead of refusing")
    parser.add_argument("--num-buckets", type=int, help="virtual buckets of each table (fixed per model)")
    parser.add_argument("--delta-export-dir", help="write the rows updated every --delta-every steps here")
    parser.add_argument("--delta-every", type=int, help="steps between deltas")
    parser.add_argument("--delta-every-seconds", type=float,
                        help="also write a delta when this many seconds have passed since the last")
    parser.add_argument("--stream-poll-s", type=float,
                        help="stream data: seconds between looks for new files or entries (0.2)")
    parser.add_argument("--ttl-steps", type=int, help="evict rows not updated for this many steps")
    parser.add_argument("--max-rows", type=int, help="per table and rank: evict down to this many rows")
    parser.add_argument("--eviction", choices=["lfu", "lru"], help="policy for --max-rows")
    parser.add_argument("--table-settings",
                        help="per-table min_count/ttl_steps/max_rows/eviction as JSON, e.g. "
                             "'{\"0\": {\"max_rows\": 100000, \"eviction\": \"lru\"}}' "
                             "(tables not named use the global flags)")
    parser.add_argument("--full-export-every", type=int,
                        help="every K-th export into --delta-export-dir, the run's first included, "
                             "is a full export (every row + the model description; default 10)")
    parser.add_argument("--max-inflight", type=int, help="SSP/ASP: bounded prefetch / push depth")
    parser.add_argument("--dense-staleness", type=int,
                        help="SSP: a TF step may miss the dense updates of this many latest steps (0)")
    parser.add_argument("--watchdog-timeout", type=float,
                        help="seconds a collective may take before the job aborts with a dump (300)")
    parser.add_argument("--loader-delay-ms", type=float,
                        help="benchmark/testing aid: the data loader of --delay-rank sleeps this long per batch")
    parser.add_argument("--delay-rank", type=int, help="the rank whose data loader --loader-delay-ms slows")
    parser.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fail-rank", type=int, help=argparse.SUPPRESS)


# ``hybridps bench <name>``: the runner modules under hybridps/bench, in help order
BENCH_RUNNERS = (
    ("table", "hash table vs pandas khash vs dict"),
    ("train", "collective BSP vs TF+Horovod baseline vs compute ceiling"),
    ("compare", "collective vs parameter-server vs TF+Horovod, N ranks each"),
    ("scale", "2 and 4 hosts of the network-namespace test bed (root), 1 and 10 Gbit/s links, "
              "vs the scaling model"),
    ("realtime", "a stream -> 2-rank training -> deltas -> hybridps serve: freshness and serving latency"),
    ("capacity", "bytes per row of a 10M-row table, and a 2-rank run until 50M distinct keys"),
    ("soak", "a stream job under the restart supervisor on the test bed (root), a rank killed "
             "every minute: restarts, seconds lost, rows lost (0) and trained again"),
)

_NOT_CONFIG = {"command", "bench_command", "config", "func"}

DESCRIPTION = ("Train sparse recommendation models over MPI (collective or parameter-server "
               "mode), then evaluate, export and serve them.")


class _CommandListFormatter(argparse.HelpFormatter):
    """``hybridps --help`` and ``hybridps bench --help``: one line per command (never wrapped),
    without argparse's ``{a,b,c}`` line above them."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=28)

    def _split_lines(self, text, width):
        return [" ".join(text.split())]

    def _format_action(self, action):
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(command) for command in action._get_subactions())
        return super()._format_action(action)


def cmd_launch(args):
    from hybridps import launch
    if args.max_restarts is not None and not args.dry_run:     # elastic restarts
        from hybridps import supervisor
        program = list(args.command_args)
        program = program[1:] if program[:1] == ["--"] else program
        config = None
        if program[:1] == ["train"]:
            from hybridps.config import make_config
            train_args = build_parser().parse_args(program)
            config = make_config(train_args.config, {k: v for k, v in vars(train_args).items()
                                                     if k not in _NOT_CONFIG})
        return supervisor.main(args, program, config)
    return launch.main(args)


def cmd_doctor(args):
    from hybridps import doctor
    return doctor.main(args)


def cmd_train(args):
    from hybridps.config import make_config
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    config = make_config(args.config, overrides)
    from hybridps import watchdog
    watchdog.configure(config.watchdog_timeout)
    from hybridps.trainer import Trainer
    trainer = Trainer(config)
    summary = trainer.run()
    if trainer.rank == 0:
        keys = ("steps", "ranks", "global_batch_size", "samples_per_s", "final_loss", "auc", "mode", "sync")
        shown = {k: summary[k] for k in keys}
        if summary.get("eval"):
            last = summary["eval"][-1]
            shown["eval"] = {k: last[k] for k in ("step", "rows", "auc", "gauc", "logloss", "calibration")}
        print(json.dumps(shown, indent=2))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="hybridps", description=DESCRIPTION,
                                     epilog="hybridps COMMAND --help lists a command's flags.",
                                     formatter_class=_CommandListFormatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    train = sub.add_parser("train", help="train a model (run under mpirun for several ranks)")
    _add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    from hybridps import launch as launch_module
    launch = sub.add_parser(
        "launch", help="start a job with mpirun, horovodrun or srun (with its settings)",
        description="Detect the environment (Slurm allocation, MPI, root, ranks vs cores), print the "
                    "launch command with its settings, and run it. Example: "
                    "hybridps launch -np 4 --launcher mpirun -- train --steps 100")
    launch_module.add_arguments(launch)
    from hybridps.supervisor import add_arguments as add_supervisor_arguments
    add_supervisor_arguments(launch)
    launch.set_defaults(func=cmd_launch)

    doctor = sub.add_parser("doctor", help="preflight check of MPI, Horovod and the exchange "
                                           "(under mpirun, or alone)",
                            description="Preflight check of MPI, Horovod and the exchange: run it "
                                        "under mpirun on all ranks, or alone.")
    doctor.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a smoke-test collective may take before the job aborts")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmark runners (JSON, markdown table, PNG)",
                           formatter_class=_CommandListFormatter)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, title="runners",
                                     metavar="RUNNER")
    import importlib
    for name, summary in BENCH_RUNNERS:           # hybridps.bench.<name>: add_arguments, main
        runner = importlib.import_module(f"hybridps.bench.{name}")
        command = bench_sub.add_parser(name, help=summary)
        runner.add_arguments(command)
        command.set_defaults(func=runner.main)
    from hybridps.checkpoint.inspect import add_inspect_arguments
    from hybridps.export.saved_model import add_export_arguments
    add_inspect_arguments(sub.add_parser("inspect", help="summarize and verify a checkpoint"))
    add_export_arguments(sub.add_parser("export", help="checkpoint -> TensorFlow SavedModel for serving"))
    from hybridps.inference import add_evaluate_arguments, add_predict_arguments
    add_evaluate_arguments(sub.add_parser(
        "evaluate", help="a checkpoint's AUC, gAUC, logloss and calibration on held-out data",
        description="A checkpoint's AUC, gAUC, logloss and calibration on held-out data, on any "
                    "number of ranks; nothing is written to the checkpoint."))
    add_predict_arguments(sub.add_parser(
        "predict", help="a checkpoint's score of every row of a data file, to Parquet",
        description="A checkpoint's score of every row of a data file, in input order, to Parquet."))
    from hybridps.data.prepare import add_arguments as add_prepare_arguments
    add_prepare_arguments(sub.add_parser(
        "prepare-data", help="convert Parquet/TFRecord data once into a --data-cache directory",
        description="Decode and convert Parquet/TFRecord data once into a --data-cache directory "
                    "that later runs read instead."))
    from hybridps.serving.server import add_serve_arguments
    add_serve_arguments(sub.add_parser(
        "serve", help="TF Serving's REST API on an export directory, following its deltas live"))
    return parser


def main(argv=None):
    from hybridps.checkpoint.files import signing_key
    args = build_parser().parse_args(argv)
    try:
        signing_key()          # a key file named but unreadable stops every command at its start
        return args.func(args) or 0
    except HybridPSError as exc:
        _report_and_exit(exc)


def _report_and_exit(exc):
    """Print a hybridps error once (with the rank under MPI) and end the whole job."""
    rank, size = _rank_and_size()
    prefix = f"[hybridps rank {rank}/{size}] " if size > 1 else ""
    sys.stderr.write(f"{prefix}error: {exc}\n")
    sys.stderr.flush()
    if size > 1:
        from hybridps import comm
        comm.init(with_horovod=False).abort(2)
    sys.exit(2)


def _rank_and_size():
    from hybridps.comm import initialized_rank_and_size
    return initialized_rank_and_size()


if __name__ == "__main__":
    sys.exit(main())
