"""``hybridps doctor``: a preflight check of the MPI / Horovod / hybridps stack, on every rank.

Run it as the job would run: ``mpirun -np 4 hybridps doctor`` (or ``hybridps launch -np 4 --
doctor``, or inside a Slurm job), or alone on one process. Every rank checks itself; rank 0
gathers the findings and prints one report; the exit code is 1 on every rank when any rank
found a problem (0 otherwise; warnings do not count).

What is checked:
  * versions of every piece (Python, hybridps and its compiled kernels, numpy, TensorFlow,
    Keras, Horovod, mpi4py, the MPI library, the mpirun on PATH), and that all ranks agree;
  * MPI thread level MULTIPLE (Horovod's thread and hybridps' exchange thread call MPI);
  * Horovod built with MPI, initialised on the same communicator (same rank and size), and
    linked against the same MPI library that mpi4py loaded (a second libmpi in the process
    means two MPIs: rebuild Horovod against the MPI on PATH);
  * smoke tests through hybridps.comm: alltoallv with several split patterns, including
    empty splits and an all-empty exchange, checked element by element; MPI allreduce;
    Horovod allreduce and broadcast;
  * ranks versus cores on each node, and the oversubscription settings of docs/clusters.md
    ("Running on a small machine").
A smoke test that hangs is ended by the collective watchdog (``--timeout``, default 60 s).

:func:`probe_hosts` (no MPI in this process) asks the launcher to start one process on each
host, as a job would: the supervisor of elastic restarts (hybridps.supervisor) relaunches on
the hosts that answer.
What does not live here: the launch commands (hybridps.launch).
"""
import glob
import os
import platform
import re
import socket
import subprocess
import sys
import time

import numpy as np

_MPI_LIB = re.compile(r"^lib(mpi|mpich|mpi_mt|mpi_dbg|mpi_ibm|msmpi)\.so")


class Findings:
    """Problems (exit 1), warnings and passed checks of one rank."""

    def __init__(self):
        self.checks = []        # (status, message); status in ok | warn | FAIL

    def ok(self, message):
        self.checks.append(("ok", message))

    def warn(self, message):
        self.checks.append(("warn", message))

    def fail(self, message):
        self.checks.append(("FAIL", message))

    @property
    def problems(self):
        return [m for s, m in self.checks if s == "FAIL"]


def mapped_mpi_libraries():
    """Real paths of the MPI libraries mapped into this process (from /proc/self/maps)."""
    found = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and _MPI_LIB.match(os.path.basename(parts[5])):
                    found.add(os.path.realpath(parts[5]))
    except OSError:
        pass
    return sorted(found)


def linked_mpi_libraries(shared_object):
    """Real paths of the MPI libraries ``ldd`` resolves for a shared object ([] if unknown)."""
    try:
        out = subprocess.run(["ldd", shared_object], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    paths = re.findall(r"^\s*(\S+)\s+=>\s+(\S+)", out, re.MULTILINE)
    return sorted({os.path.realpath(path) for name, path in paths if _MPI_LIB.match(name)})


def _version(module_name):
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "?")
    except ImportError:
        return None


def _mpirun_version():
    from hybridps.launch import detect_environment
    env = detect_environment()
    if not env.mpirun:
        return "not on PATH"
    try:
        out = subprocess.run([env.mpirun, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return f"{env.mpirun}: did not answer --version"
    first = (out.stdout + out.stderr).strip().splitlines()
    return f"{first[0] if first else '?'} ({env.mpirun})"


def check_rank(comm, findings, versions):
    """Everything one rank checks (collectives included); fills ``findings`` and ``versions``."""
    from hybridps import launch, watchdog
    MPI = comm.MPI
    versions["MPI library"] = MPI.Get_library_version().strip("\x00 \n").splitlines()[0]
    versions["MPI standard"] = "%d.%d" % MPI.Get_version()
    levels = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
              MPI.THREAD_SERIALIZED: "SERIALIZED", MPI.THREAD_MULTIPLE: "MULTIPLE"}
    level = MPI.Query_thread()
    if level == MPI.THREAD_MULTIPLE:
        findings.ok("MPI thread level MULTIPLE")
    else:
        findings.fail(f"MPI thread level is {levels.get(level, level)}, hybridps needs MULTIPLE: "
                      f"use an MPI built with thread support (Open MPI: the default build)")
    mpi_libs_before = mapped_mpi_libraries()

    # Horovod: built with MPI, same communicator, same MPI library.
    hvd = _check_horovod(comm, findings, versions, mpi_libs_before)

    # Local layout: ranks per node against usable cores.
    local_rank, local_size, source = launch.local_rank_and_size(os.environ, comm.rank, comm.size)
    cores = os.cpu_count() or 1
    try:
        bound_to = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        bound_to = cores
    layout = {"host": socket.gethostname(), "local_rank": local_rank, "local_size": local_size,
              "source": source, "cores": cores, "bound_to": bound_to}
    if local_size > cores:
        missing = [f"{k}={v}" for k, v in (("OMPI_MCA_mpi_yield_when_idle", "1"), ("OMP_NUM_THREADS", "1"),
                                            ("HYBRIDPS_TF_THREADS", "1")) if k not in os.environ]
        if missing and "Open MPI" in versions["MPI library"]:
            findings.warn(f"{local_size} ranks share {cores} cores on {layout['host']} without "
                          f"{' '.join(missing)}: every collective will cost a scheduler time "
                          f"slice; start with `hybridps launch`, which sets them")

    layout["alltoallv_ms"] = 1000 * _smoke_alltoallv(comm, findings)
    _smoke_allreduce(comm, findings)
    if hvd is not None:
        _smoke_horovod(comm, hvd, findings)
    versions["watchdog timeout"] = f"{watchdog.current_timeout():g}s"
    return layout


def _check_horovod(comm, findings, versions, mpi_libs_before):
    try:
        import horovod
        import horovod.tensorflow as hvd
    except ImportError as exc:
        findings.fail(f"Horovod with TensorFlow cannot be imported ({exc}); run `make setup` "
                      f"(builds horovod 0.28.1 against the MPI on PATH)")
        return None
    versions["horovod"] = horovod.__version__
    versions["tensorflow"] = _version("tensorflow")
    versions["keras"] = _version("keras") or "not installed"
    if not hvd.mpi_built():
        findings.fail("Horovod was built without MPI support; rebuild it with HOROVOD_WITH_MPI=1 "
                      "(`make setup` after removing its cached wheel)")
        return None
    from hybridps import comm as comm_module
    from hybridps.errors import CommError
    try:
        comm_module.init(with_horovod=True)
    except CommError as exc:
        findings.fail(f"Horovod init on hybridps' communicator failed: {exc}")
        return None
    if not hvd.mpi_enabled():
        findings.fail("Horovod runs without its MPI controller (Gloo?); hybridps needs Horovod on "
                      "MPI: unset HOROVOD_GLOO / use mpirun or srun, not horovodrun --gloo")
    else:
        findings.ok(f"Horovod {horovod.__version__} built with MPI, initialised on MPI_COMM_WORLD "
                    f"(its rank and size match MPI's)")
    if not hvd.mpi_threads_supported():
        findings.fail("Horovod reports that its MPI lacks MPI_THREAD_MULTIPLE support")
    mapped = mapped_mpi_libraries()
    linked = []
    for shared_object in glob.glob(os.path.join(os.path.dirname(hvd.__file__), "mpi_lib*.so")):
        linked += linked_mpi_libraries(shared_object)
    linked = sorted(set(linked))
    if len(mapped) > 1:
        findings.fail(f"two MPI libraries are loaded in one process: {', '.join(mapped)} "
                      f"(mpi4py loaded {', '.join(mpi_libs_before) or '?'}). mpi4py and Horovod "
                      f"must use the same MPI: rebuild Horovod (and mpi4py) against the MPI whose "
                      f"mpicc is on PATH")
    elif linked and mpi_libs_before and set(linked) != set(mpi_libs_before):
        findings.fail(f"Horovod's mpi_lib links {', '.join(linked)} but mpi4py loaded "
                      f"{', '.join(mpi_libs_before)}: rebuild Horovod against the MPI mpi4py uses")
    else:
        findings.ok(f"mpi4py and Horovod use the same MPI library: {', '.join(mapped or linked) or '?'}")
    return hvd


def _exchange_patterns(rank, size):
    """Per-destination row counts of each smoke-test exchange (empty splits on purpose)."""
    rng = np.random.default_rng(1234 + rank)
    return {
        "random splits (some empty)": rng.integers(0, 4, size=size) * (np.arange(size) % 2 == rank % 2),
        "all empty": np.zeros(size, dtype=np.int64),
        "only to self": np.where(np.arange(size) == rank, 5, 0),
        "all to rank 0": np.where(np.arange(size) == 0, 3 + rank, 0),
        "nothing from the last rank": np.full(size, 0 if rank == size - 1 else 2),
    }


def _smoke_alltoallv(comm, findings):
    dim = 4
    failures = []
    for name, counts in _exchange_patterns(comm.rank, comm.size).items():
        counts = np.asarray(counts, dtype=np.int64)
        # Row j for destination d from source s holds key s * 10**6 + d * 10**3 + j.
        keys = np.concatenate([comm.rank * 10**6 + dest * 10**3 + np.arange(n, dtype=np.int64)
                               for dest, n in enumerate(counts)] or [np.zeros(0, np.int64)])
        rows = np.repeat(keys.astype(np.float32)[:, None], dim, axis=1)
        recv_counts = comm.alltoall_counts(counts[:, None])[:, 0]
        got_keys = comm.alltoallv(keys, counts, recv_counts)
        got_rows = comm.alltoallv(rows, counts, recv_counts)
        expected = np.concatenate([src * 10**6 + comm.rank * 10**3 + np.arange(n, dtype=np.int64)
                                   for src, n in enumerate(recv_counts)] or [np.zeros(0, np.int64)])
        if not (np.array_equal(got_keys, expected) and got_rows.shape == (len(expected), dim)
                and np.array_equal(got_rows[:, 0], expected.astype(np.float32))):
            failures.append(name)
    if failures:
        findings.fail(f"alltoallv smoke test delivered wrong data for: {', '.join(failures)}. "
                      f"The MPI library or its transport is broken; try OMPI_MCA_pml=ob1 "
                      f"OMPI_MCA_btl=self,vader,tcp and report the MPI version")
    else:
        findings.ok(f"alltoallv smoke test on {comm.size} rank(s): 5 split patterns, including "
                    f"empty splits and an all-empty exchange (keys and float rows)")
    started = time.perf_counter()
    payload = np.zeros(comm.size * 64, dtype=np.int64)
    counts = np.full(comm.size, 64)
    for _ in range(20):
        comm.alltoallv(payload, counts, counts)
    return (time.perf_counter() - started) / 20


def _smoke_allreduce(comm, findings):
    values = np.arange(8, dtype=np.int64) * (comm.rank + 1)
    total = comm.allreduce_sum(values)
    expected = np.arange(8, dtype=np.int64) * (comm.size * (comm.size + 1) // 2)
    biggest = comm.allreduce_max(np.array([float(comm.rank)]))
    if np.array_equal(total, expected) and biggest[0] == comm.size - 1:
        findings.ok("MPI allreduce (sum, max) smoke test")
    else:
        findings.fail(f"MPI allreduce returned {total.tolist()} / {biggest.tolist()}, expected "
                      f"{expected.tolist()} / [{comm.size - 1}]: the MPI library is broken")


def _smoke_horovod(comm, hvd, findings):
    import tensorflow as tf
    summed = hvd.allreduce(tf.fill([3], float(comm.rank + 1)), op=hvd.Sum, name="doctor_allreduce")
    value = tf.Variable(tf.fill([2], float(comm.rank)))
    hvd.broadcast_variables([value], root_rank=0)
    expected = comm.size * (comm.size + 1) / 2
    if np.allclose(summed.numpy(), expected) and np.allclose(value.numpy(), 0.0):
        findings.ok("Horovod allreduce and broadcast smoke test")
    else:
        findings.fail(f"Horovod allreduce gave {summed.numpy().tolist()} (expected {expected}) or "
                      f"broadcast gave {value.numpy().tolist()} (expected 0): Horovod and MPI "
                      f"disagree; rebuild Horovod against this MPI")


def _static_versions():
    import hybridps
    versions = {"python": f"{platform.python_version()} ({sys.executable})",
                "platform": platform.platform(), "hybridps": hybridps.__version__,
                "numpy": np.__version__, "mpi4py": _version("mpi4py"),
                "Cython (build)": _version("Cython") or "not installed"}
    return versions


def _native_kernels(findings):
    missing = []
    for name in ("hybridps._hashtable", "hybridps._kernels"):
        try:
            __import__(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        findings.fail(f"compiled kernels missing: {'; '.join(missing)}; run `make setup` "
                      f"(or pip install --no-build-isolation -e .)")
    else:
        findings.ok("compiled kernels hybridps._hashtable and hybridps._kernels load")


PROBE_TIMEOUT_S = 20.0


def probe_hosts(hosts, environment, launcher="auto", timeout=PROBE_TIMEOUT_S):
    """The hosts among ``hosts`` where the launcher (mpirun through its remote agent, or srun)
    starts and ends one ``true`` process within ``timeout`` seconds; all probed at once.

    A host that is down, unreachable or whose link is down does not answer (its probe is
    ended with its whole process group at the timeout)."""
    import signal
    import threading
    from hybridps.launch import build_plan
    answering = set()

    def probe(host):
        plan = build_plan(["true"], environment, num_ranks=1, hosts=f"{host}:1",
                          launcher="mpirun" if launcher == "horovodrun" else launcher,
                          environ=os.environ)
        try:
            child = subprocess.Popen(plan.argv, env=dict(os.environ, **plan.env), start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return
        try:
            if child.wait(timeout=timeout) == 0:
                answering.add(host)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()

    threads = [threading.Thread(target=probe, args=(host,), daemon=True) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answering


def format_report(gathered, size):
    """Rank 0's text report from every rank's (findings.checks, versions, layout)."""
    lines = []
    hosts = {}
    for rank, (_checks, _versions, layout) in enumerate(gathered):
        hosts.setdefault(layout["host"], []).append(rank)
    lines.append(f"hybridps doctor: {size} rank(s) on {len(hosts)} host(s)")
    layout_problems = []
    for host, ranks in hosts.items():
        layout = gathered[ranks[0]][2]
        slowest = max(gathered[r][2]["alltoallv_ms"] for r in ranks)
        bound = sorted({gathered[r][2]["bound_to"] for r in ranks})
        local_ranks = sorted(gathered[r][2]["local_rank"] for r in ranks)
        local_sizes = sorted({gathered[r][2]["local_size"] for r in ranks})
        lines.append(f"  {host}: ranks {_ranges(ranks)}, {layout['cores']} cores (each rank may "
                     f"use {'/'.join(map(str, bound))}), "
                     f"local rank/size from {layout['source']} (local ranks {_ranges(local_ranks)} "
                     f"of {'/'.join(map(str, local_sizes))} per node), small alltoallv {slowest:.2f} ms")
        if local_ranks != list(range(len(ranks))) or local_sizes != [len(ranks)]:
            layout_problems.append(
                f"{host} runs {len(ranks)} rank(s) ({_ranges(ranks)}) but the launcher gave them "
                f"local ranks {local_ranks} and local size(s) {local_sizes}: per-node settings "
                f"(threads per rank, oversubscription) would be wrong; check how the job was "
                f"started (hostfile / --hosts / Slurm tasks per node)")
    base_versions = gathered[0][1]
    lines.append("versions (rank 0):")
    for name, value in base_versions.items():
        lines.append(f"  {name:18s} {value}")
    problems = warnings = 0
    lines.append("checks:")
    seen = {}
    for rank, (checks, versions, _layout) in enumerate(gathered):
        for status, message in checks:
            seen.setdefault((status, message), []).append(rank)
        for name, value in versions.items():
            if name in ("python", "platform", "mpirun on PATH"):
                continue
            if base_versions.get(name) != value:
                seen.setdefault(("FAIL", f"rank {rank} has {name} {value} but rank 0 has "
                                         f"{base_versions.get(name)}: every node needs the same "
                                         f"software (same venv / modules)"), []).append(rank)
    for message in layout_problems:
        seen.setdefault(("FAIL", message), []).extend(range(size))
    if not layout_problems and len(hosts) > 1:
        seen.setdefault(("ok", f"local ranks and sizes match the {len(hosts)} hosts the ranks run "
                               f"on"), []).extend(range(size))
    for (status, message), ranks in seen.items():
        where = "" if len(ranks) == size else f" [rank {_ranges(ranks)}]"
        lines.append(f"  [{status:4s}] {message}{where}")
        problems += status == "FAIL"
        warnings += status == "warn"
    lines.append(f"result: {problems} problem(s), {warnings} warning(s)"
                 + ("" if problems else " - ready to train"))
    return "\n".join(lines), problems


def _ranges(ranks):
    ranks = sorted(ranks)
    parts, start = [], ranks[0]
    for previous, current in zip(ranks, ranks[1:] + [None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(parts)


def main(args):
    """``hybridps doctor``: check this rank, gather, print the report on rank 0.

    Returns:
        0 when no rank found a problem, 1 otherwise (the same on every rank).
    """
    findings = Findings()
    versions = _static_versions()
    from hybridps import comm as comm_module
    from hybridps import watchdog
    from hybridps.errors import CommError
    watchdog.configure(args.timeout)
    try:
        comm = comm_module.init(with_horovod=False)
    except CommError as exc:
        sys.stderr.write(f"hybridps doctor: [FAIL] MPI: {exc}\nresult: 1 problem(s)\n")
        return 1
    if comm.rank == 0:
        versions["mpirun on PATH"] = _mpirun_version()
    _native_kernels(findings)
    layout = check_rank(comm, findings, versions)
    gathered = comm.allgather_object((findings.checks, versions, layout))
    problems = 0
    if comm.rank == 0:
        report, problems = format_report(gathered, comm.size)
        print(report, flush=True)
    problems = comm.bcast_object(problems, root=0)
    return 1 if problems else 0
