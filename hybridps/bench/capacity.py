"""``hybridps bench capacity``: how many rows fit per GiB, and how training holds up as tables grow.

What lives here: two measurements, written to ``capacity.json`` / ``capacity.md``:

* ``table``: one EmbeddingHashTable (dim 16, Adagrad by default) filled to ``rows`` distinct
  keys the way training fills it (lookup_or_insert, then an update of every row), in batches;
  the bytes it holds per row, resident (the process's RSS growth) and allocated (its
  ``memory_bytes``), against the payload a row needs: the 8-byte key, the value and the
  optimizer slots (4 bytes per float) and the metadata the table keeps per row (last-update
  step 8, update count 8, hit count 4 bytes). Also the peak RSS growth while it filled.
* ``train``: 2 ranks of ``hybridps train`` on synthetic data whose ids are spread over a large
  vocabulary (a flat Zipf law) until the tables hold ``train_rows`` distinct keys over both
  ranks: rows reached, bytes per row (the peak RSS of the ranks over their RSS at the start),
  peak RSS per rank, and samples/s at the start and at the end (the median of the first and
  of the last three intervals of ``log_every`` steps).

What does not: the table itself (cython/hashtable.pyx), the trainer.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from hybridps.bench.report import bench_environment, markdown_table, write_json
from hybridps.bench.train import OVERSUBSCRIBE_ENV

TARGETS = {"table_resident_vs_payload": 1.3}


def payload_bytes(dim, optimizer_slots):
    """What a row needs: key, value and optimizer slots (float32), last-update step, update
    count and hit count."""
    return 8 + 4 * dim * (1 + optimizer_slots) + 8 + 8 + 4


def measure_table(rows=10_000_000, dim=16, optimizer="adagrad", batch=200_000, seed=0):
    """Fill one table to ``rows`` distinct keys; its bytes per row (see the module docstring)."""
    import psutil
    from hybridps._hashtable import EmbeddingHashTable
    process = psutil.Process()
    table = EmbeddingHashTable(dim=dim, optimizer=optimizer, learning_rate=0.05)
    rng = np.random.default_rng(seed)
    grads = np.full((batch, dim), 0.01, np.float32)
    start_rss = process.memory_info().rss
    peak = start_rss
    started = time.perf_counter()
    step = 0
    while table.size < rows:
        keys = np.unique(rng.integers(1, 2 ** 62, size=batch, dtype=np.int64))[:rows - table.size]
        table.lookup_or_insert(keys)
        table.apply_gradients(keys, grads[:len(keys)], step=step)
        peak = max(peak, process.memory_info().rss)
        step += 1
    seconds = time.perf_counter() - started
    resident = process.memory_info().rss - start_rss
    slots = len(table.optimizer_slot_names)
    payload = payload_bytes(dim, slots)
    return {"rows": int(table.size), "dim": dim, "optimizer": optimizer,
            "payload_bytes_per_row": payload,
            "resident_bytes_per_row": resident / table.size,
            "allocated_bytes_per_row": table.memory_bytes / table.size,
            "peak_resident_bytes_per_row": (peak - start_rss) / table.size,
            "table_resident_vs_payload": resident / table.size / payload,
            "table_allocated_vs_payload": table.memory_bytes / table.size / payload,
            "hash_slots": int(table.capacity), "load": table.size / table.capacity,
            "fill_seconds": seconds, "rows_per_s_fill": table.size / seconds}


def run_train_capacity(out_dir, train_rows=50_000_000, vocab_size=4_000_000, zipf_a=0.3,
                       batch_size=4096, dim=16, log_every=20, timeout=3600):
    """2 ranks until about ``train_rows`` distinct keys; returns the measurement dict."""
    # distinct keys after n draws per field from a flat Zipf law over V ids: sum_k 1 - (1 - p_k)^n
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -zipf_a
    p /= p.sum()
    fields, ranks = 26, 2

    def distinct(steps):
        draws = steps * batch_size * ranks
        return fields * float(np.sum(-np.expm1(draws * np.log1p(-p))))

    if distinct(10 ** 6) < train_rows:
        raise SystemExit(f"bench capacity: {fields} fields of {vocab_size:,} ids cannot reach "
                         f"{train_rows:,} distinct keys; raise --vocab-size")
    low, high = 1, 1
    train_rows = int(train_rows * 1.005)               # the estimate is a mean: aim above it
    while distinct(high) < train_rows:
        high *= 2
    while low < high:                               # the fewest steps that reach train_rows
        mid = (low + high) // 2
        low, high = (mid + 1, high) if distinct(mid) < train_rows else (low, mid)
    steps = low
    metrics = os.path.join(out_dir, "capacity-train.json")
    command = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", sys.executable,
               "-m", "hybridps.cli", "train", "--model", "deepfm", "--data", "synthetic",
               "--steps", str(steps), "--batch-size", str(batch_size), "--dim", str(dim),
               "--vocab-size", str(vocab_size), "--zipf-a", str(zipf_a), "--optimizer", "adagrad",
               "--warmup-steps", "5", "--log-every", str(log_every), "--no-progress",
               "--metrics-out", metrics]
    sys.stderr.write(f"bench capacity: {steps} steps of {ranks} x {batch_size} samples "
                     f"(expected {distinct(steps):,.0f} distinct keys) ...\n")
    started = time.perf_counter()
    proc = subprocess.run(command, env=dict(os.environ, **OVERSUBSCRIBE_ENV), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench capacity: training failed:\n{proc.stderr[-3000:]}")
    with open(metrics) as fh:
        summary = json.load(fh)
    rows = int(sum(summary["table_rows"]))
    intervals = summary.get("samples_per_s_by_interval") or []
    per_rank_start = summary.get("start_rss_mb_per_rank") or []
    per_rank_peak = summary.get("peak_rss_mb_per_rank") or [summary["peak_rss_mb"]]
    grown = sum(p - s for p, s in zip(per_rank_peak, per_rank_start)) if per_rank_start else None
    return {"steps": steps, "ranks": ranks, "batch_size_per_rank": batch_size, "dim": dim,
            "vocab_size": vocab_size, "zipf_a": zipf_a, "rows": rows,
            "bytes_per_row": grown * 2 ** 20 / rows if grown is not None else None,
            "peak_rss_mb_per_rank": per_rank_peak, "start_rss_mb_per_rank": per_rank_start,
            # the median of the first and of the last three intervals (one interval alone may
            # hold a table growth or the run's end)
            "samples_per_s_start": float(np.median([r for _, r in intervals[:3]])) if intervals else None,
            "samples_per_s_end": float(np.median([r for _, r in intervals[-3:]])) if intervals else None,
            "samples_per_s_by_interval": intervals, "samples_per_s": summary["samples_per_s"],
            "seconds": time.perf_counter() - started}


def run_capacity_bench(out_dir, table_rows=10_000_000, train_rows=50_000_000, vocab_size=4_000_000,
                       zipf_a=0.3, batch_size=4096, skip_train=False):
    os.makedirs(out_dir, exist_ok=True)
    report = {"table": measure_table(table_rows), "targets": TARGETS, "machine": bench_environment()}
    if not skip_train:
        report["train"] = run_train_capacity(out_dir, train_rows, vocab_size, zipf_a, batch_size)
    write_json(os.path.join(out_dir, "capacity.json"), report)
    t = report["table"]
    rows = [{"figure": "table rows", "value": f"{t['rows']:,}"},
            {"figure": "payload bytes per row", "value": f"{t['payload_bytes_per_row']}"},
            {"figure": "resident bytes per row", "value": f"{t['resident_bytes_per_row']:.1f} "
                                                          f"({t['table_resident_vs_payload']:.2f}x payload, "
                                                          f"target <= {TARGETS['table_resident_vs_payload']})"},
            {"figure": "allocated bytes per row", "value": f"{t['allocated_bytes_per_row']:.1f} "
                                                           f"({t['table_allocated_vs_payload']:.2f}x payload)"},
            {"figure": "peak resident bytes per row while filling",
             "value": f"{t['peak_resident_bytes_per_row']:.1f}"}]
    if "train" in report:
        r = report["train"]
        rows += [{"figure": "training: rows over 2 ranks", "value": f"{r['rows']:,}"},
                 {"figure": "training: bytes per row (RSS growth)",
                  "value": f"{r['bytes_per_row']:.1f}" if r["bytes_per_row"] else "-"},
                 {"figure": "training: peak RSS per rank (MB)",
                  "value": ", ".join(f"{x:,.0f}" for x in r["peak_rss_mb_per_rank"])},
                 {"figure": "training: samples/s at the start / at the end (median of 3 intervals)",
                  "value": f"{r['samples_per_s_start']:,.0f} / {r['samples_per_s_end']:,.0f}"
                  if r["samples_per_s_start"] else "-"}]
    table = markdown_table(rows, [("figure", "figure", ""), ("value", "value", "")])
    with open(os.path.join(out_dir, "capacity.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return report


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for capacity.json/.md")
    parser.add_argument("--table-rows", type=int, default=10_000_000)
    parser.add_argument("--train-rows", type=int, default=50_000_000,
                        help="distinct keys over both ranks the training run reaches")
    parser.add_argument("--vocab-size", type=int, default=4_000_000, help="ids per field (26 fields)")
    parser.add_argument("--zipf-a", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--skip-train", action="store_true", help="the table measurement only")


def main(args):
    run_capacity_bench(args.out, args.table_rows, args.train_rows, args.vocab_size, args.zipf_a,
                       args.batch_size, args.skip_train)
    return 0
