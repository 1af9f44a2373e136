"""Each iteration's model against the ground truth, for finished evaluation runs: how good was the model, and
how much of what it could have decided did the calibrated thresholds decide?

    python benchmarks/first_model.py --runs scratch=/tmp/lsun-eval7/seed=0 "pool backbone=/tmp/lsun-eval8/seed=0" \
        --categories shirt coat --iterations 1

Reads the stored scores, thresholds and the Fashion-MNIST ground truth of runs made by
``benchmarks/evaluate.py`` (same seed: same samples and crowd answers, so only the setting differs) and
prints, per run, category and iteration: the AUC of the scores against the truth; how many negatives an
oracle threshold could decide at a delivered false omission of 0.45% (what the 95% bound on ~1,300
calibration images lets a 1% target deliver) and 0.7%; and how many the calibrated threshold decided,
with the false omission it delivered. Reads files only: no model runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pretrain import decidable  # benchmarks/ is on the path when run as a script
from sklearn.metrics import roc_auc_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=ROOT of a seed's storage root")
    ap.add_argument("--categories", nargs="+", required=True)
    ap.add_argument("--iterations", nargs="+", type=int, default=[1])
    args = ap.parse_args()
    print("| run | category | iteration | AUC | oracle negatives at 0.45% / 0.7% | calibrated: negatives | its FO |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.runs:
        name, root = spec.split("=", 1)
        base = Path(root)
        truth = pq.read_table(base / "groundtruth" / "fashion-mnist.parquet").to_pandas().set_index("uri")
        pool = pq.read_table(base / "pool" / "images.parquet", columns=["image_id", "uri"]).to_pandas()
        uri_of = pool.set_index("image_id")["uri"]
        for category in args.categories:
            for it in args.iterations:
                parts = sorted((base / "scores" / category / f"iteration={it}").glob("part-*.parquet"))
                if not parts:
                    continue
                table = pd.concat([pq.read_table(p).to_pandas() for p in parts])
                table = table[np.isfinite(table["score"])]
                y = truth.loc[uri_of.loc[table["image_id"]].to_numpy(), "class_name"].to_numpy() == category
                s = table["score"].to_numpy()
                th = json.loads((base / "calibration" / category / f"iteration={it}.json").read_text())
                neg = s <= th["negative"] if th["negative"] is not None else np.zeros(len(s), bool)
                fo = f"{y[neg].mean():.4f}" if neg.any() else "-"
                oracle = f"{decidable(s, y, fo=0.0045)[0]:,} / {decidable(s, y, fo=0.007)[0]:,}"
                auc = roc_auc_score(y, s)
                print(f"| {name} | {category} | {it} | {auc:.4f} | {oracle} | {int(neg.sum()):,} | {fo} |")


if __name__ == "__main__":
    main()
