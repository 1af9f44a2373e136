"""Does the stated guarantee hold, and what does it cost? Threshold procedures replayed on real model scores.

    python benchmarks/guarantee.py --categories all --models 0 1 --draws 1000

A guarantee such as "the model-decided negatives are at most 1% positive, with 95% confidence" is a statement
about the calibration draw: over many draws of the calibration sample, the chosen threshold may miss its
target in at most 5% of them. One cascade run is one draw, so ten runs cannot tell a 5% procedure from a
20% one. This script measures it directly:

1. per category and model seed it trains the first iteration's model (``small_convnet`` at 32 px, 30 epochs
   capped at 500 steps, the evaluation harness's model) on 2,500 random Fashion-MNIST images with their
   true labels, and scores the other 67,500 (cached under ``--cache``: a few minutes per model on 2 cores);
2. then, for each threshold procedure (``lsun_hitl.calibration.SCANS``) and calibration size, it draws
   ``--draws`` calibration samples uniformly from the scored images (labels: the ground truth, which is
   what rechecked crowd labels were in the evaluation runs), chooses thresholds, applies them to the
   rest, and compares what the model decided with the ground truth. ``--label-noise`` first makes calibration
   labels wrong at four rates, by truth and by which side of 0.5 the model scored them, as crowd labels are
   after recheck (which asks again where the model disagrees). In the 17 evaluation runs of session 10, 42 of
   17,342 positives scored >= 0.5 were left "no" (0.24%), 32 of 58,907 negatives scored < 0.5 "yes" (0.054%),
   30 of 2,905 positives scored < 0.5 "no" (1.0%), 10 of 2,052 negatives scored >= 0.5 "yes" (0.49%):
   ``--label-noise 0.0024 0.00054 0.010 0.0049``.

It prints, per procedure: the share of draws whose model-decided positives were below the precision target
(or negatives above the false-omission target) — the miss rate the stated confidence bounds — and the mean
number of images the model decided, i.e. what people no longer label; then the first iteration under the
default settings (``CascadeParams()``) against the previous ones. No Prefect or Dask: the library alone.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from one_iteration import resized  # benchmarks/ is on the path when run as a script

from lsun_hitl import model as model_lib
from lsun_hitl.calibration import SCANS, choose_thresholds
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.fashion_mnist import CLASSES, load_arrays

TRAIN = 2500
MODEL = ModelParams(arch="small_convnet", image_size=32, epochs=30, max_steps=500, threads=2)


def first_model_scores(cache: Path, category: str, seed: int, images: np.ndarray, classes: np.ndarray) -> dict:
    """Scores and truth of the 67,500 images a first model did not train on (cached as .npz)."""
    path = cache / f"{category}-model{seed}.npz"
    if path.exists():
        return dict(np.load(path))
    truth = classes == CLASSES.index(category)
    rng = np.random.default_rng([seed, CLASSES.index(category)])
    train = rng.choice(len(images), TRAIN, replace=False)
    rest = np.setdiff1d(np.arange(len(images)), train)
    started = time.time()
    net = model_lib.train(images[train], truth[train].astype(np.float32), MODEL, seed=seed + 1)
    scores = model_lib.predict(net, images[rest])
    from sklearn.metrics import roc_auc_score

    out = {"scores": scores, "truth": truth[rest], "auc": np.float64(roc_auc_score(truth[rest], scores))}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    print(f"   {category} model {seed}: AUC {out['auc']:.4f}, {time.time() - started:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["all"])
    ap.add_argument("--models", nargs="+", type=int, default=[0], help="model seeds (a model per category and seed)")
    ap.add_argument("--cache", default="/tmp/lsun-guarantee")
    ap.add_argument("--score-only", action="store_true", help="train and score the models, then stop")
    ap.add_argument("--draws", type=int, default=1000, help="calibration draws per procedure and size")
    ap.add_argument("--calibration", nargs="+", type=int, default=[1500], help="calibration sample sizes")
    ap.add_argument("--scans", nargs="+", default=list(SCANS), choices=SCANS)
    ap.add_argument(
        "--confidence",
        nargs="+",
        type=float,
        default=[0.95, 0.975],
        help="per-threshold confidences (0.975: a run's first iteration at 95%% per run, iteration_confidence)",
    )
    ap.add_argument("--start-share", nargs="+", type=float, default=[0.0, 0.5], help="fixed-sequence starts")
    ap.add_argument(
        "--positive-start-errors",
        nargs="+",
        type=int,
        default=[0, 1],
        help="fixed-sequence starts on the positive side: errors the first region tolerates",
    )
    ap.add_argument(
        "--label-noise",
        nargs=4,
        type=float,
        default=[0.0] * 4,
        metavar=("POS_HIGH", "NEG_LOW", "POS_LOW", "NEG_HIGH"),
        help="calibration label error rates: positives scored >= 0.5, negatives < 0.5, positives < 0.5, negatives"
        " >= 0.5",
    )
    ap.add_argument("--target-precision", type=float, default=0.95)
    ap.add_argument("--target-false-omission", type=float, default=0.01)
    args = ap.parse_args()
    categories = list(CLASSES) if args.categories == ["all"] else args.categories
    arrays = load_arrays()
    images = resized(np.concatenate([a[1] for a in arrays]), MODEL.image_size)
    classes = np.concatenate([a[2] for a in arrays])
    for category, seed in itertools.product(categories, args.models):
        first_model_scores(Path(args.cache), category, seed, images, classes)
    if args.score_only:
        return
    procedures = [
        (scan, conf, share, errors)
        for scan in args.scans
        for conf in args.confidence
        for share in (args.start_share if scan == "fixed-sequence" else [0.0])
        for errors in (args.positive_start_errors if scan == "fixed-sequence" else [0])
    ]
    print(
        f"\n{args.draws} calibration draws per row; targets: precision >= {args.target_precision}, false omission <= "
        f"{args.target_false_omission}; 'miss': the model-decided set is past its target against the ground truth; "
        f"calibration label errors (positives >= 0.5, negatives < 0.5, positives < 0.5, negatives >= 0.5): "
        f"{' '.join(f'{r:.2%}' for r in args.label_noise)}"
    )
    print(
        "| category | model | calibration images | scan (start share, positive start errors) | confidence "
        "| precision miss | FO miss | either miss | model positives | model negatives | left undecided |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    pooled: dict[tuple, list[Replay]] = {}
    for category, seed in itertools.product(categories, args.models):
        run = first_model_scores(Path(args.cache), category, seed, images, classes)
        for n_cal, (scan, conf, share, errors) in itertools.product(args.calibration, procedures):
            r = replay(run["scores"], run["truth"], n_cal, scan, conf, share, errors, args, seed=[seed, n_cal])
            pooled.setdefault((n_cal, scan, conf, share, errors), []).append(r)
            print(f"| {category} | {seed} | {n_cal:,} | {name(scan, share, errors)} | {conf} | {r.row()} |", flush=True)
    d = CascadeParams()
    first_conf = d.threshold_confidence(1)
    policies = {
        "nested, 95% per threshold, 1,500 (before session 10)": ("nested", 0.95, 0.0, 0, d.calibration_sample),
        f"fixed-sequence, {first_conf:.1%}, {d.first_calibration_sample:,}, positives from 0 errors (session 10)": (
            d.threshold_scan,
            first_conf,
            d.start_share,
            0,
            d.first_calibration_sample,
        ),
        f"default (fixed-sequence, {first_conf:.1%}, {d.first_calibration_sample:,}, positives from "
        f"{d.positive_start_errors} error)": (
            d.threshold_scan,
            first_conf,
            d.start_share,
            d.positive_start_errors,
            d.first_calibration_sample,
        ),
    }
    print("\nThe first iteration under the default settings against the previous ones, per category: how often either")
    print("side missed its target, and 'people': the calibration images plus the images left undecided, what the")
    print(f"first iteration leaves to people besides its {TRAIN:,} training images.")
    print("| category | model | " + " | ".join(f"{p}: miss / people" for p in policies) + " |")
    print("|---|---|" + "---|" * len(policies))
    totals: dict[str, list[tuple[Replay, int]]] = {p: [] for p in policies}
    for category, seed in itertools.product(categories, args.models):
        run = first_model_scores(Path(args.cache), category, seed, images, classes)
        cells = []
        for p, (scan, conf, share, errors, n_cal) in policies.items():
            r = replay(run["scores"], run["truth"], n_cal, scan, conf, share, errors, args, seed=[seed, n_cal])
            totals[p].append((r, n_cal))
            cells.append(f"{r.either_miss:.3f} / {n_cal + r.undecided:,.0f}")
        print(f"| {category} | {seed} | " + " | ".join(cells) + " |", flush=True)
    for p, rows in totals.items():
        miss, worst = np.mean([r.either_miss for r, _ in rows]), max(r.either_miss for r, _ in rows)
        people = np.mean([n + r.undecided for r, n in rows])
        positives = np.mean([r.positives for r, _ in rows])
        print(
            f"{p}: either side missed in {miss:.2%} of draws (worst category {worst:.2%}); model positives "
            f"{positives:,.0f}; people label {people:,.0f}"
        )

    print("\nPooled over categories and models (miss rates: share of all draws):")
    print(
        "| calibration images | scan (start share, positive start errors) | confidence | precision miss | FO miss "
        "| either miss | model positives | model negatives | left undecided |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (n_cal, scan, conf, share, errors), rs in pooled.items():
        print(f"| {n_cal:,} | {name(scan, share, errors)} | {conf} | {Replay.mean(rs).row()} |")


def name(scan: str, share: float, errors: int) -> str:
    return f"{scan} ({share:g}, {errors})" if scan == "fixed-sequence" else scan


@dataclass(frozen=True)
class Replay:
    """What one procedure did over many calibration draws (means over the draws)."""

    precision_miss: float
    fo_miss: float
    either_miss: float
    positives: float
    negatives: float
    undecided: float

    def row(self) -> str:
        return (
            f"{self.precision_miss:.3f} | {self.fo_miss:.3f} | {self.either_miss:.3f} | {self.positives:,.0f} | "
            f"{self.negatives:,.0f} | {self.undecided:,.0f}"
        )

    @staticmethod
    def mean(rs: list[Replay]) -> Replay:
        return Replay(*(float(np.mean([getattr(r, f) for r in rs])) for f in Replay.__dataclass_fields__))


def replay(
    scores: np.ndarray,
    truth: np.ndarray,
    n_cal: int,
    scan: str,
    confidence: float,
    start_share: float,
    positive_start_errors: int,
    args: argparse.Namespace,
    seed: list[int],
) -> Replay:
    """Draw ``args.draws`` uniform calibration samples of ``n_cal`` images, choose thresholds on each, and
    measure what the model decided on the other images against the truth."""
    rng = np.random.default_rng(seed)
    out = np.zeros((args.draws, 6))
    for k in range(args.draws):
        rest = np.ones(len(scores), bool)
        cal = rng.choice(len(scores), n_cal, replace=False)
        rest[cal] = False
        t, high = truth[cal], scores[cal] >= 0.5
        rate = np.select([t & high, ~t & ~high, t & ~high], args.label_noise[:3], args.label_noise[3])
        labels = t ^ (rng.random(n_cal) < rate)
        th = choose_thresholds(
            scores[cal],
            labels.astype(np.float64),
            target_precision=args.target_precision,
            target_false_omission=args.target_false_omission,
            confidence=confidence,
            scan=scan,
            start_share=start_share,
            positive_start_errors=positive_start_errors,
        )
        pos = rest & (scores >= th.positive) if th.positive is not None else np.zeros(len(scores), bool)
        neg = rest & (scores <= th.negative) & ~pos if th.negative is not None else np.zeros(len(scores), bool)
        p_miss = pos.any() and truth[pos].mean() < args.target_precision
        f_miss = neg.any() and truth[neg].mean() > args.target_false_omission
        out[k] = [p_miss, f_miss, p_miss or f_miss, pos.sum(), neg.sum(), rest.sum() - pos.sum() - neg.sum()]
    return Replay(*out.mean(axis=0).tolist())


if __name__ == "__main__":
    main()
