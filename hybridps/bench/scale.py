"""``hybridps bench scale --out DIR``: DeepFM on several hosts of the network-namespace test bed.

Hosts are network namespaces of this machine (launch/testbed/netns.py), one rank each, joined
by links shaped to ``--bandwidths`` (Gbit/s) with ``--latency-ms`` of one-way delay (added with
netem where the kernel has it; the bed reports whether it could). Cases, with the names of
``bench compare``: collective-bsp, collective-asp, ps-bsp, ps-asp (``max(1, N // 4)``
servers, the rest workers) and tf-baseline, for every host count and bandwidth; plus, per host
count, the compute-ceiling (the TF step alone: the compute time, and the baseline's) and, with
``--host-floor`` (default), every case once on unshaped links (what the hosts themselves cost
the exchange). Writes DIR/scale.json, DIR/scale.md and DIR/scale.png and prints the table.

Measured per case: ``samples_per_s`` (as ``hybridps train`` reports it); ``bytes_per_step_per_rank``
(as ``bench compare``: hybridps' own counts, sent + received per computing rank, plus the
dense traffic: measured for PS, the ring model for Horovod); ``link_bytes_per_step`` (the
kernel's counters of the busiest host's link, sent + received); ``compute_ms`` (the TF step,
max over ranks); ``exchange_ms``: the time per step a computing rank is held up by the
exchange, from the exchange traces (hybridps.exchange_trace; one clock, since every host is
on this machine), per step from the rank held up least, so that waiting for a slower rank's
compute is left out:
  * collective-bsp: the main thread in the sparse collectives and waiting for the dense
    allreduce's result;
  * collective-asp: the exchange thread in the sparse collectives (overlapped with compute);
  * ps-bsp, ps-asp: the worker waiting for its pulls and pushes (servers excluded);
  * tf-baseline (its allgather and allreduce run inside the TF step): its step time minus the
    compute-ceiling's step time.
``model_exchange_ms`` is docs/scaling.md's time model (latency and bandwidth terms,
:func:`model_exchange_ms`, with the test bed's header overhead) on the measured unique keys;
``host_floor_ms`` the same case's exchange_ms on unshaped links. The PNG puts the model's prediction for 8 to 256 hosts
(:func:`predict`: every host with its own core, compute and local work as measured on 2 hosts)
beside the measured points.
"""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

from hybridps.bench.report import bench_environment, markdown_table, write_json
from hybridps.bench.train import OVERSUBSCRIBE_ENV, run_rounds

CASES = ("collective-bsp", "collective-asp", "ps-bsp", "ps-asp", "tf-baseline")
TARGETS = {"collective_bsp_vs_ps_bsp_at_4_hosts_1_gbit": 1.5, "model_within": 0.15}
# Link bytes per payload byte with MTU 1500: a full TCP segment carries 1448 payload bytes in
# 1514 bytes on the link (IPv4, TCP with timestamps, Ethernet; tbf counts them all), and the
# link also carries the ACKs of the traffic coming the other way (66 bytes per 2 segments).
WIRE_PER_PAYLOAD = 1514 / 1448 + 66 / (2 * 1448)
# On the test bed tbf meters the veth's GSO packets (up to 64 KiB behind one set of headers):
# the links' kernel counters showed 1.009-1.016 link bytes per payload byte (ACKs included).
TESTBED_WIRE_PER_PAYLOAD = 1.015
PREDICT_HOSTS = (2, 4, 8, 16, 32, 64, 128, 256)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--hosts", default="2,4", help="host counts (one rank per host), comma-separated")
    parser.add_argument("--bandwidths", default="1,10", help="link rates in Gbit/s, comma-separated")
    parser.add_argument("--latency-ms", type=float, default=0.2, help="one-way delay per link (netem)")
    parser.add_argument("--cases", default=",".join(CASES), help="subset of " + ",".join(CASES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096, help="per computing rank")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--no-host-floor", dest="host_floor", action="store_false",
                        help="skip the runs on unshaped links")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every case this many times (round-robin); report the median run")
    parser.add_argument("--reanalyze", action="store_true",
                        help="no runs: recompute the model columns, table and plot of OUT/scale.json")


def load_testbed():
    """The test bed module, launch/testbed/netns.py of this checkout (not a package module)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "launch", "testbed", "netns.py")
    if not os.path.isfile(path):
        raise RuntimeError(f"bench scale needs the test bed {path}: run it from a checkout of "
                           f"hybridps (pip install -e .)")
    spec = importlib.util.spec_from_file_location("hybridps_testbed_netns", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the model (docs/scaling.md)
def ps_servers(hosts):
    return max(1, hosts // 4)


def exchange_volume(name, hosts, unique_keys, dim, dense_parameters, batch_size, num_fields):
    """Bytes leaving the busiest host per step (what its link must carry) and the message
    rounds, per docs/scaling.md, as ((sparse bytes, dense bytes), (sparse rounds, dense rounds))."""
    n, u, d, p = hosts, unique_keys, dim, dense_parameters
    allreduce = 2 * (n - 1) / n * 4 * p if n > 1 else 0.0     # ring / Rabenseifner volume
    allreduce_rounds = 2 * math.ceil(math.log2(n)) if n > 1 else 0
    if name.startswith("collective"):
        sparse = (n - 1) / n * (8 * u + 8 * d * u)     # keys, rows back, row gradients
        return (sparse, allreduce), (4, allreduce_rounds)
    if name == "tf-baseline":
        block = batch_size * num_fields * (4 * d + 8)    # one rank's IndexedSlices (values + int64 ids)
        return ((n - 1) * block, allreduce), (n - 1, allreduce_rounds)
    k = ps_servers(n)
    w = n - k
    reply = (4 * d * u + 4 * p) / k                     # rows and dense chunk, per worker and server
    push = (4 * d * u + 4 * p) / k
    keys = 8 * u / k
    if name == "ps-bsp":                               # the server's link: every reply, then a push
        return (w * reply + push + keys, 0.0), (3, 0)
    # ASP: the server's link per round of every worker's step (full duplex), overlapped with
    # the workers' compute by model_exchange_ms
    return (w * max(reply, push + keys), 0.0), (3, 0)


def model_exchange_ms(name, hosts, gbit, latency_ms, unique_keys, dim, dense_parameters,
                      batch_size, num_fields, compute_ms=0.0, local_ms=0.0, wire=WIRE_PER_PAYLOAD):
    """Time per step a computing rank is held up by the exchange, by the model: message rounds x
    one-way latency + bytes through the busiest link / its rate (headers and ACKs included:
    ``wire`` link bytes per payload byte; 1.068 on a real MTU 1500 link, 1.015 on the test bed).

    Collective BSP: the main thread waits for the sparse exchange; the dense allreduce runs on
    its own thread during the push and pull and holds the main thread up only for what does not
    fit into their local work (``local_ms``: lookups, updates, unique, scatter). Collective ASP:
    the exchange thread's collectives, sharing the link with the dense allreduce. PS ASP
    overlaps the servers' traffic with the workers' compute (``compute_ms``), but a worker
    waits at least for its own push, keys and reply (its pull is served after its push).
    """
    if hosts == 1:
        return 0.0
    (sparse, dense), (sparse_rounds, dense_rounds) = exchange_volume(
        name, hosts, unique_keys, dim, dense_parameters, batch_size, num_fields)
    per_ms = gbit * 1e9 / 8 / wire / 1000.0                  # payload bytes per ms
    sparse_ms = sparse_rounds * latency_ms + sparse / per_ms
    dense_ms = dense_rounds * latency_ms + dense / per_ms
    if name == "collective-bsp":
        return sparse_ms + max(0.0, dense_ms - local_ms)
    if name == "ps-asp":
        own = (8 * unique_keys + 8 * dim * unique_keys + 8 * dense_parameters) / per_ms
        return 3 * latency_ms + max(own, sparse / per_ms - compute_ms)
    return sparse_ms + dense_ms


def predict(measured, gbits, latency_ms, hosts=PREDICT_HOSTS):
    """Model samples/s and exchange ms for 2..256 hosts, every host with a core of its own.

    Per design, the compute time, the local work of a step (step time - compute - exchange) and
    the host floor (the exchange on unshaped links) are those measured on the fewest hosts (one
    rank per core there); the exchange is max(the model's, that floor). BSP designs add them;
    collective ASP overlaps its exchange thread with compute and local work.
    """
    base = {}
    for case in measured:          # per design: the fewest hosts, then the fastest links
        key = (case["hosts"], -case["bandwidth_gbit"])
        if case["name"] not in base or key < (base[case["name"]]["hosts"], -base[case["name"]]["bandwidth_gbit"]):
            base[case["name"]] = case
    rows = []
    for name, case in base.items():
        compute = case["compute_ms"]
        local = max(0.0, case["step_ms"] - compute - (case["exchange_ms"] or 0.0))
        floor = case.get("host_floor_ms") or 0.0
        for gbit in gbits:
            for n in hosts:
                network = model_exchange_ms(name, n, gbit, latency_ms, case["unique_keys"], case["dim"],
                                            case["dense_parameters"], case["batch_size"],
                                            case["num_fields"], compute, local)
                exchange = max(network, floor)
                if name == "collective-asp":       # the exchange thread overlaps the whole step
                    step_ms = max(compute + local, exchange)
                else:
                    step_ms = compute + local + exchange
                computing = n - ps_servers(n) if name.startswith("ps-") else n
                rows.append({"name": name, "hosts": n, "bandwidth_gbit": gbit,
                             "network_exchange_ms": network, "exchange_ms": exchange, "step_ms": step_ms,
                             "samples_per_s": computing * case["batch_size"] / step_ms * 1000.0})
    return rows


# ------------------------------------------------------------------ traces -> time in the exchange
_HELD = {"collective-bsp": ("MainThread", ("alltoall_counts", "alltoallv", "dense_wait")),
         "collective-asp": ("hybridps-exchange", ("alltoall_counts", "alltoallv")),
         "ps-bsp": ("MainThread", ("ps_pull", "ps_push")),
         "ps-asp": ("MainThread", ("ps_pull", "ps_push"))}


def _union_within(intervals, low, high):
    total, current = 0.0, None
    for start, end in sorted(intervals):
        start, end = max(start, low), min(end, high)
        if end <= start:
            continue
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        total += current[1] - current[0]
    return total


def exchange_from_traces(name, paths):
    """(exchange_ms, exchange_ms_mean_rank) from the ranks' trace files: per steady step, the
    union of the rank's intervals in the exchange calls of ``name`` (see the module doc),
    the least held-up computing rank's per step, averaged over the steps; and the mean over
    ranks and steps (waiting for slower ranks included). (None, None) without traces."""
    thread, names = _HELD[name]
    per_rank = []
    for path in paths:
        with open(path) as fh:
            trace = json.load(fh)
        if trace.get("server"):
            continue
        events = trace["events"]
        marks = [e[2] for e in events if e[0] == "step" and e[1] == "MainThread"]
        start = next(e[2] for e in events if e[0] == "steady_start")
        end = next(e[2] for e in events if e[0] == "train_end")
        bounds = [m for m in marks if m >= start] + [end]
        held = [(e[2], e[3]) for e in events if e[0] in names and e[1] == thread]
        per_rank.append([_union_within(held, a, b) for a, b in zip(bounds, bounds[1:])])
    if not per_rank:
        return None, None
    steps = min(len(r) for r in per_rank)
    if steps == 0:
        return None, None
    least = [min(r[i] for r in per_rank) for i in range(steps)]
    mean = sum(sum(r[:steps]) for r in per_rank) / (steps * len(per_rank))
    return 1000.0 * sum(least) / steps, 1000.0 * mean


# ------------------------------------------------------------------ running
def _case_argv(name, hosts, common):
    train = ["-m", "hybridps.cli", "train", "--model", "deepfm", "--data", "synthetic",
             "--optimizer", "adagrad", "--dense-optimizer", "adagrad", "--dense-learning-rate", "0.05",
             "--no-progress"]
    ps = ["--mode", "ps", "--num-servers", str(ps_servers(hosts))]
    return {"collective-bsp": train + ["--sync", "bsp"],
            "collective-asp": train + ["--sync", "asp"],
            "ps-bsp": train + ps + ["--sync", "bsp"],
            "ps-asp": train + ps + ["--sync", "asp"],
            "tf-baseline": ["-m", "hybridps.bench.train_worker", "tf-baseline"],
            "compute-ceiling": ["-m", "hybridps.bench.train_worker", "hybridps-step"]}[name], common


def _run_on_bed(bed, hosts, argv, env, timeout):
    command = bed.command(bed.hosts[0], ["mpirun", "-np", str(hosts), "--hostfile", bed.hostfile,
                                         "--bind-to", "none", "-x", "PATH", "-x", "HYBRIDPS_EXCHANGE_TRACE",
                                         sys.executable] + argv)
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        for host in bed.hosts:
            bed.kill_host(host)
        raise RuntimeError(f"benchmark case timed out after {timeout}s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case failed ({' '.join(argv)}):\n{proc.stderr[-4000:]}")


def run_scale_bench(out_dir, hosts=(2, 4), bandwidths=(1.0, 10.0), latency_ms=0.2, cases=CASES,
                    steps=60, warmup_steps=10, batch_size=4096, dim=16, vocab_size=100_000,
                    host_floor=True, timeout=900, repeats=1):
    """Run every case on every host count and bandwidth; returns the scale.json object."""
    netns = load_testbed()
    reason = netns.unavailable_reason()
    if reason:
        raise RuntimeError(f"bench scale needs the network-namespace test bed: {reason}")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; allowed {', '.join(CASES)}")
    os.makedirs(out_dir, exist_ok=True)
    common = ["--steps", str(steps), "--warmup-steps", str(warmup_steps), "--batch-size",
              str(batch_size), "--dim", str(dim), "--vocab-size", str(vocab_size)]
    beds = {}
    try:
        for n in hosts:
            beds[n] = netns.TestBed(hosts=n, slots=1, latency_ms=latency_ms).up()
        rtt_us = beds[max(hosts)].measure_rtt_us(0, 1) if max(hosts) > 1 else None
        plan = []
        for n in hosts:
            plan.append((f"compute-ceiling/{n}", {"name": "compute-ceiling", "hosts": n, "gbit": None}))
            for gbit in list(bandwidths) + ([None] if host_floor else []):
                for name in cases:
                    plan.append((f"{name}/{n}/{gbit}", {"name": name, "hosts": n, "gbit": gbit}))

        def run_case(label, spec):
            n, gbit, name = spec["hosts"], spec["gbit"], spec["name"]
            bed = beds[n]
            if (bed.bandwidth_gbit, bed.latency_ms) != (gbit, latency_ms):
                bed.shape(gbit, latency_ms)
            tag = f"{name}-{n}h-{'unshaped' if gbit is None else f'{gbit:g}g'}"
            metrics_path = os.path.join(out_dir, f"{tag}.json")
            trace_prefix = os.path.join(out_dir, "traces", tag)
            for old in glob.glob(trace_prefix + ".rank*.json"):
                os.unlink(old)
            argv, extra = _case_argv(name, n, common)
            argv = argv + ([metrics_path] if name in ("tf-baseline", "compute-ceiling")
                           else ["--metrics-out", metrics_path]) + extra
            env = dict(os.environ, **OVERSUBSCRIBE_ENV, **bed.mpi_env(),
                       HYBRIDPS_EXCHANGE_TRACE=trace_prefix)
            before = {h: bed.link_bytes(h) for h in bed.hosts}
            sys.stderr.write(f"bench scale: {name} on {n} hosts, "
                             f"{'unshaped links' if gbit is None else f'{gbit:g} Gbit/s'} ...\n")
            started = time.perf_counter()
            _run_on_bed(bed, n, argv, env, timeout)
            wall = time.perf_counter() - started
            after = {h: bed.link_bytes(h) for h in bed.hosts}
            with open(metrics_path) as fh:
                result = json.load(fh)
            link = max(sum(a) - sum(b) for a, b in zip(after.values(), before.values())) / steps
            traces = sorted(glob.glob(trace_prefix + ".rank*.json"))
            exchange, exchange_mean = (exchange_from_traces(name, traces) if name in _HELD
                                       else (None, None))
            sys.stderr.write(f"  {result['samples_per_s']:,.0f} samples/s"
                             + (f", exchange {exchange:.1f} ms/step" if exchange is not None else "")
                             + f" ({wall:.0f}s)\n")
            return dict(result, link_bytes_per_step=link, exchange_ms=exchange,
                        exchange_ms_mean_rank=exchange_mean, wall_s=wall)

        chosen = run_rounds(plan, repeats, run_case)
        latency_applied = all(bed.latency_applied for bed in beds.values())
    finally:
        for bed in beds.values():
            bed.down()
    model_latency = latency_ms if latency_applied else (rtt_us or 0.0) / 2000.0
    report = _report(chosen, hosts, bandwidths, cases, host_floor, batch_size, dim)
    report["testbed"] = {"latency_ms_requested": latency_ms, "latency_applied": latency_applied,
                         "rtt_us_measured": rtt_us, "model_latency_ms": model_latency,
                         "note": None if latency_applied else
                         "this kernel has no sch_netem: the links have the veth's own latency "
                         "(measured RTT above); the model uses it, and predicts with the requested "
                         "latency in 'prediction'"}
    report["settings"] = {"hosts": list(hosts), "bandwidths_gbit": list(bandwidths), "steps": steps,
                          "warmup_steps": warmup_steps, "batch_size_per_computing_rank": batch_size,
                          "dim": dim, "vocab_size": vocab_size, "model": "deepfm", "repeats": repeats,
                          "ranks_per_host": 1, "cores": os.cpu_count(), "latency_ms": latency_ms}
    report["machine"] = bench_environment()
    return _finish(out_dir, report)


def reanalyze(out_dir):
    """Recompute the model columns, table and plot of DIR/scale.json (no run)."""
    with open(os.path.join(out_dir, "scale.json")) as fh:
        report = json.load(fh)
    return _finish(out_dir, report)


def _finish(out_dir, report):
    add_models(report, report["testbed"]["model_latency_ms"])
    report["prediction"] = predict(report["cases"], report["settings"]["bandwidths_gbit"],
                                   report["settings"]["latency_ms"])
    write_json(os.path.join(out_dir, "scale.json"), report)
    text = _markdown(report)
    with open(os.path.join(out_dir, "scale.md"), "w") as fh:
        fh.write(text)
    _plot(os.path.join(out_dir, "scale.png"), report)
    print(text)
    return report


def _report(chosen, hosts, bandwidths, cases, host_floor, batch_size, dim):
    ceilings = {}
    for n in hosts:
        ceiling = chosen[f"compute-ceiling/{n}"]
        ceilings[n] = {"samples_per_s": ceiling["samples_per_s"],
                       "step_ms": n * batch_size / ceiling["samples_per_s"] * 1000.0}
    measured, floor_rows = [], []
    for gbit in ([None] if host_floor else []) + list(bandwidths):
        for n in hosts:
            for name in cases:
                row = _case_row(chosen[f"{name}/{n}/{gbit}"], name, n, gbit, ceilings[n], batch_size, dim)
                (floor_rows if gbit is None else measured).append(row)
    return {"cases": measured, "host_floor": floor_rows, "compute_ceiling": ceilings, "targets": TARGETS}


def add_models(report, latency_ms):
    """Fill in the model columns, ratios and checks of a report from its measured figures
    (also for a scale.json written earlier: ``bench scale --reanalyze``)."""
    floors = {(c["name"], c["hosts"]): c["exchange_ms"] for c in report.get("host_floor", [])}
    for c in report["cases"]:
        local = max(0.0, c["step_ms"] - c["compute_ms"] - (c["exchange_ms"] or 0.0))
        c["model_exchange_ms"] = model_exchange_ms(
            c["name"], c["hosts"], c["bandwidth_gbit"], latency_ms, c["unique_keys"], c["dim"],
            c["dense_parameters"], c["batch_size"], c["num_fields"], c["compute_ms"], local,
            wire=TESTBED_WIRE_PER_PAYLOAD)
        c["host_floor_ms"] = floors.get((c["name"], c["hosts"]))
        c["model_with_host_floor_ms"] = (max(c["model_exchange_ms"], c["host_floor_ms"])
                                         if c["host_floor_ms"] is not None else None)
        measured = c["exchange_ms"] is not None          # a measured 0.0 ms is a ratio of 0.0
        c["measured_vs_model"] = (c["exchange_ms"] / c["model_exchange_ms"]
                                  if measured and c["model_exchange_ms"] else None)
        c["measured_vs_model_with_host_floor"] = (c["exchange_ms"] / c["model_with_host_floor_ms"]
                                                  if measured and c["model_with_host_floor_ms"] else None)
    by = {(c["name"], c["hosts"], c["bandwidth_gbit"]): c for c in report["cases"]}
    ratios = {}
    bsp, ps = by.get(("collective-bsp", 4, 1.0)), by.get(("ps-bsp", 4, 1.0))
    if bsp and ps:
        ratios["collective_bsp_vs_ps_bsp_at_4_hosts_1_gbit"] = bsp["samples_per_s"] / ps["samples_per_s"]
    checks = {}
    for key in ("measured_vs_model", "measured_vs_model_with_host_floor"):
        values = [c[key] for c in report["cases"] if c[key] is not None]
        checks[key + "_within_15pct"] = {"met": sum(abs(v - 1) <= TARGETS["model_within"] for v in values),
                                        "of": len(values)}
    report["ratios"], report["checks"] = ratios, checks
    return report


def _case_row(result, name, hosts, gbit, ceiling, batch_size, dim):
    computing = result.get("computing_ranks", hosts)
    step_ms = computing * batch_size / result["samples_per_s"] * 1000.0
    unique = result.get("exchange", {}).get("keys_sent_per_step")
    dense = result.get("dense_parameters", 0)
    num_fields = 26
    from hybridps.bench.compare import ring_allreduce_bytes
    if "exchange" in result:       # hybridps: sparse bytes measured (sent + received); dense as compare
        sparse = result["exchange"]["bytes_sent_per_step"] + result["exchange"]["bytes_received_per_step"]
        dense_bytes = 0.0 if name.startswith("ps-") else ring_allreduce_bytes(hosts, dense)
        compute = result["phase_ms_per_step_max_over_ranks"]["compute"]
        exchange = result["exchange_ms"]
    else:                          # baseline: allgathered IndexedSlices + ring
        sparse = 2 * (hosts - 1) * batch_size * num_fields * (4 * dim + 8)
        dense_bytes = ring_allreduce_bytes(hosts, dense)
        compute = ceiling["step_ms"]
        exchange = max(0.0, step_ms - ceiling["step_ms"])
        unique = batch_size * num_fields
    return {"name": name, "hosts": hosts, "bandwidth_gbit": gbit,
            "samples_per_s": result["samples_per_s"], "samples_per_s_runs": result["samples_per_s_runs"],
            "bytes_per_step_per_rank": sparse + dense_bytes,
            "link_bytes_per_step": result["link_bytes_per_step"],
            "exchange_ms": exchange, "exchange_ms_mean_rank": result.get("exchange_ms_mean_rank"),
            "compute_ms": compute, "step_ms": step_ms,
            "computing_ranks": computing, "unique_keys": unique, "dense_parameters": dense,
            "batch_size": batch_size, "dim": dim, "num_fields": num_fields,
            "auc": result["auc"], "final_loss": result["final_loss"]}


def _markdown(report):
    rows = [dict(c, link=c["link_bytes_per_step"]) for c in report["cases"]]
    table = markdown_table(rows, [
        ("name", "case", ""), ("hosts", "hosts", ""), ("bandwidth_gbit", "Gbit/s", "g"),
        ("samples_per_s", "samples/s", ",.0f"), ("bytes_per_step_per_rank", "bytes/step/rank", ",.0f"),
        ("link", "link bytes/step (busiest host)", ",.0f"), ("compute_ms", "compute ms", ".1f"),
        ("exchange_ms", "exchange ms", ".1f"), ("model_exchange_ms", "model ms", ".1f"),
        ("measured_vs_model", "measured/model", ".2f"), ("host_floor_ms", "unshaped ms", ".1f"),
        ("measured_vs_model_with_host_floor", "measured/max(model, unshaped)", ".2f")])
    lines = [table, ""]
    for key, value in report["ratios"].items():
        target = TARGETS[key]
        lines.append(f"{key} = {value:.2f} (target >= {target}: {'met' if value >= target else 'NOT met'})")
    for key, check in report["checks"].items():
        what = "max(model, unshaped)" if "host_floor" in key else "the latency + bandwidth model"
        lines.append(f"{what} within 15% of the measured exchange time: {check['met']} of {check['of']} cases")
    tb = report.get("testbed", {})
    if tb and not tb.get("latency_applied"):
        lines.append(f"latency: {tb['note']} (RTT {tb['rtt_us_measured'] or 0:.0f} us)")
    lines.append("compute-ceiling step ms per host count: " + ", ".join(
        f"{n} hosts {v['step_ms']:.1f}" for n, v in report["compute_ceiling"].items()))
    own = [p for p in report["prediction"] if p["hosts"] in (4, 64, 256) and p["name"] in ("collective-bsp", "ps-bsp", "tf-baseline")]
    lines.append("model, every host with its own core (samples/s): " + "; ".join(
        f"{p['name']} {p['hosts']} hosts {p['bandwidth_gbit']:g} Gbit/s {p['samples_per_s']:,.0f}" for p in own))
    return "\n".join(lines) + "\n"


def _plot(path, report):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    colors = {"collective-bsp": "tab:blue", "collective-asp": "tab:cyan", "ps-bsp": "tab:red",
              "ps-asp": "tab:orange", "tf-baseline": "tab:gray"}
    styles = {}
    for i, gbit in enumerate(sorted({p["bandwidth_gbit"] for p in report["prediction"]})):
        styles[gbit] = ("-", "--", ":", "-.")[i % 4]
    panels = ((fig.add_subplot(1, 2, 1), "exchange_ms", "exchange ms per step"),
              (fig.add_subplot(1, 2, 2), "samples_per_s", "samples / s"))
    for ax, key, label in panels:
        for name in colors:
            for gbit, style in styles.items():
                line = [p for p in report["prediction"] if p["name"] == name and p["bandwidth_gbit"] == gbit]
                if line:
                    ax.plot([p["hosts"] for p in line], [p[key] for p in line], style, color=colors[name],
                            label=f"{name} model {gbit:g} Gbit/s")
            points = [c for c in report["cases"] if c["name"] == name and c.get(key) is not None]
            if points:
                ax.scatter([c["hosts"] for c in points], [c[key] for c in points], color=colors[name],
                           marker="o", edgecolor="black", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _pos: f"{value:g}")   # no mathtext labels
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("hosts (1 rank each)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    panels[0][0].set_title("model (lines: a core per host) vs measured (dots: 2 shared cores)", fontsize=9)
    panels[1][0].set_title("DeepFM throughput: model vs measured", fontsize=9)
    panels[1][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _floats(text):
    return tuple(float(x) for x in str(text).split(",") if x.strip())


def main(args):
    if args.reanalyze:
        reanalyze(args.out)
        return
    run_scale_bench(args.out, hosts=tuple(int(x) for x in _floats(args.hosts)),
                    bandwidths=_floats(args.bandwidths), latency_ms=args.latency_ms,
                    cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()),
                    steps=args.steps, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                    dim=args.dim, vocab_size=args.vocab_size, host_floor=args.host_floor,
                    timeout=args.timeout, repeats=args.repeats)
