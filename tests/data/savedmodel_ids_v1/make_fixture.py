"""Writes tests/data/savedmodel_ids_v1: a checkpoint of a small schema, its SavedModel exported
by this hybridps (serving_default on int64 ids), and rows with that SavedModel's answers."""
import json
import os
import sys

import numpy as np
import tensorflow as tf

from hybridps.checkpoint.writer import save_checkpoint
from hybridps.config import make_config
from hybridps.data.hashing import space_keys, text_ids
from hybridps.export import export_saved_model
from hybridps.models import build_model
from hybridps.schema import build_schema
from hybridps.serving.inputs import serving_inputs
from hybridps.sparse.shard import OwnerShard
from hybridps.step import build_on_sample
from tests.export_reference import TWO_TASK_SCHEMA, raw_rows

out = sys.argv[1]
features = json.loads(json.dumps(TWO_TASK_SCHEMA))
for feature in features["sparse"]:
    feature.pop("dtype", None)                 # this hybridps has no dtype key
config = make_config(overrides={"features": features, "model": "wide_deep", "hidden": [8],
                                "num_buckets": 8, "init_std": 0.5, "seed": 3})
schema = build_schema(config)
tf.keras.utils.set_random_seed(3)
model = build_on_sample(tf, build_model(config.model, schema, config), schema)
rng = np.random.default_rng(1)
for variable in model.variables:              # away from the initial weights
    variable.assign(variable + rng.normal(0, 0.3, variable.shape).astype(np.float32))
shard = OwnerShard(schema, seed=0)
columns = raw_rows(40, seed=5)
for feature in schema.sparse:
    cells = columns[feature.name]
    values = [v for c in cells for v in c] if feature.is_list else cells
    keys = space_keys(feature.key_space, text_ids(values))
    shard.tables[schema.table_index(feature.table)].lookup_or_insert(np.unique(keys)[3:], step=0)
save_checkpoint(os.path.join(out, "ckpt"), 1, tables=shard.tables, config=config, model=model)
export_saved_model(os.path.join(out, "ckpt"), os.path.join(out, "savedmodel"))
loaded = tf.saved_model.load(os.path.join(out, "savedmodel"))
inputs = serving_inputs(schema, columns, 40)
answer = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
with open(os.path.join(out, "rows.json"), "w") as fh:
    json.dump({"columns": columns, "probability": answer["probability"].numpy().tolist(),
               "logit": answer["logit"].numpy().tolist()}, fh, indent=1)
print("tables", [t.size for t in shard.tables], "written to", out)
