"""`hybridps bench table`: throughput of the embedding hash table against pandas and a dict.

Two batched operations, at 1e4, 1e6 and 4e6 keys by default, all three implementations in the
same process, single-threaded:

* lookup of present keys, returning row indices (the work of pandas ``Index.get_indexer``):
    - hybridps: ``table.find(query)`` on a table that holds the keys;
    - pandas:   ``idx.get_indexer(query)`` on ``idx = pd.Index(keys)``, whose engine (a khash
      table) was built once, outside the timing, by a small ``get_indexer`` call;
    - dict:     ``[d.get(k, -1) for k in query_list]``.
* insert of new keys into a fresh table presized to n keys:
    - hybridps: ``EmbeddingHashTable(dim=8, initializer="zeros", capacity_hint=n).insert(keys)``;
    - pandas:   ``pandas._libs.hashtable.Int64HashTable(n).map_locations(keys)``, the khash table
      that ``Index`` builds on its first lookup, presized to n like our ``capacity_hint``
      (pandas caps the size hint at 2**20 keys, i.e. 2,097,152 buckets holding up to 1,614,807
      keys: beyond that its table still grows during the insert, as it does inside ``Index``);
    - dict:     ``dict(zip(keys_list, range(n)))``.
  Each timing includes creating the empty presized table (for all three) and excludes freeing it.
  A hybridps insert writes the hash slot (key, row, hits) and the row's key; the zero row
  itself (values, update count, version 0) is not written, because the table's row memory is
  calloc'd and a row that was never written is already zero: its pages are first touched by
  the row's first update. A table with the normal or uniform initializer writes every row.

Keys are n unique random int64 drawn over the whole int64 range (``np.random.default_rng(seed)``),
inserted in random order; the query is a random permutation of the keys. numpy arrays are
converted to Python lists for the dict outside the timing. The three lookups are checked to
return the same row indices (the keys' positions), and every insert to hold n keys.

Each measurement is repeated ``repeats`` times (fresh tables for every insert), round-robin over
the implementations with the order rotated each round, and the best (minimum) time is
reported as million keys per second. The minimum is the run least disturbed by the machine:
first-touch page faults of freshly allocated memory and allocator warm-up hit whichever
implementation runs first, and other noise (scheduling, frequency changes) only ever adds time.
The garbage collector is disabled during each timed call, as ``timeit`` does.

Targets from the project issue (hybridps / pandas, at 1e6 keys and above): lookup >= 1.5x and
insert >= 1.0x. Writes ``table.json``, ``table.md`` and ``table.png`` to the output directory,
prints the markdown to stdout and progress to stderr.
"""
import argparse
import gc
import os
import sys
import time

import numpy as np

from hybridps.bench.report import bar_chart, bench_environment, markdown_table, write_json

DEFAULT_SIZES = (10_000, 1_000_000, 4_000_000)
IMPLEMENTATIONS = ("hybridps", "pandas", "dict")
OPS = ("lookup", "insert")
TABLE_DIM = 8
TABLE_INITIALIZER = "zeros"
TARGETS = {"lookup": 1.5, "insert": 1.0}   # minimum hybridps / pandas throughput ratio
TARGET_MIN_KEYS = 1_000_000                # targets apply to cases with at least this many keys


def unique_random_keys(n, rng):
    """``n`` distinct int64 keys drawn uniformly over the whole int64 range, in random order."""
    info = np.iinfo(np.int64)
    keys = np.unique(rng.integers(info.min, info.max, size=n, dtype=np.int64, endpoint=True))
    while len(keys) < n:   # a collision among 2**64 values: rare, draw the missing ones again
        more = rng.integers(info.min, info.max, size=n - len(keys), dtype=np.int64, endpoint=True)
        keys = np.unique(np.concatenate([keys, more]))
    return rng.permutation(keys)


def _import_pandas():
    try:
        import pandas as pd
        from pandas._libs.hashtable import Int64HashTable
    except ImportError as exc:
        raise ImportError("hybridps bench table compares against pandas: pip install pandas") from exc
    return pd, Int64HashTable


def _new_table(n):
    """The hybridps table both operations use, presized to n keys."""
    from hybridps._hashtable import EmbeddingHashTable
    return EmbeddingHashTable(dim=TABLE_DIM, initializer=TABLE_INITIALIZER, capacity_hint=n)


def _timed(fn):
    """Seconds taken by ``fn()`` with the garbage collector off, and what it returned."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return seconds, result


def _measure(runners, repeats, check):
    """Time each runner ``repeats`` times, round-robin with the order rotated every round.

    ``check(name, result)`` validates the first result of each runner (outside the timing).
    The result is freed after the timer stops, so deallocation is never timed.
    """
    names = list(runners)
    seconds = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, result = _timed(runners[name])
            if rep == 0:
                check(name, result)
            del result
            seconds[name].append(elapsed)
    return seconds


def _lookup_seconds(keys, repeats, rng):
    """Best-of-``repeats`` timings of the three batched lookups of all ``keys``, permuted."""
    pd, _ = _import_pandas()
    n = len(keys)
    positions = rng.permutation(n)
    query = keys[positions]          # row of query[i] is positions[i]: keys go in in order
    table = _new_table(n)
    table.insert(keys)
    index = pd.Index(keys)
    index.get_indexer(query[:16])    # builds the engine's khash table of all keys
    mapping = dict(zip(keys.tolist(), range(n)))
    query_list = query.tolist()
    runners = {
        "hybridps": lambda: table.find(query),
        "pandas": lambda: index.get_indexer(query),
        "dict": lambda: [mapping.get(k, -1) for k in query_list],
    }

    def check(name, rows):
        if not np.array_equal(np.asarray(rows), positions):
            raise RuntimeError(f"table bench: {name} lookup returned wrong row indices")

    return _measure(runners, repeats, check)


def _insert_seconds(keys, repeats):
    """Timings of building a fresh presized table from ``keys``, ``repeats`` times each."""
    _, Int64HashTable = _import_pandas()
    n = len(keys)
    keys_list = keys.tolist()

    def hybridps_insert():
        table = _new_table(n)
        table.insert(keys)
        return table

    def pandas_insert():
        table = Int64HashTable(n)
        table.map_locations(keys)
        return table

    runners = {
        "hybridps": hybridps_insert,
        "pandas": pandas_insert,
        "dict": lambda: dict(zip(keys_list, range(n))),
    }

    def check(name, table):
        if len(table) != n:
            raise RuntimeError(f"table bench: {name} insert holds {len(table)} keys, expected {n}")

    return _measure(runners, repeats, check)


def _target(n, op):
    """The minimum hybridps/pandas ratio this case must reach, or None when it has none."""
    return TARGETS[op] if n >= TARGET_MIN_KEYS else None


def _case(n, op, seconds):
    """One entry of ``cases``: best throughput per implementation, ratios, target, raw times."""
    case = {"keys": n, "op": op}
    for name in IMPLEMENTATIONS:
        case[f"{name}_mops"] = n / min(seconds[name]) / 1e6
    case["vs_pandas"] = case["hybridps_mops"] / case["pandas_mops"]
    case["vs_dict"] = case["hybridps_mops"] / case["dict_mops"]
    target = _target(n, op)
    case["target_vs_pandas"] = target
    case["target_met"] = None if target is None else bool(case["vs_pandas"] >= target)
    case["seconds"] = {name: seconds[name] for name in IMPLEMENTATIONS}
    return case


def _target_cell(case):
    if case["target_vs_pandas"] is None:
        return None
    return f">= {case['target_vs_pandas']:.1f}x: {'met' if case['target_met'] else 'NOT MET'}"


def _targets_line(cases):
    goals = ", ".join(f"{op} >= {ratio:.1f}x pandas" for op, ratio in TARGETS.items())
    marked = [f"{c['op']} {c['keys']:,} {'met' if c['target_met'] else 'NOT MET'} "
              f"({c['vs_pandas']:.2f}x)" for c in cases if c["target_vs_pandas"] is not None]
    if not marked:
        return f"Targets ({goals}, at {TARGET_MIN_KEYS:,} keys and above): no such case in this run."
    n_met = sum(c["target_met"] for c in cases if c["target_vs_pandas"] is not None)
    return (f"Targets ({goals}, at {TARGET_MIN_KEYS:,} keys and above): {n_met}/{len(marked)} met: "
            + "; ".join(marked) + ".")


def render_markdown(result):
    """The markdown report of a ``run_table_bench`` result."""
    cases, machine, repeats = result["cases"], result["machine"], result["settings"]["repeats"]
    rows = [dict(case, target=_target_cell(case)) for case in cases]
    table = markdown_table(rows, [
        ("op", "op", ""),
        ("keys", "keys", ",d"),
        ("hybridps_mops", "hybridps Mops", ".2f"),
        ("pandas_mops", "pandas Mops", ".2f"),
        ("dict_mops", "dict Mops", ".2f"),
        ("vs_pandas", "hybridps/pandas", ".2f"),
        ("target", "target", ""),
    ])
    versions = ", ".join(f"{name} {machine.get(name)}" for name in ("python", "numpy", "pandas", "hybridps"))
    return "\n".join([
        "# Hash table: hybridps vs pandas vs dict",
        "",
        f"Million keys per second, best of {repeats} runs, single thread, one process. "
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {versions}.",
        "",
        table,
        "",
        _targets_line(cases),
        "",
        "- lookup: batched lookup of present keys (a random permutation of the keys), returning "
        "row indices. hybridps `table.find(query)`; pandas `pd.Index(keys).get_indexer(query)` "
        "(khash engine built once before timing); dict `[d.get(k, -1) for k in query_list]`.",
        f"- insert: a fresh table presized to n, filled with n new keys. hybridps "
        f"`EmbeddingHashTable(dim={TABLE_DIM}, initializer=\"{TABLE_INITIALIZER}\", capacity_hint=n)"
        f".insert(keys)`; pandas `Int64HashTable(n).map_locations(keys)` (the khash table `Index` "
        f"builds on its first lookup, presized to n like `capacity_hint`; pandas caps the size hint "
        f"at 2^20 keys, so above 1,614,807 keys its table still grows during the insert, as it "
        f"does inside `Index`); dict "
        f"`dict(zip(keys_list, range(n)))`. Creating the empty table is timed, freeing it is not. "
        f"hybridps writes the slot and the row's key; a zero row in never-written (calloc'd) "
        f"row memory is not written again, so its pages are first touched by its first update "
        f"(rows of the normal and uniform initializers are always written).",
        "- keys: unique random int64 over the whole int64 range; lists for the dict are made "
        "outside the timing.",
        "- best of runs: the runs go round-robin over the implementations (order rotated each "
        "round, fresh tables for every insert) and the minimum time is kept, because first-touch "
        "page faults and allocator warm-up hit whichever implementation runs first and other "
        "noise only adds time. The garbage collector is off during each timed call.",
        "",
    ])


def _short_count(n):
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def run_table_bench(out_dir, sizes=DEFAULT_SIZES, repeats=3, seed=0):
    """Run the benchmark, write table.json/.md/.png to ``out_dir`` and return the JSON object.

    Args:
        out_dir: output directory (created if needed).
        sizes: numbers of keys, one lookup and one insert case each.
        repeats: runs per implementation and case; the best one is reported.
        seed: seed of the key generator.
    """
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be a non-empty list of positive key counts, got {sizes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for n in sizes:
        keys = unique_random_keys(n, rng)
        for op in OPS:
            print(f"table bench: {op} {n:,} keys, {repeats} runs each ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            seconds = _lookup_seconds(keys, repeats, rng) if op == "lookup" else _insert_seconds(keys, repeats)
            case = _case(n, op, seconds)
            cases.append(case)
            print(f"table bench: {op} {n:,} keys: hybridps {case['hybridps_mops']:.2f}, "
                  f"pandas {case['pandas_mops']:.2f}, dict {case['dict_mops']:.2f} Mops "
                  f"(hybridps/pandas {case['vs_pandas']:.2f}x, {time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
        del keys
    result = {
        "machine": bench_environment(("hybridps", "numpy", "pandas")),
        "settings": {"sizes": sizes, "repeats": repeats, "seed": seed, "dim": TABLE_DIM,
                     "initializer": TABLE_INITIALIZER, "statistic": "min over repeats",
                     "targets_vs_pandas": TARGETS, "target_min_keys": TARGET_MIN_KEYS},
        "cases": cases,
    }
    write_json(os.path.join(out_dir, "table.json"), result)
    markdown = render_markdown(result)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown)
    bar_chart(os.path.join(out_dir, "table.png"),
              groups=[f"{c['op']}\n{_short_count(c['keys'])} keys" for c in cases],
              series={name: [c[f"{name}_mops"] for c in cases] for name in IMPLEMENTATIONS},
              title=f"Hash table throughput (best of {repeats})",
              ylabel="million keys per second")
    print(markdown, flush=True)
    return result


def parse_sizes(text):
    """``"10000,1e6,4_000_000"`` -> ``[10000, 1000000, 4000000]`` (argparse type)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        try:
            value = float(part) if any(c in part for c in ".eE") else int(part)
            value = int(value) if value == int(value) else 0
        except (ValueError, OverflowError):
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"--sizes takes comma-separated positive integers, got {text!r}")
        sizes.append(int(value))
    return sizes


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser):
    """Add the options of ``hybridps bench table`` to an argparse (sub)parser."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for table.json, table.md and table.png")
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES),
                        help="comma-separated numbers of keys (default: 10000,1000000,4000000)")
    parser.add_argument("--repeats", type=_positive_int, default=3,
                        help="runs per implementation and case; the best is reported (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random keys (default: 0)")


def main(args):
    """Entry point of ``hybridps bench table`` for parsed ``args``; returns the exit status."""
    run_table_bench(args.out, sizes=args.sizes, repeats=args.repeats, seed=args.seed)
    return 0
