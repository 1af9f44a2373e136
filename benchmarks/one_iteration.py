"""One cascade iteration offline, to size its levers: model input size and architecture, and the crowd's
noise floor under the calibration bounds.

    python benchmarks/one_iteration.py --category t-shirt --image-size 32 64
    python benchmarks/one_iteration.py --category pullover --arch mobilenet_v3_small resnet18 --epochs 10 30

For each model setting it draws the first iteration's sample from the 70,000 Fashion-MNIST images (2,500
training and 1,500 calibration images, the cascade's defaults), has the simulated crowd label it (90%-right
labelers, 10% spammers, Dawid-Skene), trains the model, scores the rest of the pool and chooses thresholds
three ways, each with both threshold scans (``--scan``): on the crowd's calibration labels as given, after
rechecking the disputed ones (``disputed``: a second crowd round on the images people and the model
disagree on), and on the ground truth. It prints
the model's AUC, training and scoring time, and how many images each way lets the model decide, with the
delivered precision and false omission against the ground truth. No Prefect or Dask: the library alone.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import pyarrow as pa
import torch

from lsun_hitl import model as model_lib
from lsun_hitl.calibration import SCANS, choose_thresholds
from lsun_hitl.cascade import disputed
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.fashion_mnist import CLASSES, load_arrays
from lsun_hitl.labels import aggregate


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 28, 28) grey uint8 -> (N, size, size, 3) uint8, bilinear."""
    t = torch.from_numpy(images).float().unsqueeze(1)
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear")
    return t.clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous().numpy()


def recheck(crowd: SimulatedCrowd, ids: list[str], first: pa.Table, asked: np.ndarray) -> np.ndarray:
    """Posteriors after a second crowd round on ``asked`` images, aggregated with the first answers."""
    import pandas as pd

    again = crowd.answer(pa.table({"image_id": [ids[i] for i in asked], "uri": [ids[i] for i in asked]}))
    votes = pd.concat([first.to_pandas(), again], ignore_index=True)
    votes["request_id"], votes["batch_id"], votes["gold"] = "bench", None, False
    votes["submitted_at"] = np.datetime64("2026-01-01", "ms")
    agg = aggregate(pa.Table.from_pandas(votes, preserve_index=False)).to_pandas().set_index("image_id")
    return agg.reindex(ids)["p_positive"].fillna(0.5).to_numpy(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="t-shirt", choices=CLASSES)
    ap.add_argument("--image-size", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--arch", nargs="+", default=["mobilenet_v3_small"])
    ap.add_argument("--epochs", type=int, nargs="+", default=[ModelParams().epochs])
    ap.add_argument("--scan", nargs="+", default=list(SCANS), choices=SCANS, help="threshold scans to compare")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = CascadeParams()
    arrays = load_arrays()
    x = np.concatenate([a[1] for a in arrays])
    truth = np.concatenate([a[2] for a in arrays]) == CLASSES.index(args.category)
    n = len(x)
    rng = np.random.default_rng(args.seed)
    drawn = rng.choice(n, d.train_sample + d.calibration_sample, replace=False)
    train, cal = drawn[: d.train_sample], drawn[d.train_sample :]
    rest = np.setdiff1d(np.arange(n), drawn)
    ids = [str(i) for i in range(n)]
    crowd = SimulatedCrowd(dict(zip(ids, truth.tolist(), strict=True)), CrowdParams(seed=args.seed))
    votes = crowd.answer(pa.table({"image_id": [ids[i] for i in drawn], "uri": [ids[i] for i in drawn]}))
    first = pa.Table.from_pandas(votes, preserve_index=False)
    p = recheck(crowd, ids, first, np.zeros(0, int))[drawn]
    print(
        f"{args.category}: crowd labels right on {np.mean((p >= 0.5) == truth[drawn]):.2%} of the "
        f"{len(drawn):,} sampled images"
    )
    print(
        "| model | AUC | train s | score img/s | calibration labels | scan | rechecked | model decides "
        "| precision | FO |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch, size, epochs in itertools.product(args.arch, args.image_size, args.epochs):
        images = resized(x, size)
        params = ModelParams(arch=arch, image_size=size, epochs=epochs)
        t0 = time.perf_counter()
        net = model_lib.train(images[train], p[: len(train)], params, seed=args.seed + 1)
        t1 = time.perf_counter()
        s_rest = model_lib.predict(net, images[rest])
        t2 = time.perf_counter()
        s_cal = model_lib.predict(net, images[cal])
        from sklearn.metrics import roc_auc_score

        auc = roc_auc_score(truth[rest], s_rest)
        p_cal = p[len(train) :]
        asked = disputed(p_cal, s_cal >= 0.5)
        full = recheck(crowd, ids, first, cal[asked])
        ways = {
            "crowd": (p_cal, 0),
            "crowd + recheck": (full[cal], int(asked.sum())),
            "ground truth": (truth[cal].astype(np.float32), 0),
        }
        for (name, (labels, n_asked)), scan in itertools.product(ways.items(), args.scan):
            th = choose_thresholds(
                s_cal,
                labels,
                target_precision=d.target_precision,
                target_false_omission=d.target_false_omission,
                scan=scan,
            )
            pos = s_rest >= th.positive if th.positive is not None else np.zeros(len(rest), bool)
            neg = (s_rest <= th.negative) & ~pos if th.negative is not None else np.zeros(len(rest), bool)
            prec = f"{truth[rest][pos].mean():.4f}" if pos.any() else "-"
            fo = f"{truth[rest][neg].mean():.4f}" if neg.any() else "-"
            print(
                f"| {arch} {size}px {epochs}ep | {auc:.4f} | {t1 - t0:.0f} | {len(rest) / (t2 - t1):,.0f} "
                f"| {name} | {scan} "
                f"| {n_asked} | {pos.sum():,} pos + {neg.sum():,} neg | {prec} | {fo} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
