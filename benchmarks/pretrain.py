"""Does a backbone learned from the unlabeled pool help the first model? Rotation pretraining against scratch.

    python benchmarks/pretrain.py --categories pullover shirt
    python benchmarks/pretrain.py --categories shirt --weights <root>/models/pretrained/rotation-small_convnet-32px.pt

It pretrains ``small_convnet`` at 32 px on all 70,000 Fashion-MNIST images by rotation prediction
(``lsun_hitl.pretrain``; no label is read), unless ``--weights`` gives a stored backbone. Then, per category
and seed, it trains the first iteration's model on 2,500 random images with their true labels twice, from
scratch and from the backbone, scores the other 67,500 images, and prints the AUC and how many images a
perfectly calibrated cascade could decide with each model: the largest lowest-scored set whose share of
positives is <= 0.7% (negatives) and the largest highest-scored set that is >= 96.5% positive (positives),
margins under the cascade's targets (1%, 95%) that its bounds leave. No Prefect or Dask: the library alone.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from one_iteration import resized  # benchmarks/ is on the path when run as a script
from sklearn.metrics import roc_auc_score

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.fashion_mnist import CLASSES, load_arrays
from lsun_hitl.pretrain import rotation_pretrain


def decidable(scores: np.ndarray, truth: np.ndarray, fo: float = 0.007, precision: float = 0.965) -> tuple[int, int]:
    """(negatives, positives) an oracle threshold could decide at these rates, against the truth."""
    low = truth[np.argsort(scores)]
    ok = np.flatnonzero(np.cumsum(low) / np.arange(1, len(low) + 1) <= fo)
    high = truth[np.argsort(-scores)]
    ok2 = np.flatnonzero(np.cumsum(high) / np.arange(1, len(high) + 1) >= precision)
    return (int(ok.max()) + 1 if len(ok) else 0), (int(ok2.max()) + 1 if len(ok2) else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["pullover", "shirt"], choices=CLASSES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--weights", help="a stored pool backbone (skips pretraining)")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--train", type=int, default=2500, help="labeled images the first model learns from")
    args = ap.parse_args()
    arrays = load_arrays()
    images = resized(np.concatenate([a[1] for a in arrays]), 32)
    classes = np.concatenate([a[2] for a in arrays])
    params = ModelParams(arch="small_convnet", image_size=32, epochs=30, max_steps=500, threads=2)
    if args.weights:
        with open(args.weights, "rb") as f:
            backbone = f.read()
        print(f"backbone: {args.weights}")
    else:
        started = time.time()
        backbone, info = rotation_pretrain(images, params, epochs=args.pretrain_epochs)
        print(
            f"pretrained on {info.images:,} unlabeled images, rotation accuracy {info.accuracy:.3f}, "
            f"{time.time() - started:.0f} s"
        )
    torch.load(io.BytesIO(backbone), weights_only=True)  # fail early on a bad file
    print("| category | seed | start | AUC | decidable negatives | decidable positives | train s |")
    print("|---|---|---|---|---|---|---|")
    gains = []
    for category in args.categories:
        truth = classes == CLASSES.index(category)
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            train = rng.choice(len(images), args.train, replace=False)
            rest = np.setdiff1d(np.arange(len(images)), train)
            row = {}
            for start, pretrained in (("scratch", None), ("pool backbone", backbone)):
                t0 = time.time()
                net = model_lib.train(
                    images[train], truth[train].astype(np.float32), params, seed=seed, pretrained=pretrained
                )
                took = time.time() - t0
                scores = model_lib.predict(net, images[rest])
                neg, pos = decidable(scores, truth[rest])
                row[start] = neg + pos
                auc = roc_auc_score(truth[rest], scores)
                print(f"| {category} | {seed} | {start} | {auc:.4f} | {neg:,} | {pos:,} | {took:.0f} |", flush=True)
            gains.append(row["pool backbone"] / max(1, row["scratch"]))
    print(f"decidable images, pool backbone / scratch: {', '.join(f'{g:.3f}' for g in gains)}")


if __name__ == "__main__":
    main()
