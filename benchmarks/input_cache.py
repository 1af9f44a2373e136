"""Benchmark: ten categories scoring one pool, with and without the model-input cache, against the decode ceiling.

    python benchmarks/input_cache.py --root /data/scale-1m                  # the whole pool
    python benchmarks/input_cache.py --root /data/scale-1m --rows 200000    # its first 200,000 images
    python benchmarks/input_cache.py --root /data/scale-1m --frozen         # frozen backbone: feature cache

Every category's every iteration scores the images it has not decided; without the cache each pass reads
and decodes them again. Measured in one run, on a 2-worker LocalCluster (one thread each), with the same
model (``--arch``/``--image-size``; untrained: a forward pass costs the same whatever the weights):

- the decode ceiling: a bare loop in this process on one core reading and decoding ``--sample`` of the
  files at the model's input size (``images.load_for_model``), times the cores;
- one category's scoring pass without the cache (``input_cache=False``): read, decode, score;
- ``--categories`` passes with the cache, from an empty one: the first decodes the pool into it, the others
  read it.

Printed: images/s of each, the first cached pass against the decode ceiling (goal >= 0.8x) and the ten
passes against one uncached pass (goal <= 2x), and the cache's size on disk.

With ``--frozen`` every category's model is a frozen backbone (the same one, random here: the cost does not
depend on its weights) with a head of its own: the first cached pass decodes the pool into the input cache and
stores the backbone's features (``lsun_hitl.features``); the others score from the features alone.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lsun_hitl import model as model_lib  # noqa: E402
from lsun_hitl.cluster import dask_client  # noqa: E402
from lsun_hitl.config import ModelParams  # noqa: E402
from lsun_hitl.images import load_for_model  # noqa: E402
from lsun_hitl.ingest import read_pool  # noqa: E402
from lsun_hitl.inputs import InputCache  # noqa: E402
from lsun_hitl.scoring import score_candidates  # noqa: E402
from lsun_hitl.storage import Storage  # noqa: E402


def decode_ceiling(storage: Storage, uris: list[str], size: int) -> float:
    """Images/s of one core reading and decoding ``uris`` at ``size`` (pinned to one CPU), the files read once
    before (the passes find them in the page cache too, after the first)."""
    for u in uris:
        storage.fs.cat_file(u)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        started = time.perf_counter()
        for u in uris:
            load_for_model(storage.fs.cat_file(u), size)
        return len(uris) / (time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, cpus)


def one_pass(
    storage: Storage, name: str, todo: pa.Table, pool: pa.Table, model_path: str, client, cache
) -> tuple[float, dict]:
    """Seconds of one scoring pass as category ``name``, and its stats (its scores are removed after)."""
    started = time.perf_counter()
    scores = score_candidates(
        storage, name, 1, todo, model_path, client=client, pool=pool if cache else None, cache=cache
    )
    took = time.perf_counter() - started
    assert scores.num_rows == todo.num_rows
    stats = storage.read_json(storage.path("scores", name, "iteration=1", "stats.json"))
    shutil.rmtree(storage.path("scores", name), ignore_errors=True)
    return took, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a storage root with an ingested pool")
    ap.add_argument("--rows", type=int, help="score the first N pool rows (default: all)")
    ap.add_argument("--categories", type=int, default=10)
    ap.add_argument("--arch", default="mobilenet_v3_small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--sample", type=int, default=3000, help="files the decode ceiling reads")
    ap.add_argument(
        "--frozen", action="store_true", help="frozen-backbone models, a head per category (the feature cache)"
    )
    args = ap.parse_args(argv)
    data = Storage(args.root)
    bench = Storage(os.path.join(data.root, "bench-input-cache"))  # scores, model and cache of this benchmark
    shutil.rmtree(bench.root, ignore_errors=True)
    full = read_pool(data, columns=["image_id", "uri"])
    n = min(args.rows or full.num_rows, full.num_rows)
    pool = full.slice(0, n)
    rows = np.arange(n)
    todo = pool.add_column(0, "row", pa.array(rows, pa.int64()))
    model_paths = [bench.path(f"model-{k}.pt") for k in range(args.categories)]
    backbone = io.BytesIO()
    torch.save(model_lib.Classifier(args.arch, args.image_size).net.state_dict(), backbone)
    for k, path in enumerate(model_paths):
        torch.manual_seed(k)  # each category its own head (and, without --frozen, its own network)
        params = ModelParams(arch=args.arch, image_size=args.image_size, freeze_backbone=args.frozen)
        net = model_lib.build(params, backbone.getvalue() if args.frozen else None).eval()
        bench.write_bytes(path, model_lib.save(net))
    model_path = model_paths[0]
    cores = len(os.sched_getaffinity(0))
    sample = pool.column("uri").to_pylist()[:: max(1, n // args.sample)][: args.sample]
    ceiling = decode_ceiling(data, sample, args.image_size) * min(2, cores)
    cache = InputCache.of_pool(bench, pool.column("image_id"), args.image_size)
    kind = "frozen backbone, a head per category" if args.frozen else "a network per category"
    print(
        f"pool rows {n:,}; {args.arch} at {args.image_size} px ({kind}); decode ceiling {ceiling:,.0f} img/s"
        f" ({cores} cores)"
    )
    with dask_client(n_workers=2) as client:
        warm = todo.slice(0, 512)
        one_pass(bench, "warm-up", warm.drop_columns(["row"]), pool, model_path, client, None)
        plain, _ = one_pass(bench, "plain", todo.drop_columns(["row"]), pool, model_path, client, None)
        print(f"one category, no cache: {plain:,.1f} s ({n / plain:,.0f} img/s)", flush=True)
        cached = []
        for k in range(args.categories):
            took, stats = one_pass(bench, f"category-{k}", todo, pool, model_paths[k], client, cache)
            cached.append(took)
            what = "first (decodes into the cache)" if k == 0 else "reads the cache"
            print(
                f"category {k + 1} with the cache, {what}: {took:,.1f} s ({n / took:,.0f} img/s; decoded"
                f" {stats['decoded']:,}, from stored features {stats.get('from_features', 0):,})",
                flush=True,
            )
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(bench.path("cache")) for f in fs)
    rest = float(np.mean(cached[1:])) if len(cached) > 1 else float("nan")
    table = [
        ("decode ceiling (cores x one core's rate)", None, ceiling, "1.00x"),
        ("one category, no cache", plain, n / plain, f"{n / plain / ceiling:.2f}x of the ceiling"),
        (
            "first cached pass",
            cached[0],
            n / cached[0],
            f"{n / cached[0] / ceiling:.2f}x of the ceiling (goal >= 0.8x)",
        ),
        ("a later cached pass (mean)", rest, n / rest, f"{plain / rest:.2f}x faster than no cache"),
        (
            f"{args.categories} categories, cache",
            sum(cached),
            None,
            f"{sum(cached) / plain:.2f}x one uncached pass (goal <= 2x)",
        ),
        (
            f"{args.categories} categories, no cache (estimated)",
            args.categories * plain,
            None,
            f"{args.categories:.2f}x",
        ),
    ]
    print("\n| pass | seconds | img/s | ratio |\n|---|---|---|---|")
    for name, secs, rate, ratio in table:
        secs_s = "-" if secs is None else f"{secs:,.1f}"
        rate_s = "-" if rate is None else f"{rate:,.0f}"
        print(f"| {name} | {secs_s} | {rate_s} | {ratio} |")
    print(f"caches on disk: {size / 1e9:.2f} GB ({size / n:,.0f} bytes an image)")
    shutil.rmtree(bench.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
