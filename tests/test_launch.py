"""``hybridps launch`` and ``hybridps doctor``.

Command builders: each launcher (mpirun for Open MPI and MPICH, horovodrun, srun) and
environment (root or not, ranks above or below cores, hosts, inside a Slurm allocation) gives
the expected command and variables; string checks only, no MPI started. Launcher variables:
local rank and size from Open MPI, Hydra, PMI and Slurm. Real runs: ``hybridps launch`` with
mpirun and with horovodrun each train 2 ranks from an environment without any of the
oversubscription / root variables (the launcher must supply what is needed), and
``hybridps doctor`` passes under ``mpirun -np 2``.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

from hybridps import launch
from hybridps.doctor import Findings, format_report
from hybridps.errors import ConfigError
from tests.mpi_util import REPO, mpirun_available, run_mpi

PROGRAM = ["/venv/bin/python", "-m", "hybridps.cli", "train", "--steps", "5"]


def env_for(**overrides):
    base = dict(cores=2, is_root=True, mpi_flavor="openmpi", mpirun="/usr/bin/mpirun",
                horovodrun="/venv/bin/horovodrun", srun=None, python="/venv/bin/python")
    base.update(overrides)
    return launch.Environment(**base)


def slurm_env(**overrides):
    values = dict(in_slurm=True, slurm_ntasks=4, slurm_nodes=("localhost",), slurm_tasks_per_node=4,
                  srun="/usr/bin/srun", srun_mpi_plugins=("none", "pmi2", "pmix", "pmix_v4"))
    values.update(overrides)
    return env_for(**values)


# ------------------------------------------------------------------ command builders
def test_openmpi_as_root_with_more_ranks_than_cores():
    plan = launch.build_plan(PROGRAM, env_for(), num_ranks=4)
    line = plan.command_line()
    assert plan.launcher == "mpirun"
    assert plan.argv[:3] == ["/usr/bin/mpirun", "-np", "4"]
    assert "--oversubscribe" in plan.argv and "--allow-run-as-root" in plan.argv
    assert "--bind-to none --map-by slot" in line
    assert plan.env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert plan.env["OMP_NUM_THREADS"] == "1" and plan.env["HYBRIDPS_TF_THREADS"] == "1"
    for name in ("OMPI_MCA_mpi_yield_when_idle", "OMP_NUM_THREADS", "HYBRIDPS_TF_THREADS"):
        assert f"-x {name}" in line
    assert line.startswith("HOROVOD_STALL_CHECK_TIME_SECONDS=60 HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=300 ")
    assert line.endswith("/venv/bin/python -m hybridps.cli train --steps 5")
    assert plan.argv[-len(PROGRAM):] == PROGRAM


def test_openmpi_as_user_with_cores_to_spare():
    plan = launch.build_plan(PROGRAM, env_for(cores=8, is_root=False), num_ranks=2)
    assert "--oversubscribe" not in plan.argv and "--allow-run-as-root" not in plan.argv
    assert "OMPI_MCA_mpi_yield_when_idle" not in plan.env
    assert plan.env["OMP_NUM_THREADS"] == "4" and plan.threads_per_rank == 4


def test_openmpi_on_hosts_exports_the_environment_to_remote_ranks():
    environ = {"PATH": "/venv/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib",
               "HYBRIDPS_SIGNING_KEY_FILE": "/secrets/key"}
    plan = launch.build_plan(PROGRAM, env_for(cores=4, is_root=False), num_ranks=8,
                             hosts="n1:4,n2:4", environ=environ)
    line = plan.command_line()
    assert "--host n1:4,n2:4" in line
    assert "-x PATH" in line and "-x LD_LIBRARY_PATH" in line and "-x PYTHONPATH" not in line
    assert line.count("-x HYBRIDPS_SIGNING_KEY_FILE") == 1    # the signing key reaches remote ranks
    assert "--oversubscribe" not in line and plan.ranks_per_node == 4
    assert plan.env["OMP_NUM_THREADS"] == "1"
    # Hosts without slots share the ranks evenly.
    even = launch.build_plan(PROGRAM, env_for(cores=4), num_ranks=6, hosts="n1,n2")
    assert "--host n1:3,n2:3" in even.command_line()
    with pytest.raises(ConfigError, match="slots"):
        launch.build_plan(PROGRAM, env_for(), num_ranks=9, hosts="n1:4,n2:4")


def test_mpich_uses_hydra_flags_and_genv():
    plan = launch.build_plan(PROGRAM, env_for(mpi_flavor="mpich", mpirun="/usr/bin/mpiexec", cores=1),
                             num_ranks=4, hosts="a:2,b:2")
    line = plan.command_line()
    assert plan.argv[:3] == ["/usr/bin/mpiexec", "-n", "4"]
    assert "-hosts a:2,b:2" in line and "-bind-to none" in line
    assert "-genv OMP_NUM_THREADS 1" in line
    assert "--allow-run-as-root" not in line and "-x " not in line
    assert "OMPI_MCA_mpi_yield_when_idle" not in plan.env   # Open MPI only
    assert any("no yield-when-idle" in note for note in plan.notes)


def test_horovodrun_gets_slots_and_mpi_controller():
    plan = launch.build_plan(PROGRAM, env_for(), num_ranks=4, launcher="horovodrun")
    assert plan.argv[:6] == ["/venv/bin/horovodrun", "-np", "4", "-H", "localhost:4", "--mpi"]
    assert plan.env["OMPI_MCA_mpi_yield_when_idle"] == "1"   # horovodrun exports the environment
    assert "--oversubscribe" not in plan.argv                  # the -H slots already allow 4
    core = launch.build_plan(PROGRAM, env_for(cores=8), num_ranks=2, launcher="horovodrun",
                             bind="core")
    assert core.argv[core.argv.index("--binding-args") + 1] == "-bind-to core -map-by slot:PE=4"


def test_srun_inside_a_slurm_allocation():
    plan = launch.build_plan(PROGRAM, slurm_env())
    assert plan.launcher == "srun" and plan.ranks == 4            # auto, all tasks of the job
    assert " ".join(plan.argv).startswith("/usr/bin/srun --mpi=pmix -n 4 --kill-on-bad-exit=1 --cpu-bind=none ")
    assert plan.env["OMPI_MCA_mpi_yield_when_idle"] == "1"        # 4 tasks on 2 cores
    assert launch.build_plan(PROGRAM, slurm_env(mpi_flavor="mpich")).argv[1] == "--mpi=pmi2"
    more = launch.build_plan(PROGRAM, slurm_env(), num_ranks=6, launcher="srun")
    assert "--overcommit" in more.argv


def test_auto_launcher_choice():
    assert launch.build_plan(PROGRAM, env_for(), num_ranks=2).launcher == "mpirun"
    assert launch.build_plan(PROGRAM, slurm_env()).launcher == "srun"
    no_pmix = launch.build_plan(PROGRAM, slurm_env(srun_mpi_plugins=("none", "pmi2")))
    assert no_pmix.launcher == "mpirun" and no_pmix.argv[:3] == ["/usr/bin/mpirun", "-np", "4"]
    inside = launch.build_plan(PROGRAM, slurm_env(), launcher="mpirun")
    assert "--oversubscribe" in inside.argv        # 4 tasks of the allocation on 2 usable cores


def test_impossible_requests_say_what_to_do():
    with pytest.raises(ConfigError, match="salloc"):
        launch.build_plan(PROGRAM, env_for(), num_ranks=2, launcher="srun")
    with pytest.raises(ConfigError, match="-np N"):
        launch.build_plan(PROGRAM, env_for())
    with pytest.raises(ConfigError, match="not on PATH"):
        launch.build_plan(PROGRAM, env_for(mpirun=None), num_ranks=2)
    with pytest.raises(ConfigError, match="--bind none"):
        launch.build_plan(PROGRAM, env_for(), num_ranks=4, bind="core")
    with pytest.raises(ConfigError, match="nothing to launch"):
        launch.build_plan([], env_for(), num_ranks=2)


def test_variables_the_user_set_are_kept():
    plan = launch.build_plan(PROGRAM, env_for(), num_ranks=4,
                             environ={"OMP_NUM_THREADS": "3", "PYTHONUNBUFFERED": "1"})
    assert "OMP_NUM_THREADS" not in plan.env and "PYTHONUNBUFFERED" not in plan.env
    assert "-x OMP_NUM_THREADS" in plan.command_line()       # still reaches remote ranks
    assert any("kept from your environment: OMP_NUM_THREADS, PYTHONUNBUFFERED" in n for n in plan.notes)


def test_core_binding_and_watchdog_timeout():
    plan = launch.build_plan(PROGRAM, env_for(cores=8, is_root=False), num_ranks=2, bind="core",
                             watchdog_timeout=100)
    assert "--bind-to core --map-by slot:PE=4" in plan.command_line()
    assert plan.env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "100"
    assert plan.env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "50"
    short = launch.build_plan(PROGRAM, env_for(), num_ranks=2, watchdog_timeout=3)
    assert short.env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "30"     # start-up skew floor
    assert short.env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "15"
    assert launch.train_watchdog_timeout(["train", "--watchdog-timeout", "45"]) == 45.0
    assert launch.train_watchdog_timeout(["train", "--watchdog-timeout=7.5"]) == 7.5
    assert launch.train_watchdog_timeout(["train", "--steps", "3"]) is None


def test_program_and_command_line_quoting():
    assert launch.hybridps_program(["train", "--steps", "3"], python="/p")[:3] == ["/p", "-m", "hybridps.cli"]
    assert launch.hybridps_program(["python3", "x.py"]) == ["python3", "x.py"]
    plan = launch.LaunchPlan("mpirun", ["mpirun", "-np", "2", "train", "--data", "my file.csv"],
                             env={"B": "2", "A": "x y"})
    assert plan.command_line() == "A='x y' B=2 mpirun -np 2 train --data 'my file.csv'"


# ------------------------------------------------------------------ launcher variables
@pytest.mark.parametrize("environ, expected", [
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (1, 4, "openmpi")),
    ({"MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}, (2, 3, "hydra")),
    ({"PMI_LOCAL_RANK": "0", "PMI_LOCAL_SIZE": "2"}, (0, 2, "pmi")),
    ({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, (0, 1, "slurm")),
    ({"SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, (1, 4, "slurm")),
    ({"SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2"}, (1, 2, "slurm")),
    # mpirun inside a Slurm job: the batch script's SLURM_* are inherited, Open MPI's win.
    ({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 4, "openmpi")),
    ({}, (5, 8, "none")),
])
def test_local_rank_and_size_from_launcher_variables(environ, expected):
    assert launch.local_rank_and_size(environ, rank=5, size=8) == expected


def test_nodelist_expansion_and_detection_inside_slurm():
    assert launch.expand_nodelist("node[01-03,07],gpu1") == ["node01", "node02", "node03", "node07", "gpu1"]
    assert launch.expand_nodelist("localhost") == ["localhost"]
    environ = dict(os.environ, SLURM_JOB_ID="12", SLURM_NTASKS="8", SLURM_JOB_NODELIST="n[1-2]",
                   SLURM_TASKS_PER_NODE="4(x2)", SLURM_NODEID="1")
    env = launch.detect_environment(environ)
    assert env.in_slurm and env.slurm_ntasks == 8 and env.slurm_nodes == ("n1", "n2")
    assert env.slurm_tasks_per_node == 4 and env.cores >= 1
    assert env.mpi_flavor == ("openmpi" if shutil.which("mpirun") else "unknown")
    plan = launch.build_plan(PROGRAM, env, launcher="horovodrun")
    assert "-H n1:4,n2:4" in plan.command_line()


def test_cli_dry_run_prints_the_command(capsys):
    from hybridps.cli import main
    assert main(["launch", "-np", "3", "--launcher", "mpirun", "--dry-run", "--", "train",
                 "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "hybridps launch: 3 ranks per node on" in out
    assert "-np 3" in out and f"{sys.executable} -m hybridps.cli train --steps 7" in out


# ------------------------------------------------------------------ doctor report (no MPI)
def test_doctor_report_flags_problems_and_version_mismatches():
    layout = {"host": "n1", "local_rank": 0, "local_size": 2, "source": "openmpi", "cores": 2,
              "bound_to": 2, "alltoallv_ms": 0.1}
    good, bad = Findings(), Findings()
    for findings in (good, bad):
        findings.ok("MPI thread level MULTIPLE")
    bad.fail("Horovod's mpi_lib links /a/libmpi.so but mpi4py loaded /b/libmpich.so")
    gathered = [(good.checks, {"tensorflow": "2.15.1"}, layout),
                (bad.checks, {"tensorflow": "2.14.0"}, dict(layout, local_rank=1))]
    report, problems = format_report(gathered, 2)
    assert problems == 2
    assert "[ok  ] MPI thread level MULTIPLE\n" in report            # on all ranks: no rank list
    assert "[FAIL] Horovod's mpi_lib links" in report and "[rank 1]" in report
    assert "rank 1 has tensorflow 2.14.0 but rank 0 has 2.15.1" in report
    assert report.endswith("result: 2 problem(s), 0 warning(s)")
    ok_report, ok_problems = format_report([(good.checks, {"tensorflow": "2.15.1"},
                                             dict(layout, local_size=1))], 1)
    assert ok_problems == 0 and "ready to train" in ok_report


# ------------------------------------------------------------------ real runs
def _clean_environment():
    """This process' environment without the settings `hybridps launch` must supply itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "HOROVOD_", "PMIX_", "SLURM_"))
           and k not in ("OMP_NUM_THREADS", "HYBRIDPS_TF_THREADS", "HYBRIDPS_WATCHDOG_TIMEOUT")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_launch_runs_a_two_rank_training(tmp_path, launcher):
    if not mpirun_available():
        pytest.skip("mpirun not on PATH (run `make setup`)")
    metrics = tmp_path / "metrics.json"
    command = [os.path.join(os.path.dirname(sys.executable), "hybridps"), "launch", "-np", "2",
               "--launcher", launcher, "--", "train", "--steps", "6", "--batch-size", "64",
               "--hidden", "16", "--dim", "8", "--vocab-size", "2000", "--warmup-steps", "2",
               "--no-progress", "--metrics-out", str(metrics)]
    try:
        proc = subprocess.run(command, cwd=REPO, env=_clean_environment(), capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hybridps launch --launcher {launcher} hung:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    printed = [line for line in proc.stdout.splitlines() if line.startswith("hybridps launch: ")]
    command_line = printed[-1]
    assert f"{launcher} -np 2" in command_line and "OMP_NUM_THREADS=1" in command_line
    result = json.loads(metrics.read_text())
    assert result["ranks"] == 2 and result["steps"] == 6 and result["global_batch_size"] == 128


@pytest.mark.mpi
def test_doctor_passes_under_mpirun_on_two_ranks():
    proc = run_mpi(2, ["-m", "hybridps.cli", "doctor", "--timeout", "60"], timeout=180)
    out = proc.stdout
    assert out.count("hybridps doctor: 2 rank(s) on 1 host(s)") == 1, "rank 0 alone prints the report"
    for check in ("MPI thread level MULTIPLE", "mpi4py and Horovod use the same MPI library",
                  "alltoallv smoke test on 2 rank(s): 5 split patterns, including empty splits",
                  "MPI allreduce (sum, max) smoke test", "Horovod allreduce and broadcast smoke test"):
        assert f"[ok  ] {check}" in out, out
    for piece in ("hybridps", "numpy", "tensorflow", "keras", "horovod", "mpi4py", "MPI library",
                  "mpirun on PATH"):
        assert f"\n  {piece} " in out
    for package in ("tensorflow", "keras", "numpy", "horovod"):   # the versions pip installed
        version = importlib.metadata.version("tensorflow-cpu" if package == "tensorflow" else package)
        assert f"\n  {package:18s} {version}\n" in out, out
    assert "[FAIL]" not in out and "result: 0 problem(s)" in out
