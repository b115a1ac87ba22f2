"""``hybridps bench multitask``: ESMM, with and without a post-click conversion loss, against a
conversion model trained on clicked rows only.

The selection bias and data sparsity ESMM exists for (Ma et al. 2018): a conversion model
trained on the clicked rows only learns from a small sample (a few percent of the impressions),
while ESMM learns pCVR through pCTCVR = pCTR x pCVR over every impression, its embedding rows
shared with the click model that every impression trains. On the synthetic funnel
(hybridps.data.synthetic_schema: a click of mean rate ``--ctr``, a conversion only after a
click), written to Parquet (a training file, and a held-out file of later batches of the same
generator):

* ``esmm``: ``hybridps train --model esmm`` on every impression (tasks click, conversion);
  its pCVR of a held-out row is p_conversion / p_click of ``hybridps predict`` (the pCVR
  tower's probability);
* ``esmm-postclick``: the same ESMM with a third task ``{name: cvr, column: conversion, given:
  click}`` (hybridps.tasks): the conversion labelled on clicked rows only, which ESMM maps to its
  pCVR tower's logit, so pCVR is also supervised on the clicked rows (ESCM²'s post-click
  constraint, naive); its pCVR is ``hybridps predict``'s ``cvr`` column;
* ``esmm-postclick-ipw``: the same with ``ipw: true`` (that loss divided by the clipped,
  constant pCTR of each clicked row);
* ``cvr-clicked``: ESMM's pCVR tower alone (hybridps.models.esmm.ConversionTower: the same
  layers and initial weights) trained on the clicked rows only, the conversion as its one label
  (``--baseline-model`` names another model).

All train on one process for the same number of epochs of their own rows, with the same batch
size, the same embedding table and the same optimizer settings (pinned here, not the config's
defaults); the figure is the conversion AUC over the held-out *clicked* rows (the rows a CVR
model is meant for) and over every held-out impression (against a conversion-if-clicked drawn from
the planted probability), and for each ESMM its click and pCTCVR AUCs over every held-out row. Each
seed of ``--seeds`` draws its own planted model and data; the report gives every seed's figures
and their medians. Writes DIR/multitask.json and prints it.
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
POST_CLICK = {"name": "cvr", "column": "conversion", "given": "click"}
ESMM_ARMS = (("esmm", "esmm", FUNNEL_LABELS),               # (run directory, figures' prefix, tasks)
             ("esmm-postclick", "postclick", FUNNEL_LABELS + [POST_CLICK]),
             ("esmm-postclick-ipw", "postclick_ipw", FUNNEL_LABELS + [dict(POST_CLICK, ipw=True)]))
BASELINE_MODEL = "hybridps.models.esmm:build_conversion_tower"
OPTIMIZER = "adagrad"       # both models, sparse and dense (pinned: the defaults may change)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--heldout-rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=2000, help="ids per field")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated data and model seeds (one run of both models each)")
    parser.add_argument("--ctr", type=float, default=0.04,
                        help="the synthetic funnel's mean click rate (the generator's target_ctr)")
    parser.add_argument("--conversion-own-scale", type=float, default=1.0,
                        help="weight of the conversion's own planted term next to the click's "
                             "(hybridps.data.synthetic_schema; smaller: more shared signal)")
    parser.add_argument("--learning-rate", type=float, default=0.2,
                        help="adagrad learning rate of the embeddings and the dense layers, both models")
    parser.add_argument("--baseline-model", default=BASELINE_MODEL,
                        help="the conversion model trained on clicked rows (default: ESMM's pCVR "
                             "tower alone)")


HELD_OUT_STEP = 1 << 20     # the held-out rows: the generator's batches from this step on


def write_funnel(path, rows, seed, vocab_size, ctr, own_scale=1.0, first_step=0, batch=8192):
    """``rows`` rows of the synthetic funnel (one planted model per seed, mean click rate
    ``ctr``) as Parquet (click, conversion, I*, C*): the generator's batches of ``batch`` rows
    from ``first_step`` on. Returns the planted probability that each row converts if clicked
    (clicked or not)."""
    import pyarrow.parquet as pq
    from hybridps.bench.parquet_data import arrow_table, workload_columns
    from hybridps.config import make_config
    from hybridps.data.synthetic_schema import SchemaSynthetic
    from hybridps.schema import build_schema
    config = make_config(overrides={"features": dict(SCHEMA_FEATURES, labels=FUNNEL_LABELS),
                                    "seed": seed, "vocab_size": vocab_size})
    schema = build_schema(config)
    source = SchemaSynthetic(schema, vocab_size=vocab_size, zipf_a=config.zipf_a, seed=seed,
                             target_ctr=ctr, conversion_own_scale=own_scale)
    writer, planted = None, []
    for k in range(-(-rows // batch)):
        size = min(batch, rows - k * batch)
        table = arrow_table(workload_columns(schema, source.raw_batch(first_step + k, size)))
        planted.append(source.conversion_probabilities(source.batch(first_step + k, size)))
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return np.concatenate(planted)


def conversion_rows(path, out, clicked_only=True):
    """The rows of ``path`` (with a click only, by default), the conversion as ``label``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if clicked_only:
        table = table.filter(pc.equal(table["click"], 1.0))
    label = pc.cast(table["conversion"], "int64")
    table = table.select([c for c in table.column_names if c not in ("click", "conversion")])
    table = table.append_column("label", label)
    pq.write_table(table, out)
    return out, table.num_rows


def train_and_predict(comm, out, name, model, features, data, heldout, rows, seed, args):
    from hybridps.config import make_config
    from hybridps.inference import predict_checkpoint
    from hybridps.models.registry import BUILTIN_MODELS
    from hybridps.trainer import Trainer
    import pyarrow.parquet as pq
    run = os.path.join(out, name)
    steps = max(1, args.epochs * rows // args.batch_size)
    config = make_config(overrides={
        "model": model, "features": features, "data": data, "steps": steps,
        "batch_size": args.batch_size, "hidden": [64, 32], "seed": seed, "progress": False,
        "optimizer": OPTIMIZER, "learning_rate": args.learning_rate,
        "dense_optimizer": OPTIMIZER, "dense_learning_rate": args.learning_rate,
        "checkpoint_dir": os.path.join(run, "ckpt"), "metrics_out": os.path.join(run, "metrics.json")})
    Trainer(config, comm=comm).run()
    predict_checkpoint(comm, os.path.join(run, "ckpt"), heldout, os.path.join(run, "predict.parquet"),
                       batch_size=4096, model=None if model in BUILTIN_MODELS else model)
    return pq.read_table(os.path.join(run, "predict.parquet")).to_pydict(), steps


def main(args):
    run_multitask_bench(args)


def run_multitask_bench(args):
    """Every arm per seed and their figures (module docstring); returns the report."""
    from hybridps import comm as comm_module
    from hybridps.errors import ConfigError
    try:
        seeds = [int(seed) for seed in str(args.seeds).split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers such as 0,1,2, got "
                          f"{args.seeds!r}") from None
    if not 0 < args.ctr < 1:
        raise ConfigError(f"--ctr: expected a click rate in (0, 1), got {args.ctr}")
    os.makedirs(args.out, exist_ok=True)
    comm = comm_module.init(with_horovod=True)
    runs = [run_seed(comm, os.path.join(args.out, f"seed{seed}"), seed, args) for seed in seeds]
    figures = [f"{prefix}_{figure}" for _, prefix, _ in ESMM_ARMS
               for figure in ("cvr_auc_clicked", "cvr_auc_every_impression", "ctr_auc", "ctcvr_auc")]
    figures += ["baseline_cvr_auc_clicked", "baseline_cvr_auc_every_impression"]
    report = {
        "train_impressions": args.train_rows, "heldout_impressions": args.heldout_rows,
        "ctr": args.ctr, "conversion_own_scale": args.conversion_own_scale, "vocab_size": args.vocab_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "optimizer": OPTIMIZER, "learning_rate": args.learning_rate,
        "baseline_model": args.baseline_model, "seeds": seeds,
        "median": {key: float(np.median([run[key] for run in runs])) for key in figures},
        "runs": runs,
    }
    with open(os.path.join(args.out, "multitask.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    return report


def run_seed(comm, out, seed, args):
    """The three ESMM arms and the clicked-rows model on the funnel of ``seed``: their figures."""
    from hybridps.data.auc import roc_auc
    os.makedirs(out, exist_ok=True)
    train, heldout = os.path.join(out, "train.parquet"), os.path.join(out, "heldout.parquet")
    write_funnel(train, args.train_rows, seed, args.vocab_size, args.ctr, args.conversion_own_scale)
    planted = write_funnel(heldout, args.heldout_rows, seed, args.vocab_size, args.ctr,
                           args.conversion_own_scale, first_step=HELD_OUT_STEP)
    clicked, clicked_count = conversion_rows(train, os.path.join(out, "train-clicked.parquet"))
    heldout_labelled, _ = conversion_rows(heldout, os.path.join(out, "heldout-all.parquet"),
                                          clicked_only=False)
    sys.stderr.write(f"bench multitask seed {seed}: {args.train_rows} impressions, "
                     f"{clicked_count} clicked\n")
    # every held-out impression's conversion if it were clicked, drawn from the planted probability
    if_clicked = np.random.default_rng([seed, 0xC0]).random(len(planted)) < planted
    figures = {"seed": seed, "train_clicked": clicked_count, "train_conversions": int(pq_sum(train, "conversion"))}
    for arm, prefix, labels in ESMM_ARMS:
        esmm, figures["esmm_steps"] = train_and_predict(comm, out, arm, "esmm",
                                                        dict(SCHEMA_FEATURES, labels=labels), train,
                                                        heldout, args.train_rows, seed, args)
        click = np.asarray(esmm["click_label"], np.float64)
        conversion = np.asarray(esmm["conversion_label"], np.float64)
        if "cvr" in esmm:       # the post-click task: the pCVR tower's probability
            p_cvr = np.asarray(esmm["cvr"], np.float64)
        else:
            p_cvr = (np.asarray(esmm["conversion"], np.float64)
                     / np.maximum(np.asarray(esmm["click"], np.float64), 1e-12))
        was_clicked = click == 1
        figures.update({
            f"{prefix}_cvr_auc_clicked": roc_auc(conversion[was_clicked], p_cvr[was_clicked]),
            f"{prefix}_cvr_auc_every_impression": roc_auc(if_clicked, p_cvr),
            f"{prefix}_ctr_auc": roc_auc(click, np.asarray(esmm["click"])),
            f"{prefix}_ctcvr_auc": roc_auc(conversion, np.asarray(esmm["conversion"])),
        })
    baseline, figures["baseline_steps"] = train_and_predict(comm, out, "cvr-clicked", args.baseline_model,
                                                            dict(SCHEMA_FEATURES, label="label"), clicked,
                                                            heldout_labelled, clicked_count, seed, args)
    baseline_cvr = np.asarray(baseline["score"], np.float64)
    figures.update({
        "heldout_clicked": int(was_clicked.sum()),
        "baseline_cvr_auc_clicked": roc_auc(conversion[was_clicked], baseline_cvr[was_clicked]),
        "baseline_cvr_auc_every_impression": roc_auc(if_clicked, baseline_cvr),
    })
    return figures


def pq_sum(path, column):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    return pc.sum(pq.read_table(path, columns=[column])[column]).as_py()
