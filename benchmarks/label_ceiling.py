"""How much of a category could one model decide if it learned from more labels? The cascade's ceiling.

    python benchmarks/label_ceiling.py --category shirt --runs 2500:500 10000:1500

Every image a model cannot decide is labeled by people in the end, so what the best model a run can afford
decides bounds what people label. Per ``N:STEPS`` this trains the harness's model (``small_convnet`` at 32 px;
``--arch`` and ``--image-size`` choose another) on ``N`` random Fashion-MNIST images with their *true* labels
for ``STEPS`` steps, scores the other images, and prints its AUC and what *oracle* thresholds (chosen on the
ground truth, no calibration sample and no bound) could decide: the largest lowest-scored set whose share of
positives is <= 0.45% (what a 1% false-omission target delivers under the cascade's bound,
``benchmarks/guarantee.py``) and the largest highest-scored set that is >= 97% positive. People would label
the ``N`` training images, a first calibration sample (3,000) and every undecided image: the last column, as a
share of the 70,000-image pool. That is optimistic for the cascade (true labels, oracle thresholds, one model
for the whole pool), so it is a floor on the share people label with this model. No Prefect or Dask: the
library alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from one_iteration import resized  # benchmarks/ is on the path when run as a script
from pretrain import decidable
from sklearn.metrics import roc_auc_score

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.fashion_mnist import CLASSES, load_arrays

CALIBRATION = 3000  # the cascade's first calibration sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="shirt", choices=CLASSES)
    ap.add_argument("--runs", nargs="+", default=["2500:500", "10000:1500"], help="N:STEPS, training images:steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="small_convnet", help="the model (a ModelParams.arch), small_convnet by default")
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    arrays = load_arrays()
    images = resized(np.concatenate([a[1] for a in arrays]), args.image_size)
    truth = np.concatenate([a[2] for a in arrays]) == CLASSES.index(args.category)
    order = np.random.default_rng(args.seed).permutation(len(images))
    print(
        "| category | model | training labels | steps | AUC | oracle negatives | oracle positives | undecided |"
        " people label (share of pool) | train + score s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        n, steps = (int(v) for v in run.split(":"))
        train, rest = order[:n], order[n:]
        params = ModelParams(arch=args.arch, image_size=args.image_size, epochs=10_000, max_steps=steps, threads=2)
        started = time.time()
        net = model_lib.train(images[train], truth[train].astype(np.float32), params, seed=args.seed)
        scores = model_lib.predict(net, images[rest])
        took = time.time() - started
        neg, pos = decidable(scores, truth[rest], fo=0.0045, precision=0.97)
        undecided = len(rest) - neg - pos
        share = (n + CALIBRATION + undecided) / len(images)
        auc = roc_auc_score(truth[rest], scores)
        print(
            f"| {args.category} | {args.arch} @ {args.image_size} px | {n:,} | {steps:,} | {auc:.4f} | {neg:,} |"
            f" {pos:,} | {undecided:,} | {share:.1%} | {took:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
