"""A second real labeled image set, offline: scikit-learn's 1,797 handwritten digits as a class-folder tree.

    python benchmarks/digits_tree.py --out /data/digits/images
    lsun-hitl ingest --root /data/digits --images /data/digits/images
    lsun-hitl truth --root /data/digits --folder /data/digits/images
    lsun-hitl simulate --root /data/digits --categories 3 8 --seeds 0 1 2 --allow-small-pool ...

The images ship inside scikit-learn (``sklearn.datasets.load_digits``: 8 x 8 pixels, 16 grey levels, from
the UCI optical recognition of handwritten digits set), so nothing is downloaded. Each is written as a PNG at
``<out>/<digit>/<index>.png``, scaled to 0-255 and enlarged to 32 x 32 (nearest neighbour, so the pixels are
the data set's). Nobody tuned the cascade on them: they are the check on data other than Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image


def write_tree(out: str, limit: int | None = None) -> int:
    """Write the digits (the first ``limit``, or all) under ``out``; return how many. Rewrites identical files."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(n):
        folder = os.path.join(out, str(int(targets[i])))
        os.makedirs(folder, exist_ok=True)
        pixels = (np.asarray(images[i]) * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).save(os.path.join(folder, f"{i:04d}.png"))
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the class-folder tree")
    ap.add_argument("--limit", type=int, help="only the first N digits")
    args = ap.parse_args(argv)
    print(f"digits: {write_tree(args.out, args.limit)} images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
