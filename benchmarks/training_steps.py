"""Does longer training make a run's model cut more of the pool? Training steps against what an oracle decides.

    python benchmarks/training_steps.py --root /work/data/eval-200k/seed=0 --category shirt --iteration 5 \
        --steps 500 2000 4000

Takes the human labels a stored run had bought by ``--iteration`` (every one but the calibration images,
which the cascade never trains on, with the crowd's aggregated posteriors as targets, as ``cascade.train``
does), trains the run's kind of model once per ``--steps`` cap (``epochs`` passes, fewer when they would
exceed the cap: ``model.train``'s rule), scores ``--eval`` random images that were still unlabeled after that
iteration, and prints the AUC against the registered ground truth and what *oracle* thresholds (chosen on the
truth: no calibration sample, no bound) could decide there: the largest lowest-scored set with at most
``--false-omission`` positives and the largest highest-scored set at least ``--precision`` positive. Inputs
come from the pool's model-input cache where it holds them. No Prefect or Dask: the library alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pretrain import decidable  # benchmarks/ is on the path when run as a script
from sklearn.metrics import roc_auc_score

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.ingest import read_pool
from lsun_hitl.inputs import InputCache
from lsun_hitl.manifest import BY_HUMAN, ROLE_CALIBRATION, read_manifest
from lsun_hitl.scoring import read_pool_images
from lsun_hitl.storage import Storage
from lsun_hitl.truth import per_row, read_truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a run's storage root (pool, manifests, ground truth)")
    ap.add_argument("--category", required=True)
    ap.add_argument("--iteration", type=int, required=True, help="train on the labels bought by this iteration")
    ap.add_argument("--steps", nargs="+", type=int, default=[500, 2000, 4000], help="training-step caps to compare")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arch", default="small_convnet")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--eval", type=int, default=20_000, help="random still-unlabeled images to score")
    ap.add_argument("--false-omission", type=float, default=0.01)
    ap.add_argument("--precision", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    storage = Storage(args.root)
    pool = read_pool(storage, columns=["image_id", "uri"])
    truth = per_row(read_truth(storage, args.category), pool.column("uri").to_pylist())
    state = read_manifest(storage, args.category, args.iteration)
    rows = np.flatnonzero((state.decided_by == BY_HUMAN) & (state.human_role != ROLE_CALIBRATION))
    targets = state.p_positive[rows]
    open_rows = np.sort(np.random.default_rng(0).choice(state.unlabeled_index(), args.eval, replace=False))
    cache = InputCache.of_pool(storage, pool.column("image_id"), args.image_size)
    images, ok = read_pool_images(storage, rows, args.image_size, cache)
    held, held_ok = read_pool_images(storage, open_rows, args.image_size, cache)
    held_truth = truth[open_rows][held_ok]
    print(
        f"{args.category} after iteration {args.iteration}: {ok.sum():,} training labels ({targets[ok].mean():.3f}"
        f" positive); {held_ok.sum():,} still-unlabeled images scored ({held_truth.mean():.3f} positive)"
    )
    print("| step cap | steps run | epochs | AUC | oracle negatives | oracle positives | train s |")
    print("|---|---|---|---|---|---|---|")
    for cap in args.steps:
        params = ModelParams(arch=args.arch, image_size=args.image_size, epochs=args.epochs, max_steps=cap, threads=2)
        epochs, steps = model_lib.schedule(int(ok.sum()), params)
        started = time.time()
        net = model_lib.train(images[ok], targets[ok], params, seed=args.seed)
        took = time.time() - started
        scores = model_lib.predict(net, held[held_ok])
        neg, pos = decidable(scores, held_truth, fo=args.false_omission, precision=args.precision)
        n = len(held_truth)
        print(
            f"| {cap:,} | {steps:,} | {epochs} | {roc_auc_score(held_truth, scores):.4f} |"
            f" {neg / n:.1%} | {pos / n:.1%} | {took:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
