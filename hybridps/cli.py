"""Command line: ``hybridps COMMAND``, the commands registered in :func:`build_parser` (train,
launch, doctor, bench RUNNER, inspect, export, evaluate, predict, prepare-data, join, serve).

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
    """``hybridps train``'s flags: ``--config``, then one per TrainConfig field that has one,
    grouped as the config is (generated from the fields: hybridps.settings)."""
    from hybridps.config import TrainConfig
    from hybridps.settings import add_dataclass_arguments
    parser.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    add_dataclass_arguments(parser, TrainConfig)


# ``hybridps bench <name>``: the runner modules under hybridps/bench, in help order
BENCH_RUNNERS = (
    ("table", "hash table vs pandas khash vs dict"),
    ("train", "collective BSP vs TF+Horovod baseline vs compute ceiling"),
    ("multitask", "ESMM, with and without a post-click loss, vs a clicked-rows conversion model"),
    ("compare", "collective vs parameter-server vs TF+Horovod, N ranks each"),
    ("scale", "2 and 4 hosts of the network-namespace test bed (root), 1 and 10 Gbit/s links, "
              "vs the scaling model"),
    ("realtime", "a stream -> 2-rank training -> deltas -> hybridps serve: freshness and serving latency"),
    ("capacity", "bytes per row of a 10M-row table, and a 2-rank run until 50M distinct keys"),
    ("soak", "a stream job under the restart supervisor on the test bed (root), a rank killed "
             "every minute: restarts, seconds lost, rows lost (0) and trained again"),
    ("events", "impressions + clicks -> hybridps join -> 2-rank training -> serve: joiner "
               "events/s, join correctness, freshness from the click"),
)

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
            from hybridps.config import TrainConfig, make_config
            from hybridps.settings import given_values
            train_args = build_parser().parse_args(program)
            config = make_config(train_args.config, given_values(train_args, TrainConfig))
        return supervisor.main(args, program, config)
    return launch.main(args)


def cmd_doctor(args):
    from hybridps import doctor
    return doctor.main(args)


def cmd_train(args):
    from hybridps.config import TrainConfig, keep_recorded_dense, make_config
    from hybridps.settings import given_values, load_yaml
    given = given_values(args, TrainConfig)
    config = make_config(args.config, given)
    if config.resume and config.checkpoint_dir:
        from hybridps.checkpoint.manager import recorded_config
        config, note = keep_recorded_dense(config, recorded_config(config.checkpoint_dir),
                                           set(given) | set(load_yaml(args.config) if args.config else ()))
        if note:
            print(f"hybridps: {note}", file=sys.stderr)
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


def cmd_join(args):
    from hybridps.join.process import main
    return main(args)


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
        description="A checkpoint's AUC, gAUC, logloss and calibration on held-out data (per "
                    "task with several: RMSE and MAE for regression), on any number of ranks; "
                    "nothing is written to the checkpoint."))
    add_predict_arguments(sub.add_parser(
        "predict", help="a checkpoint's score of every row of a data file, to Parquet",
        description="A checkpoint's score of every row of a data file, in input order, to Parquet."))
    from hybridps.data.prepare import add_arguments as add_prepare_arguments
    add_prepare_arguments(sub.add_parser(
        "prepare-data", help="convert Parquet/TFRecord data once into a --data-cache directory",
        description="Decode and convert Parquet/TFRecord data once into a --data-cache directory "
                    "that later runs read instead."))
    from hybridps.join.config import add_arguments as add_join_arguments
    join = sub.add_parser(
        "join", help="impressions + delayed actions -> labeled rows in the trainer's stream",
        description="Join impression events with their delayed actions (clicks, conversions) "
                    "within a window of event time, and write one labeled row per impression to "
                    "the trainer's stream, exactly once across restarts (docs/join.md).")
    add_join_arguments(join)
    join.set_defaults(func=cmd_join)
    from hybridps.serving.server import add_serve_arguments
    add_serve_arguments(sub.add_parser(
        "serve", help="TF Serving's REST API on an export directory, following its deltas live"))
    return parser


def main(argv=None):
    from hybridps.checkpoint.files import signing_key
    from hybridps.tf_runtime import skip_keras_optional_imports
    skip_keras_optional_imports()      # about 3 s of CPU less at every start
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
