"""CSV files of two public CTR datasets, for the optimizer comparisons of docs/benchmarks.md.

Neither dataset is shipped with hybridps (their terms forbid redistribution); get them from a
public copy and point this script at them:

* MovieLens 100k (GroupLens, ``ml-100k/``: u.data, u.user, u.item): one row per rating, label
  ``rating >= 4``; columns user, movie, age (decade), gender, occupation, zip (first 3 digits),
  year (release year), genre (the first listed), and history: the movies the user rated >= 4
  before this rating, most recent first (``|``-separated, at most 20).
* Frappe (Baltrunas et al. 2015, app usage in context, as the libFM files of the NFM paper's
  repository: frappe.validation.libfm and frappe.test.libfm; label 1 / -1, two sampled
  negatives per positive): columns f0..f9, the ten context fields (user, item, daytime,
  weekday, isweekend, homework, cost, weather, country, city) as their libFM indices.

Rows are shuffled (seeded) and split 80/20 into NAME_train.csv and NAME_test.csv.
``python examples/public_ctr/make_csv.py ml100k ML100K_DIR OUT_DIR``,
``python examples/public_ctr/make_csv.py frappe FRAPPE_DIR OUT_DIR``.
"""
import csv
import os
import sys

import numpy as np

TEST_FRACTION = 0.2
HISTORY_LEN = 20


def movielens_rows(src):
    users = {}
    with open(os.path.join(src, "u.user"), encoding="latin-1") as fh:
        for line in fh:
            uid, age, gender, occupation, zipcode = line.rstrip("\n").split("|")
            users[uid] = (str(int(age) // 10), gender, occupation, zipcode[:3])
    movies = {}
    with open(os.path.join(src, "u.item"), encoding="latin-1") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("|")
            genres = [i for i, flag in enumerate(parts[5:]) if flag == "1"]
            movies[parts[0]] = (parts[2][-4:] or "unknown", str(genres[0] if genres else -1))
    ratings = []
    with open(os.path.join(src, "u.data")) as fh:
        for line in fh:
            uid, mid, rating, ts = line.split()
            ratings.append((int(ts), uid, mid, int(rating)))
    ratings.sort()
    liked = {}
    header = ["label", "user", "movie", "age", "gender", "occupation", "zip", "year", "genre", "history"]
    rows = []
    for ts, uid, mid, rating in ratings:
        history = liked.setdefault(uid, [])
        rows.append([int(rating >= 4), uid, mid, *users[uid], *movies[mid], "|".join(history[:HISTORY_LEN])])
        if rating >= 4:
            history.insert(0, mid)
    return header, rows


def frappe_rows(src):
    header = ["label"] + [f"f{i}" for i in range(10)]
    rows = []
    for name in ("frappe.validation.libfm", "frappe.test.libfm"):
        with open(os.path.join(src, name)) as fh:
            for line in fh:
                parts = line.split()
                rows.append([int(float(parts[0]) > 0)] + [p.split(":")[0] for p in parts[1:]])
    return header, rows


def main(kind, src, out_dir, seed=0):
    header, rows = {"ml100k": movielens_rows, "frappe": frappe_rows}[kind](src)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(len(rows) * TEST_FRACTION)
    os.makedirs(out_dir, exist_ok=True)
    for part, idx in (("test", order[:n_test]), ("train", order[n_test:])):
        with open(os.path.join(out_dir, f"{kind}_{part}.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows[i] for i in idx)
    print(f"{kind}: {len(rows) - n_test} train rows, {n_test} test rows in {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
