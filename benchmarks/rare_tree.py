"""A pool where one category is rare: a seeded subset of Fashion-MNIST as a class-folder tree.

    python benchmarks/rare_tree.py --category bag --share 0.05 --size 6000 --out /data/bag-6k/images
    lsun-hitl ingest --root /data/bag-6k --images /data/bag-6k/images
    lsun-hitl truth --root /data/bag-6k --folder /data/bag-6k/images
    lsun-hitl simulate --root /data/bag-6k --category bag --seeds 0 1 2 --train-sample 300 ...

A pool shared by many categories holds each of them at a few percent; Fashion-MNIST holds each at 10%. This
draws ``share x size`` images of ``category`` and the rest from the other nine classes, uniformly without
replacement from the 70,000 (seeded), and writes each as a PNG at ``<out>/<class>/<split>-<index>.png``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from lsun_hitl.fashion_mnist import CLASSES, DEFAULT_DIR, check_category, load_arrays, png_bytes


def write_tree(out: str, category: str, share: float, size: int, seed: int = 0, source: str = DEFAULT_DIR) -> int:
    """Write the subset under ``out``; return how many images of ``category`` it holds."""
    check_category(category)
    parts = load_arrays(source)
    images = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    names = np.concatenate([[f"{p[0]}-{i:05d}" for i in range(len(p[2]))] for p in parts])
    target = CLASSES.index(category)
    rng = np.random.default_rng(seed)
    n_pos = int(round(share * size))
    pos = rng.choice(np.flatnonzero(labels == target), n_pos, replace=False)
    neg = rng.choice(np.flatnonzero(labels != target), size - n_pos, replace=False)
    for i in np.concatenate([pos, neg]):
        folder = os.path.join(out, CLASSES[labels[i]])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{names[i]}.png")
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(png_bytes(images[i]))
            os.replace(path + ".tmp", path)
    return n_pos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the class-folder tree")
    ap.add_argument("--category", required=True, help="the rare category (a Fashion-MNIST class)")
    ap.add_argument("--share", type=float, default=0.05, help="its share of the pool")
    ap.add_argument("--size", type=int, default=6000, help="images in the pool")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw")
    args = ap.parse_args(argv)
    n = write_tree(args.out, args.category, args.share, args.size, args.seed)
    print(f"{args.size:,} images under {args.out}, {n:,} of them {args.category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
