"""Make a pool of LSUN-sized photos offline: N distinct JPEGs derived from Fashion-MNIST's 70,000 images.

Image ``i`` is source image ``i % 70,000`` (train split, then test) under its own seeded random transform:
scale, rotation, shift, contrast, a coloured (sometimes gradient) background and a tint, then Gaussian
noise, rendered at LSUN's release size (shorter side 256, the other 256-384 px) and written as a JPEG of
quality 75. The noise makes every image's bytes, and so its content hash, distinct. The same ``--seed``
and ``i`` always give the same file, so the pool is reproducible and a second run only writes the files
that are missing (each file is written under a temporary name and renamed, or one PUT on an object store).

The source class goes to ``groundtruth/fashion-mnist.parquet`` (uri, class_index, class_name, source),
the table the simulated crowd, ``gold --from-fashion-mnist`` and ``evaluate`` read; the pipeline never
does. Derived images share their sources (a 1M pool holds each source ~14 times), so label-quality
figures on such a pool flatter the model; its throughput figures are the point.

    python benchmarks/scale_pool.py --root /data/scale-1m                # 1,000,000 images (default)
    python benchmarks/scale_pool.py --root s3://bucket/scale --n 50000   # any fsspec URL
    lsun-hitl ingest --root /data/scale-1m --images /data/scale-1m/images/scale

Work is spread over ``--workers`` processes (default: the cores), ``--chunk`` images at a time, so memory
stays bounded (a chunk of encoded JPEGs per process); a progress bar shows images written.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageChops, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lsun_hitl.fashion_mnist import CLASSES, DEFAULT_DIR, load_arrays  # noqa: E402
from lsun_hitl.progress import Bar  # noqa: E402
from lsun_hitl.storage import Storage, groundtruth_key  # noqa: E402

PREFIX = "images/scale"
SHORT_SIDE = 256
QUALITY = 75
PER_FOLDER = 10_000

_SOURCES: np.ndarray | None = None  # (70000, 28, 28) uint8, loaded once per worker process
_NOISE: dict[int, list[Image.Image]] = {}


def image_key(i: int) -> str:
    """Where image ``i`` lives under the root: 10,000 files a folder."""
    return f"{PREFIX}/{i // PER_FOLDER:04d}/{i:07d}.jpg"


def _noise_tiles(seed: int) -> list[Image.Image]:
    """A few seeded grey noise tiles (mean 128, sd 32): each image adds a random crop of one, scaled."""
    rng = np.random.default_rng([seed, 7919])
    return [Image.fromarray(np.clip(rng.normal(128, 32, (400, 400)), 0, 255).astype(np.uint8), "L") for _ in range(8)]


def render(source: np.ndarray, rng: np.random.Generator, noise: list[Image.Image]) -> Image.Image:
    """One random photo-like rendering of a 28x28 grey Fashion-MNIST image: an RGB image, shorter side 256."""
    long_side = int(rng.integers(SHORT_SIDE, 385))
    w, h = (long_side, SHORT_SIDE) if rng.random() < 0.5 else (SHORT_SIDE, long_side)
    # the object: rotated, scaled to 55-95% of the shorter side, its contrast and gamma changed, tinted
    obj = Image.fromarray(source, "L").rotate(
        float(rng.uniform(-20, 20)), resample=Image.Resampling.BICUBIC, expand=True
    )
    size = int(SHORT_SIDE * rng.uniform(0.55, 0.95))
    obj = obj.resize((size, size), Image.Resampling.BILINEAR)
    gain, gamma = rng.uniform(3.0, 6.0), rng.uniform(0.6, 1.5)
    lo, hi = rng.uniform(0.0, 0.3), rng.uniform(0.6, 1.0)
    mask = obj.point([min(255, int(v * gain)) for v in range(256)])
    shade = obj.point([int(255 * min(1.0, lo + hi * (v / 255) ** gamma)) for v in range(256)])
    tint = tuple(int(c) for c in rng.uniform(100, 255, 3))
    fg = ImageOps.colorize(shade, black=(0, 0, 0), white=tint)
    # the background: a flat colour, or a linear gradient between two colours
    c0 = tuple(int(c) for c in rng.uniform(0, 255, 3))
    canvas = Image.new("RGB", (w, h), c0)
    if rng.random() < 0.5:
        c1 = Image.new("RGB", (w, h), tuple(int(c) for c in rng.uniform(0, 255, 3)))
        ramp = Image.linear_gradient("L").rotate(float(rng.choice([0, 90, 180, 270]))).resize((w, h))
        canvas = Image.composite(c1, canvas, ramp)
    left = int(rng.integers(min(0, w - size), max(0, w - size) + 1))
    top = int(rng.integers(min(0, h - size), max(0, h - size) + 1))
    canvas.paste(fg, (left, top), mask)
    # sensor noise: a random crop of a noise tile, scaled to a random strength
    tile = noise[int(rng.integers(len(noise)))]
    x, y = int(rng.integers(0, tile.width - w + 1)), int(rng.integers(0, tile.height - h + 1))
    grain = tile.crop((x, y, x + w, y + h))
    sd = rng.uniform(0.06, 0.25)
    grain = grain.point([int(128 + (v - 128) * sd) for v in range(256)]).convert("RGB")
    return ImageChops.add(canvas, grain, scale=1.0, offset=-128)


def encode(i: int, seed: int) -> bytes:
    """The JPEG bytes of image ``i`` (a pure function of ``seed`` and ``i``)."""
    assert _SOURCES is not None
    if seed not in _NOISE:
        _NOISE[seed] = _noise_tiles(seed)
    img = render(_SOURCES[i % len(_SOURCES)], np.random.default_rng([seed, i]), _NOISE[seed])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def _init(source_dir: str) -> None:
    global _SOURCES
    _SOURCES = np.concatenate([imgs for _, imgs, _ in load_arrays(source_dir)])


def write_chunk(start: int, stop: int, *, root: str, options: dict[str, Any], seed: int) -> int:
    """Write images ``start..stop-1`` that are missing (runs in a worker process); return how many were written."""
    storage = Storage(root, options)
    todo = [i for i in range(start, stop) if not storage.exists(storage.path(image_key(i)))]
    if storage.is_local:
        for i in todo:
            path = storage.path(image_key(i))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(encode(i, seed))
            os.replace(tmp, path)
    elif todo:
        storage.fs.pipe({storage.path(image_key(i)): encode(i, seed) for i in todo})
    return len(todo)


def truth_table(storage: Storage, n: int, source_dir: str) -> pa.Table:
    """uri, class_index, class_name and source (``<split>/<index>``) of every image of the pool."""
    splits = [(split, labels) for split, _, labels in load_arrays(source_dir)]
    labels = np.concatenate([lbl for _, lbl in splits])
    source = [f"{split}/{k:05d}" for split, lbl in splits for k in range(len(lbl))]
    src = np.arange(n) % len(labels)
    cls = labels[src].astype(np.int8)
    return pa.table(
        {
            "uri": [storage.url_of(image_key(i)) for i in range(n)],
            "class_index": pa.array(cls, pa.int8()),
            "class_name": pa.array(np.asarray(CLASSES)[cls]),
            "source": pa.array(np.asarray(source)[src]),
        }
    )


def make_pool(
    storage: Storage,
    n: int,
    *,
    seed: int = 0,
    workers: int | None = None,
    chunk: int = 1000,
    source_dir: str = DEFAULT_DIR,
) -> dict[str, float]:
    """Write ``n`` images and the ground truth under ``storage``; return the figures of the run."""
    load_arrays(source_dir)  # a missing package is one clear error here, not one per worker
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    bar = Bar("scale pool", "img")
    written = done = 0
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(source_dir,)) as pool:
        futures = {
            pool.submit(write_chunk, s, min(n, s + chunk), root=storage.url, options=storage.options, seed=seed): min(
                n, s + chunk
            )
            - s
            for s in range(0, n, chunk)
        }
        for fut in as_completed(futures):
            written += fut.result()
            done += futures[fut]
            bar(done, n)
    storage.write_table(storage.path(groundtruth_key("fashion-mnist")), truth_table(storage, n, source_dir))
    wall = time.perf_counter() - started
    return {"images": n, "written": written, "wall_s": wall, "per_s": written / wall if wall else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root", required=True, help="storage root (a folder or fsspec URL): images go under images/scale/"
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="images to make (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, help="processes (default: the cores)")
    ap.add_argument("--chunk", type=int, default=1000, help="images a task writes")
    ap.add_argument("--source-dir", default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n {args.n}: give at least one image")
    storage = Storage(args.root)
    try:
        figures = make_pool(
            storage, args.n, seed=args.seed, workers=args.workers, chunk=args.chunk, source_dir=args.source_dir
        )
    except FileNotFoundError as exc:
        print(f"scale_pool: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"scale pool: {figures['images']:,} images under {storage.url_of(PREFIX)} ({figures['written']:,} written "
        f"in {figures['wall_s']:.0f} s, {figures['per_s']:,.0f} img/s); ground truth at "
        f"{storage.url_of(groundtruth_key('fashion-mnist'))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
