"""``hybridps bench multitask``: ESMM against a conversion model trained on clicked rows only.

The selection bias ESMM exists for (Ma et al. 2018): a conversion model trained on the clicked
rows only learns from a small, biased sample, while ESMM learns pCVR through pCTCVR = pCTR x
pCVR over every impression. On the synthetic funnel (hybridps.data.synthetic_schema: a click,
a conversion only after a click), written to Parquet (a training file, and a held-out file of
later batches of the same generator):

* ``esmm``: ``hybridps train --model esmm`` on every impression (tasks click, conversion);
  its pCVR of a held-out row is p_conversion / p_click of ``hybridps predict``;
* ``cvr-clicked``: the same towers' model family trained on the clicked rows only, the
  conversion as its one label (``--model`` of ``--baseline-model``, default wide_deep, which is
  an MLP over the same inputs plus a linear part).

Both train on one process for the same number of epochs of their own rows, with the same
settings; the figure is the conversion AUC over the held-out *clicked* rows (the rows a CVR
model is meant for), and for ESMM also over every held-out row. Writes DIR/multitask.json and
prints it.
"""
import json
import os
import sys

import numpy as np

SCHEMA_FEATURES = {
    "dense": [{"name": f"I{i + 1}"} for i in range(4)],
    "sparse": [{"name": f"C{i + 1}", "table": "fields", "key_space": f"C{i + 1}"} for i in range(8)],
    "tables": {"fields": {"dim": 8}},
}
FUNNEL_LABELS = [{"name": "click"}, {"name": "conversion"}]


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--heldout-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=2000, help="ids per field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-model", default="wide_deep",
                        help="the built-in model of the conversion model on clicked rows")


HELD_OUT_STEP = 1 << 20     # the held-out rows: the generator's batches from this step on


def write_funnel(path, rows, seed, vocab_size, first_step=0, batch=8192):
    """``rows`` rows of the synthetic funnel (one planted model per seed) as Parquet (click,
    conversion, I*, C*): the generator's batches of ``batch`` rows from ``first_step`` on."""
    import pyarrow.parquet as pq
    from hybridps.bench.parquet_data import arrow_table, workload_columns
    from hybridps.config import make_config
    from hybridps.data.synthetic_schema import make_schema_synthetic
    from hybridps.schema import build_schema
    config = make_config(overrides={"features": dict(SCHEMA_FEATURES, labels=FUNNEL_LABELS),
                                    "seed": seed, "vocab_size": vocab_size})
    schema = build_schema(config)
    source = make_schema_synthetic(schema, config, 0, 1)
    writer = None
    for k in range(-(-rows // batch)):
        table = arrow_table(workload_columns(schema, source.raw_batch(first_step + k,
                                                                      min(batch, rows - k * batch))))
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def clicked_rows(path, out):
    """The rows of ``path`` with a click, the conversion as ``label``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    table = table.filter(pc.equal(table["click"], 1.0))
    label = pc.cast(table["conversion"], "int64")
    table = table.select([c for c in table.column_names if c not in ("click", "conversion")])
    table = table.append_column("label", label)
    pq.write_table(table, out)
    return out, table.num_rows


def train_and_predict(comm, out, name, model, features, data, heldout, rows, args):
    from hybridps.config import make_config
    from hybridps.inference import predict_checkpoint
    from hybridps.trainer import Trainer
    import pyarrow.parquet as pq
    run = os.path.join(out, name)
    steps = max(1, args.epochs * rows // args.batch_size)
    config = make_config(overrides={
        "model": model, "features": features, "data": data, "steps": steps,
        "batch_size": args.batch_size, "hidden": [64, 32], "seed": args.seed, "progress": False,
        "checkpoint_dir": os.path.join(run, "ckpt"), "metrics_out": os.path.join(run, "metrics.json")})
    Trainer(config, comm=comm).run()
    predict_checkpoint(comm, os.path.join(run, "ckpt"), heldout, os.path.join(run, "predict.parquet"),
                       batch_size=4096)
    return pq.read_table(os.path.join(run, "predict.parquet")).to_pydict(), steps


def main(args):
    run_multitask_bench(args)


def run_multitask_bench(args):
    """Both runs and their figures (module docstring); returns the report."""
    from hybridps import comm as comm_module
    from hybridps.data.auc import roc_auc
    os.makedirs(args.out, exist_ok=True)
    comm = comm_module.init(with_horovod=True)
    train = write_funnel(os.path.join(args.out, "train.parquet"), args.train_rows, args.seed, args.vocab_size)
    heldout = write_funnel(os.path.join(args.out, "heldout.parquet"), args.heldout_rows, args.seed,
                           args.vocab_size, first_step=HELD_OUT_STEP)
    clicked, clicked_count = clicked_rows(train, os.path.join(args.out, "train-clicked.parquet"))
    heldout_clicked, _ = clicked_rows(heldout, os.path.join(args.out, "heldout-clicked.parquet"))
    sys.stderr.write(f"bench multitask: {args.train_rows} impressions, {clicked_count} clicked\n")
    esmm, esmm_steps = train_and_predict(comm, args.out, "esmm", "esmm",
                                         dict(SCHEMA_FEATURES, labels=FUNNEL_LABELS), train, heldout,
                                         args.train_rows, args)
    baseline, baseline_steps = train_and_predict(comm, args.out, "cvr-clicked", args.baseline_model,
                                                 dict(SCHEMA_FEATURES, label="label"), clicked,
                                                 heldout_clicked, clicked_count, args)
    click = np.asarray(esmm["click_label"], np.float64)
    conversion = np.asarray(esmm["conversion_label"], np.float64)
    p_cvr = np.asarray(esmm["conversion"]) / np.maximum(np.asarray(esmm["click"]), 1e-12)
    was_clicked = click == 1
    report = {
        "train_impressions": args.train_rows, "train_clicked": clicked_count,
        "heldout_impressions": args.heldout_rows, "heldout_clicked": int(was_clicked.sum()),
        "epochs": args.epochs, "batch_size": args.batch_size, "baseline_model": args.baseline_model,
        "esmm_steps": esmm_steps, "baseline_steps": baseline_steps,
        "esmm_cvr_auc_clicked": roc_auc(conversion[was_clicked], p_cvr[was_clicked]),
        "baseline_cvr_auc_clicked": roc_auc(np.asarray(baseline["label"]), np.asarray(baseline["score"])),
        "esmm_ctr_auc": roc_auc(click, np.asarray(esmm["click"])),
        "esmm_ctcvr_auc": roc_auc(conversion, np.asarray(esmm["conversion"])),
    }
    with open(os.path.join(args.out, "multitask.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    return report
