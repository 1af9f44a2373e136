"""Train on the export: does a classifier trained on what the cascade built do as well as one trained
on the truth, and better than one trained on the human labels alone? (The paper's check that networks
trained on its data improve, at small scale.)

    python benchmarks/train_on_export.py --root lsun-data --category sneaker
    python benchmarks/train_on_export.py --root lsun-data --category sneaker --train-limit 20000 --max-steps 300

Needs a root where the category's cascade finished over a Fashion-MNIST pool (``bash scripts/demo.sh``
builds ``lsun-data`` with ``sneaker``). The script exports the category as an ImageFolder tree
(``positive/``, ``negative/``), reads it back with ``torchvision.datasets.ImageFolder`` and trains the
cascade's own classifier (``lsun_hitl.model``, same architecture, steps and batch size for every run) on
the images from Fashion-MNIST's *train* split, three times:

- **export**: every exported train-split image, with the label the export gives it (people's or the
  model's);
- **human only**: only the exported images people labeled (what the same human effort gives without the
  cascade's model-decided labels);
- **truth**: the same images as *export* with their ground-truth labels (the ceiling).

Each model is then scored on the 10,000 images of Fashion-MNIST's *test* split (never trained on by any
of the three) and compared with the ground truth: accuracy, balanced accuracy and average precision,
with ratios against *truth* measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from lsun_hitl import export
from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.progress import Bar
from lsun_hitl.storage import Storage
from lsun_hitl.truth import read_truth


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each true positive's rank."""
    order = np.argsort(-scores, kind="stable")
    hits = truth[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def metrics(truth: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    said = scores >= 0.5
    tpr = (said & truth).sum() / max(1, truth.sum())
    tnr = (~said & ~truth).sum() / max(1, (~truth).sum())
    return {
        "accuracy": float((said == truth).mean()),
        "balanced_accuracy": float((tpr + tnr) / 2),
        "average_precision": average_precision(truth, scores),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="lsun-data", help="storage root with a finished Fashion-MNIST category")
    ap.add_argument("--category", default=None, help="default: the root's only finished dataset")
    ap.add_argument("--out", default=None, help="where the ImageFolder export goes (default: a temporary folder)")
    ap.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this many images")
    ap.add_argument("--image-size", type=int, default=ModelParams.image_size)
    ap.add_argument("--max-steps", type=int, default=ModelParams.max_steps)
    ap.add_argument("--epochs", type=int, default=ModelParams.epochs)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    storage = Storage(args.root)
    category = args.category
    if category is None:
        found = sorted(storage.fs.ls(storage.path("datasets"), detail=False)) if storage.exists("datasets") else []
        if len(found) != 1:
            sys.exit(f"--category: give one of the finished datasets under {args.root}/datasets: {found}")
        category = os.path.basename(found[0].rstrip("/"))
    truth_of = read_truth(storage, category)
    tmp = tempfile.TemporaryDirectory(prefix="train-on-export-") if args.out is None else None
    out = args.out or os.path.join(tmp.name, category)

    started = time.time()
    report = export.export_imagefolder(storage, [category], out, progress=Bar(f"export {category}", "img"))
    print(f"exported {report.written} to {out} in {time.time() - started:.0f} s; skipped {len(report.skipped)}")

    # the third-party reader: torchvision's ImageFolder over the export (raw bytes; lsun_hitl decodes them
    # exactly as the cascade's scoring does)
    import torchvision

    folder = torchvision.datasets.ImageFolder(out, loader=lambda path: open(path, "rb").read())
    positive_class = folder.class_to_idx["positive"]
    image_ids = [os.path.splitext(os.path.basename(p))[0] for p, _ in folder.samples]
    labels = np.array([c == positive_class for _, c in folder.samples])

    facts = pa.concat_tables(export.dataset_batches(storage, category)).select(["image_id", "uri", "decided_by"])
    by_id = dict(
        zip(
            facts.column("image_id").to_pylist(),
            zip(facts.column("uri").to_pylist(), facts.column("decided_by").to_pylist(), strict=True),
            strict=True,
        )
    )
    uris = [by_id[i][0] for i in image_ids]
    human = np.array([by_id[i][1] != "model" for i in image_ids])
    truth = np.array([truth_of[u] for u in uris])
    split = np.array(["test" if "/test/" in u else "train" for u in uris])

    train_idx = np.flatnonzero(split == "train")
    if args.train_limit and args.train_limit < len(train_idx):
        train_idx = np.sort(np.random.default_rng(args.seed).choice(train_idx, args.train_limit, replace=False))
    test_idx = np.flatnonzero(split == "test")
    if len(test_idx) == 0 or len(train_idx) == 0:
        sys.exit(
            f"{category}: the export holds {len(train_idx)} train-split and {len(test_idx)} test-split "
            "images; build the dataset over the whole Fashion-MNIST pool (both splits)"
        )

    started = time.time()
    need = np.concatenate([train_idx, test_idx])
    progress = Bar("read and decode", "img")
    images = np.zeros((len(folder), args.image_size, args.image_size, 3), np.uint8)
    for start in range(0, len(need), 2048):
        part = need[start : start + 2048]
        decoded, ok = model_lib.decode_many([folder[i][0] for i in part], args.image_size)
        if not ok.all():
            sys.exit(f"could not decode {folder.samples[part[~ok][0]][0]}")
        images[part] = decoded
        progress(start + len(part), len(need))
    print(f"read and decoded {len(need)} images in {time.time() - started:.0f} s")

    params = ModelParams(
        image_size=args.image_size, max_steps=args.max_steps, epochs=args.epochs, threads=len(os.sched_getaffinity(0))
    )
    runs = {
        "export": (train_idx, labels[train_idx]),
        "human only": (train_idx[human[train_idx]], labels[train_idx[human[train_idx]]]),
        "truth": (train_idx, truth[train_idx]),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (idx, targets) in runs.items():
        started = time.time()
        net = model_lib.train(
            images[idx],
            targets.astype(np.float32),
            params,
            seed=args.seed,
            progress=Bar(f"train on {name} ({len(idx)} images)", "step"),
        )
        scores = model_lib.predict(net, images[test_idx])
        results[name] = metrics(truth[test_idx], scores) | {
            "train_images": len(idx),
            "label_accuracy": float((targets == truth[idx]).mean()),
            "seconds": time.time() - started,
        }

    t = results["truth"]
    people = int(human[train_idx].sum())
    print(
        f"\n{category}: {len(train_idx)} train-split images exported ({people} labeled by people), "
        f"tested on {len(test_idx)} test-split images against ground truth; "
        f"{params.arch} at {params.image_size} px, {params.max_steps} steps max of {params.batch_size}"
    )
    print(
        f"{'trained on':<12} {'images':>7} {'labels right':>12} {'accuracy':>9} {'bal. acc.':>9} {'AP':>6} "
        f"{'AP / truth':>10} {'seconds':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['train_images']:>7} {r['label_accuracy']:>12.4f} {r['accuracy']:>9.4f} "
            f"{r['balanced_accuracy']:>9.4f} {r['average_precision']:>6.4f} "
            f"{r['average_precision'] / t['average_precision']:>10.3f} {r['seconds']:>8.0f}"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
