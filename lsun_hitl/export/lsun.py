"""LSUN's release format: one LMDB per category and part, keyed by image id, holding JPEGs.

Read by ``torchvision.datasets.LSUN`` (which accepts only LSUN's ten scene names) or, for any name,
``torchvision.datasets.lsun.LSUNClass``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..ingest import pool_reading
from ..progress import Progress
from ..storage import Storage
from .dataset import SPLITS, dataset_batches
from .encoding import convert_images, left_out, lsun_jpeg
from .report import ExportError, ExportReport
from .staging import Staging, local_dir, timed_export


def in_val(image_ids: Sequence[str], val_fraction: float) -> np.ndarray:
    """Whether each image goes to the validation LMDB: a stable function of its id alone."""
    if val_fraction <= 0:
        return np.zeros(len(image_ids), bool)
    h = np.array([int(hashlib.blake2b(i.encode(), digest_size=8).hexdigest(), 16) for i in image_ids], np.float64)
    return h / 2.0**64 < val_fraction


def export_lsun(
    storage: Storage,
    category: str,
    out: str,
    *,
    name: str | None = None,
    split: str = "positive",
    short_side: int = 256,
    quality: int = 75,
    val_fraction: float = 0.0,
    batch_size: int = 512,
    threads: int = 4,
    progress: Progress | None = None,
) -> ExportReport:
    """One LMDB per category in LSUN's release format under ``out`` (a local directory).

    ``<name>_train_lmdb`` (and ``<name>_val_lmdb`` when ``val_fraction`` > 0): keys the image ids
    (ASCII), values JPEGs resized so the shorter side is ``short_side``. Read back with
    ``torchvision.datasets.lsun.LSUNClass(root=<out>/<name>_train_lmdb)``. The images left out are
    listed in ``<out>/skipped-<name>.csv``.

    Parameters
    ----------
    name
        The LMDBs' name (default: the category).
    split
        Which images: LSUN released each category's positives.
    short_side, quality
        The JPEGs' shorter side in pixels and their quality.
    val_fraction
        The share of images, chosen by ``in_val``, that go to the validation LMDB.
    batch_size, threads
        Pool rows read at a time, and threads fetching and encoding them.
    """
    if split not in SPLITS:
        raise ExportError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise ExportError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = local_dir(out, "LSUN (LMDB)")
    name = name or category
    parts = ["train"] + (["val"] if val_fraction > 0 else [])
    staging = {part: Staging(os.path.join(out, f"{name}_{part}_lmdb")) for part in parts}
    report = ExportReport("lsun", out, skipped_file=f"skipped-{name}.csv")
    max_pixels = pool_reading(storage).max_pixels  # decode under the limit the images were ingested with

    def encode(data: bytes, _fmt: str | None) -> bytes:
        return lsun_jpeg(data, short_side, quality, max_pixels)

    with timed_export(report, list(staging.values()), skipped_dir=out), _lmdbs(staging) as envs:
        for batch in dataset_batches(storage, category, batch_size=batch_size, progress=progress):
            chosen = batch.filter(pc.equal(batch.column("label"), split))
            jpegs = convert_images(chosen, storage, encode, threads)
            _put_batch(envs, chosen.column("image_id").to_pylist(), jpegs, val_fraction, report)
            report.skipped += left_out(chosen.column("uri").to_pylist(), jpegs)
    return report


@contextmanager
def _lmdbs(staging: dict[str, Staging]) -> Iterator[dict[str, Any]]:
    """An LMDB environment in each staged directory, by part: synced to disk when the block succeeds,
    closed in any case (before the directories are committed or removed)."""
    import lmdb

    envs: dict[str, Any] = {}
    try:
        for part, stage in staging.items():
            envs[part] = lmdb.open(stage.path, map_size=1 << 30, subdir=True, meminit=False)
        yield envs
        for env in envs.values():
            env.sync()
    finally:
        for env in envs.values():
            env.close()


def _put_batch(
    envs: dict[str, Any], ids: list[str], jpegs: list[bytes | str], val_fraction: float, report: ExportReport
) -> None:
    """Write the encoded images of one batch to the train or val LMDB ``in_val`` picks, counting each part."""
    val = in_val(ids, val_fraction)
    for part, env in envs.items():
        items = [
            (i.encode("ascii"), j)
            for i, j, v in zip(ids, jpegs, val, strict=True)
            if isinstance(j, bytes) and v == (part == "val")
        ]
        _lmdb_put(env, items)
        report.count(part, len(items))


def _lmdb_put(env: Any, items: list[tuple[bytes, bytes]]) -> None:
    """Write ``items`` in one transaction, growing the map when it is full."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
