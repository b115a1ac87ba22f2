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

All train on one process with the same batch size, the same embedding table and the same
optimizer settings (pinned here, not the config's defaults); the figure is the conversion AUC
over the held-out *clicked* rows (the rows a CVR model is meant for) and over every held-out
impression (against a conversion-if-clicked drawn from the planted probability), and for each
ESMM its click and pCTCVR AUCs over every held-out row. ``--epochs E`` trains every arm E epochs
of its own rows. ``--epochs E1,E2,...`` selects each arm's epochs as early stopping would: the
arm trains through the counts in turn (resuming its own checkpoint), is scored after each on a
validation file (``--validation-rows`` further impressions of the generator, apart from the
training and held-out rows) by its pCVR AUC over the validation file's clicked rows, and reports
its held-out figures at the count that scored best there (``{arm}_epochs``; every count's
validation and held-out pCVR AUCs in ``curves``). Each seed of ``--seeds`` draws its own planted
model and data; the report gives every seed's figures and their medians. Writes
DIR/multitask.json and prints it.
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
    parser.add_argument("--epochs", default="20",
                        help="epochs of each arm's own rows; several, comma-separated (such as "
                             "2,5,10,20,40): each arm's count chosen on a validation file")
    parser.add_argument("--validation-rows", type=int, default=100_000,
                        help="impressions of the validation file (with several --epochs only)")
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
VALIDATION_STEP = 2 << 20   # the validation rows (several --epochs): batches from this step on


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


def train_through(comm, out, name, model, features, data, rows, seed, args, epoch_counts, predict_on):
    """Train arm ``name`` through each count of ``epoch_counts`` (ascending) of its ``rows``
    rows, resuming its own checkpoint from the second on; after each, ``hybridps predict`` on
    every file of ``predict_on`` ({key: path}). Yields (epochs, steps, {key: predictions})."""
    from hybridps.config import make_config
    from hybridps.inference import predict_checkpoint
    from hybridps.models.registry import BUILTIN_MODELS
    from hybridps.trainer import Trainer
    import pyarrow.parquet as pq
    run = os.path.join(out, name)
    for k, epochs in enumerate(epoch_counts):
        steps = max(1, epochs * rows // args.batch_size)
        config = make_config(overrides={
            "model": model, "features": features, "data": data, "steps": steps,
            "batch_size": args.batch_size, "hidden": [64, 32], "seed": seed, "progress": False,
            "optimizer": OPTIMIZER, "learning_rate": args.learning_rate,
            "dense_optimizer": OPTIMIZER, "dense_learning_rate": args.learning_rate,
            "checkpoint_dir": os.path.join(run, "ckpt"), "resume": k > 0,
            "metrics_out": os.path.join(run, "metrics.json")})
        Trainer(config, comm=comm).run()
        predictions = {}
        for key, path in predict_on.items():
            scores = os.path.join(run, f"predict-{key}.parquet")
            predict_checkpoint(comm, os.path.join(run, "ckpt"), path, scores, batch_size=4096,
                               model=None if model in BUILTIN_MODELS else model)
            predictions[key] = pq.read_table(scores).to_pydict()
        yield epochs, steps, predictions


def epoch_counts_of(text):
    """The ascending epoch counts of ``--epochs`` ("20" or "2,5,10,20,40")."""
    from hybridps.errors import ConfigError
    try:
        counts = [int(part) for part in str(text).split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or counts != sorted(set(counts)):
        raise ConfigError(f"--epochs: expected one epoch count or several ascending ones such as "
                          f"2,5,10,20,40, got {text!r}")
    return counts


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
    epoch_counts = epoch_counts_of(args.epochs)
    select = len(epoch_counts) > 1
    os.makedirs(args.out, exist_ok=True)
    comm = comm_module.init(with_horovod=True)
    runs = [run_seed(comm, os.path.join(args.out, f"seed{seed}"), seed, args, epoch_counts) for seed in seeds]
    figures = [f"{prefix}_{figure}" for _, prefix, _ in ESMM_ARMS
               for figure in ("cvr_auc_clicked", "cvr_auc_every_impression", "ctr_auc", "ctcvr_auc")]
    figures += ["baseline_cvr_auc_clicked", "baseline_cvr_auc_every_impression"]
    if select:
        figures += [f"{prefix}_epochs" for _, prefix, _ in ESMM_ARMS] + ["baseline_epochs"]
    report = {
        "train_impressions": args.train_rows, "heldout_impressions": args.heldout_rows,
        "ctr": args.ctr, "conversion_own_scale": args.conversion_own_scale, "vocab_size": args.vocab_size, "epochs": epoch_counts,
        "batch_size": args.batch_size, "optimizer": OPTIMIZER, "learning_rate": args.learning_rate,
        "baseline_model": args.baseline_model, "seeds": seeds,
        "validation_impressions": args.validation_rows if select else 0,
        "median": {key: float(np.median([run[key] for run in runs])) for key in figures},
        "runs": runs,
    }
    with open(os.path.join(args.out, "multitask.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    return report


def run_seed(comm, out, seed, args, epoch_counts):
    """The three ESMM arms and the clicked-rows model on the funnel of ``seed``, each trained
    through ``epoch_counts`` (:func:`epoch_counts_of`): their figures."""
    import pyarrow.parquet as pq
    from hybridps.data.auc import roc_auc
    os.makedirs(out, exist_ok=True)
    select = len(epoch_counts) > 1
    train, heldout = os.path.join(out, "train.parquet"), os.path.join(out, "heldout.parquet")
    write_funnel(train, args.train_rows, seed, args.vocab_size, args.ctr, args.conversion_own_scale)
    planted = write_funnel(heldout, args.heldout_rows, seed, args.vocab_size, args.ctr,
                           args.conversion_own_scale, first_step=HELD_OUT_STEP)
    clicked, clicked_count = conversion_rows(train, os.path.join(out, "train-clicked.parquet"))
    esmm_files, tower_files = {"heldout": heldout}, {
        "heldout": conversion_rows(heldout, os.path.join(out, "heldout-all.parquet"), clicked_only=False)[0]}
    if select:
        validation = os.path.join(out, "validation.parquet")
        write_funnel(validation, args.validation_rows, seed, args.vocab_size, args.ctr,
                     args.conversion_own_scale, first_step=VALIDATION_STEP)
        esmm_files["validation"] = validation
        tower_files["validation"] = conversion_rows(validation, os.path.join(out, "validation-all.parquet"),
                                                    clicked_only=False)[0]
    sys.stderr.write(f"bench multitask seed {seed}: {args.train_rows} impressions, "
                     f"{clicked_count} clicked\n")
    # every held-out impression's conversion if it were clicked, drawn from the planted probability
    if_clicked = np.random.default_rng([seed, 0xC0]).random(len(planted)) < planted
    figures = {"seed": seed, "train_clicked": clicked_count, "train_conversions": int(pq_sum(train, "conversion"))}
    curves = {}

    def best_of(arm, prefix, trained, score):
        """The held-out figures of ``arm`` at its best-scoring epoch count (``score(predictions)``:
        (validation pCVR AUC over clicked rows or None, held-out figures))."""
        best, curves[arm] = None, []
        for epochs, steps, predictions in trained:
            validation_auc, heldout_figures = score(predictions)
            curves[arm].append({"epochs": epochs, "steps": steps, "validation_cvr_auc_clicked": validation_auc,
                                "cvr_auc_clicked": heldout_figures[f"{prefix}_cvr_auc_clicked"]})
            if best is None or (validation_auc is not None and validation_auc > best[0]):
                best = (validation_auc, epochs, steps, heldout_figures)
        figures.update(best[3])
        if select:
            figures[f"{prefix}_epochs"] = best[1]
        return best[2]

    def clicked_auc(predictions, p_cvr):
        """pCVR AUC over the clicked rows of one ESMM prediction file."""
        was_clicked = np.asarray(predictions["click_label"], np.float64) == 1
        conversion = np.asarray(predictions["conversion_label"], np.float64)
        return roc_auc(conversion[was_clicked], p_cvr[was_clicked])

    def esmm_p_cvr(predictions):
        if "cvr" in predictions:       # the post-click task: the pCVR tower's probability
            return np.asarray(predictions["cvr"], np.float64)
        return (np.asarray(predictions["conversion"], np.float64)
                / np.maximum(np.asarray(predictions["click"], np.float64), 1e-12))

    for arm, prefix, labels in ESMM_ARMS:
        def esmm_score(predictions, prefix=prefix):
            esmm = predictions["heldout"]
            p_cvr = esmm_p_cvr(esmm)
            validation = (clicked_auc(predictions["validation"], esmm_p_cvr(predictions["validation"]))
                          if select else None)
            return validation, {
                f"{prefix}_cvr_auc_clicked": clicked_auc(esmm, p_cvr),
                f"{prefix}_cvr_auc_every_impression": roc_auc(if_clicked, p_cvr),
                f"{prefix}_ctr_auc": roc_auc(np.asarray(esmm["click_label"], np.float64), np.asarray(esmm["click"])),
                f"{prefix}_ctcvr_auc": roc_auc(np.asarray(esmm["conversion_label"], np.float64),
                                               np.asarray(esmm["conversion"])),
            }
        figures[f"{prefix}_steps"] = best_of(arm, prefix, train_through(
            comm, out, arm, "esmm", dict(SCHEMA_FEATURES, labels=labels), train, args.train_rows,
            seed, args, epoch_counts, esmm_files), esmm_score)

    def clicks_and_conversions(path):
        table = pq.read_table(path, columns=["click", "conversion"])
        return table["click"].to_numpy() == 1, table["conversion"].to_numpy()

    heldout_clicked, conversion = clicks_and_conversions(heldout)
    if select:
        validation_clicked, validation_conversion = clicks_and_conversions(esmm_files["validation"])

    def tower_score(predictions):
        score = np.asarray(predictions["heldout"]["score"], np.float64)
        validation = None
        if select:
            validation_score = np.asarray(predictions["validation"]["score"], np.float64)
            validation = roc_auc(validation_conversion[validation_clicked],
                                 validation_score[validation_clicked])
        return validation, {"baseline_cvr_auc_clicked": roc_auc(conversion[heldout_clicked], score[heldout_clicked]),
                            "baseline_cvr_auc_every_impression": roc_auc(if_clicked, score)}
    figures["baseline_steps"] = best_of("cvr-clicked", "baseline", train_through(
        comm, out, "cvr-clicked", args.baseline_model, dict(SCHEMA_FEATURES, label="label"), clicked,
        clicked_count, seed, args, epoch_counts, tower_files), tower_score)
    figures["heldout_clicked"] = int(heldout_clicked.sum())
    if select:
        figures["curves"] = curves
    return figures


def pq_sum(path, column):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    return pc.sum(pq.read_table(path, columns=[column])[column]).as_py()
