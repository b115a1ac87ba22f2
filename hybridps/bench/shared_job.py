"""Several cases of a bench run one after another in one ``mpirun`` job (``--one-job``).

By default ``hybridps bench train`` and ``bench compare`` start one ``mpirun`` job per case.
With ``--one-job`` a round's cases share one: :func:`run_cases_in_one_job` writes the list of
cases (each one's ``-m MODULE ARGS...`` command line, as its own job would run it, and its
testing-aid environment) to a JSON file and launches ``python -m hybridps.bench.shared_job
LIST.json`` on every rank, which runs them in sequence in the same processes: one TensorFlow
import and one MPI start for all of them, which is most of a small case's time.

Each case stays its own measurement: it builds its own model, data and tables, starts its own
timers after its own warm-up steps and writes its own result file, all ranks start it together
(a barrier), and the previous case's objects are released first (the Python heap unfrozen and
collected, the Keras session cleared). What a process keeps from one case to the next is
what it cannot give back: TensorFlow's and MPI's start-up, and Horovod once a case started
it; so the cases that run without Horovod (the bare ceiling, hybridps's step without
exchange) run first. The process's peak RSS is that of the cases so far.

Only the two per-rank programs of the benches run here (:data:`PROGRAMS`); a case's
environment may hold the testing aids' variables only (hybridps.testing_hooks), set for that
case alone.
"""
import dataclasses
import gc
import json
import os
import sys
import time

PROGRAMS = ("hybridps.cli", "hybridps.bench.train_worker")


def runs_without_horovod(argv):
    """Whether the case ``-m MODULE ARGS...`` starts no Horovod (a train_worker role without it)."""
    from hybridps.bench.train_worker import ROLES_WITHOUT_HOROVOD
    return argv[1] == "hybridps.bench.train_worker" and argv[2] in ROLES_WITHOUT_HOROVOD


def job_order(cases):
    """The cases in the order one job runs them: those without Horovod first, each group in
    the given order."""
    return ([c for c in cases if runs_without_horovod(c["argv"])]
            + [c for c in cases if not runs_without_horovod(c["argv"])])


def check_cases(cases):
    """Raise ValueError for a case one job cannot run: another program than :data:`PROGRAMS`
    or an environment variable that is not a testing aid's."""
    from hybridps import testing_hooks
    allowed = set(testing_hooks.environment(**dataclasses.asdict(testing_hooks.TestingHooks())))
    for case in cases:
        argv = case["argv"]
        if len(argv) < 2 or argv[0] != "-m" or argv[1] not in PROGRAMS:
            raise ValueError(f"case {case['name']}: one job runs `-m` {' or '.join(PROGRAMS)}, got {argv[:2]}")
        unknown = sorted(set(case.get("env") or {}) - allowed)
        if unknown:
            raise ValueError(f"case {case['name']}: in one job a case's environment holds the testing "
                             f"aids' variables only, got {unknown}")


def run_cases_in_one_job(mpirun, ranks, cases, timeout, list_path):
    """Run ``cases`` ([{"name", "argv", "env"}]) in one job of ``ranks`` ranks through
    ``mpirun(ranks, argv, timeout)`` (hybridps.bench.train._mpirun); returns {name: the
    case's wall seconds in the job, from the barrier before it to the one after it}."""
    check_cases(cases)
    with open(list_path, "w") as fh:
        json.dump({"cases": cases}, fh, indent=1)
    mpirun(ranks, ["-m", "hybridps.bench.shared_job", list_path], timeout)
    with open(list_path + ".walls.json") as fh:
        return json.load(fh)


def _release_previous_case():
    """Give back what the previous case held: its frozen heap, its Keras state, its garbage."""
    import tensorflow as tf
    gc.unfreeze()               # hybridps train and the workers freeze the heap after warm-up
    tf.keras.backend.clear_session()
    gc.collect()


def main(list_path):
    from hybridps import comm as comm_module      # first: MPI with THREAD_MULTIPLE
    from hybridps import testing_hooks
    comm = comm_module.init(with_horovod=False)
    with open(list_path) as fh:
        cases = json.load(fh)["cases"]
    check_cases(cases)
    programs = {"hybridps.cli": _cli_main, "hybridps.bench.train_worker": _worker_main}
    walls = {}
    for index, case in enumerate(job_order(cases)):
        if index:
            _release_previous_case()
        testing_hooks.use(testing_hooks.from_environment(case.get("env") or {}))
        comm.barrier()
        started = time.perf_counter()
        programs[case["argv"][1]](case["argv"][2:])
        comm.barrier()
        walls[case["name"]] = time.perf_counter() - started
        testing_hooks.use()
        sys.stdout.flush()
    if comm.rank == 0:
        with open(list_path + ".walls.json", "w") as fh:
            json.dump(walls, fh)
    comm.barrier()


def _cli_main(argv):
    from hybridps import cli
    code = cli.main(argv)
    if code:
        raise SystemExit(code)


def _worker_main(argv):
    from hybridps.bench import train_worker
    train_worker.main(argv)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        raise SystemExit("usage: python -m hybridps.bench.shared_job CASES.json (written by hybridps bench)")
    main(sys.argv[1])
