"""Fashion-MNIST importer: real product images as PNG files, plus a separate ground-truth table.

The Debian package ``dataset-fashion-mnist`` installs the 70,000 images in
``/usr/share/datasets/fashion-mnist``. The importer writes each one as a PNG under the storage root
(``images/fashion-mnist/<split>/<index>.png``) and the classes to ``groundtruth/fashion-mnist.parquet``.
Only the simulated crowd and the evaluation read the ground truth; the pipeline never does.
"""

from __future__ import annotations

import gzip
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from PIL import Image

from .progress import Progress
from .storage import Storage, groundtruth_key

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DATASET = "fashion-mnist"
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def check_category(category: str) -> str:
    """Return ``category`` if it is a Fashion-MNIST class name, else raise naming the choices."""
    if category not in CLASSES:
        raise ValueError(f"unknown Fashion-MNIST category {category!r}; choose one of: {', '.join(CLASSES)}")
    return category


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_arrays(source_dir: str = DEFAULT_DIR) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(split, images (N, 28, 28) uint8, labels (N,) uint8), ...]`` from the idx files."""
    out = []
    for split, (img_file, lbl_file) in _FILES.items():
        img_path = os.path.join(source_dir, img_file)
        if not os.path.exists(img_path):
            raise FileNotFoundError(
                f"Fashion-MNIST not found at {img_path}; install it with "
                "`apt-get install -y dataset-fashion-mnist` or pass --source-dir"
            )
        out.append((split, _read_idx(img_path), _read_idx(os.path.join(source_dir, lbl_file))))
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def import_fashion_mnist(
    storage: Storage,
    *,
    source_dir: str = DEFAULT_DIR,
    limit: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> str:
    """Write the images as PNGs under ``storage`` and the ground truth table; return the image prefix.

    ``limit`` keeps a seeded random subset of that many images (for quick runs and tests).
    Idempotent: files are content-identical on a second run, and ground truth is rewritten atomically.
    """
    items = [
        (split, i, img, int(lbl))
        for split, imgs, lbls in load_arrays(source_dir)
        for i, (img, lbl) in enumerate(zip(imgs, lbls, strict=True))
    ]
    if limit is not None and limit < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
        items = [items[i] for i in keep]
    prefix = f"images/{DATASET}"
    keys = [f"{prefix}/{split}/{i:05d}.png" for split, i, _, _ in items]
    fs = storage.fs
    chunk = 500
    done = 0
    if storage.is_local:
        for split in _FILES:
            os.makedirs(storage.path(prefix, split), exist_ok=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            blobs = list(pool.map(lambda it: png_bytes(it[2]), part))
            paths = [storage.path(k) for k in keys[start : start + chunk]]
            if storage.is_local:
                for p, b in zip(paths, blobs, strict=True):
                    with open(p, "wb") as f:
                        f.write(b)
            else:
                fs.pipe(dict(zip(paths, blobs, strict=True)))
            done += len(part)
            if progress:
                progress(done, len(items))
    truth = pa.table(
        {
            "uri": [storage.url_of(k) for k in keys],
            "class_index": pa.array([it[3] for it in items], pa.int8()),
            "class_name": [CLASSES[it[3]] for it in items],
        }
    )
    storage.write_table(storage.path(groundtruth_key(DATASET)), truth)
    return storage.url_of(prefix)
