#!/usr/bin/env bash
# Test AUC of the same model, data, epochs and learning rates trained by plain Keras (the bench's
# TF baseline, hybridps.bench.train_worker tf-baseline: a hashed Keras Embedding, Keras's optimizer
# on every variable) and by hybridps (lazy Adam, catch-up Adam, Adagrad; dense optimizer choices).
#   examples/public_ctr/compare.sh DATA_DIR OUT_DIR [CASE...]
# DATA_DIR holds the CSVs of make_csv.py. One process per case, one after the other; each writes
# OUT_DIR/<dataset>-<case>.json (the metrics, test AUC under "eval"). EPOCHS (2), SEED (0) and
# DATASETS (ml100k frappe) from the environment. Cases (default all): keras-adam keras-adagrad lazy-adam catch-up-adam
# adagrad adagrad-dense-adam adagrad-dense-adam-lr0.1 din-adagrad din-adagrad-dense-adam din-adam.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=$1; OUT=$2; shift 2
mkdir -p "$OUT"
EPOCHS=${EPOCHS:-2}; SEED=${SEED:-0}
CASES=${*:-keras-adam keras-adagrad lazy-adam catch-up-adam adagrad adagrad-dense-adam \
adagrad-dense-adam-lr0.1 din-adagrad din-adagrad-dense-adam din-adam}
PY=${PYTHON:-python}
for dataset in ${DATASETS:-ml100k frappe}; do
  train=$DATA/${dataset}_train.csv; test=$DATA/${dataset}_test.csv
  rows=$(($(wc -l < "$train") - 1)); steps=$((EPOCHS * (rows / 256)))
  fields=$(grep -c "table: all" "examples/public_ctr/$dataset.yaml")
  for case in $CASES; do
    out=$OUT/$dataset-$case.json
    [ -s "$out" ] && continue
    config=examples/public_ctr/$dataset.yaml
    case $case in
      keras-adam|keras-adagrad)
        opt=${case#keras-}; lr=$([ "$opt" = adam ] && echo 0.001 || echo 0.05)
        $PY -m hybridps.bench.train_worker tf-baseline "$out" --config "$config" --data "$train" \
          --eval-data "$test" --steps "$steps" --warmup-steps 1 --batch-size 256 --dim 16 \
          --num-fields "$fields" --num-dense 0 --num-buckets 262144 --optimizer "$opt" \
          --learning-rate "$lr" --seed "$SEED"
        continue;;
      din-*)
        [ "$dataset" = ml100k ] || continue
        config=examples/public_ctr/ml100k_din.yaml;;
    esac
    case ${case#din-} in
      lazy-adam|adam) flags="--optimizer adam --learning-rate 0.001 --dense-optimizer adam --dense-learning-rate 0.001";;
      catch-up-adam) flags="--optimizer adam --learning-rate 0.001 --dense-optimizer adam --dense-learning-rate 0.001 --adam-catch-up";;
      adagrad) flags="--optimizer adagrad --learning-rate 0.05 --dense-optimizer adagrad --dense-learning-rate 0.05";;
      adagrad-dense-adam) flags="--optimizer adagrad --learning-rate 0.05 --dense-optimizer adam --dense-learning-rate 0.001";;
      adagrad-dense-adam-lr0.1) flags="--optimizer adagrad --learning-rate 0.1 --dense-optimizer adam --dense-learning-rate 0.001";;
      *) echo "unknown case $case" >&2; exit 2;;
    esac
    # shellcheck disable=SC2086
    $PY -m hybridps.cli train --config "$config" --data "$train" --eval-data "$test" \
      --steps "$steps" --seed "$SEED" --no-progress --metrics-out "$out" $flags > /dev/null
  done
done
$PY - "$OUT" <<'PYEOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    with open(path) as fh:
        m = json.load(fh)
    ev = m["eval"][-1] if isinstance(m.get("eval"), list) else m.get("eval")
    print(f"{os.path.basename(path)[:-5]:40s} test AUC {ev['auc']:.4f}  logloss {ev['logloss']:.4f}")
PYEOF
