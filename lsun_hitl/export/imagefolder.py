"""ImageFolder trees for ``torchvision.datasets.ImageFolder``, per category or combined into one class
per image (several categories' positives resolved by ``resolve_classes``)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ingest import pool_reading
from ..progress import Progress
from ..storage import Storage
from .dataset import dataset_batches, dataset_files, pool_rows, to_mask
from .encoding import convert_images, folder_file, left_out
from .report import ExportError, ExportReport
from .staging import Staging, local_dir, timed_export, write_skipped

RULES = ("human-first", "drop")

Put = Callable[[pa.Table, list[str]], None]


def resolve_classes(
    positive: np.ndarray, by_people: np.ndarray, confidence: np.ndarray, rule: str = "human-first"
) -> tuple[np.ndarray, np.ndarray]:
    """One class per image from several categories' binary decisions.

    Parameters
    ----------
    positive
        (N, C) bool: image n was decided a positive of category c.
    by_people
        (N, C) bool: that decision came from people (their labels or a review).
    confidence
        (N, C) float: confidence in that decision (people's posterior, the model's probability).
    rule
        ``"human-first"``: among the categories an image is positive for, people's decisions beat the
        model's, then the higher confidence wins, then the category listed first. ``"drop"``: an image
        positive for more than one category gets no class.

    Returns
    -------
    winner : numpy.ndarray
        (N,) int, the class index (-1: positive for no category, or dropped).
    claims : numpy.ndarray
        (N,) int, how many categories claimed the image (> 1 is a conflict).

    Raises
    ------
    ExportError
        ``rule`` is not one of ``RULES``.
    """
    if rule not in RULES:
        raise ExportError(f"unknown conflict rule {rule!r}; choose from {', '.join(RULES)}")
    positive = np.asarray(positive, bool)
    claims = positive.sum(axis=1)
    key = np.where(positive, by_people.astype(np.float64) * 2.0 + np.clip(np.nan_to_num(confidence), 0, 1), -1.0)
    winner = np.argmax(key, axis=1)  # argmax keeps the first of equal keys: the category listed first
    winner = np.where(claims > 0, winner, -1)
    if rule == "drop":
        winner = np.where(claims > 1, -1, winner)
    return winner, claims


def export_imagefolder(
    storage: Storage,
    categories: Sequence[str],
    out: str,
    *,
    splits: Sequence[str] = ("positive", "negative"),
    combined: bool = False,
    rule: str = "human-first",
    short_side: int | None = None,
    batch_size: int = 1024,
    threads: int = 4,
    progress: Progress | None = None,
) -> ExportReport:
    """An ImageFolder tree under ``out`` (a local directory), files named ``<image_id><ext>``.

    One category: ``out/positive/``, ``out/negative/`` (the ``splits`` asked). Several:
    ``out/<category>/positive/``... — an image in every category it was decided for. ``combined``: one
    folder per category holding each image that is a positive somewhere, in the single class
    ``resolve_classes(rule)`` gives it; ``conflicts.csv`` lists the images several categories claimed and
    ``labels.csv`` every exported image's class. ``skipped.csv`` lists the images left out.

    Parameters
    ----------
    short_side
        Resize so the shorter side is this many pixels (re-encoding every image); ``None`` keeps the
        original files where torchvision opens their format.
    batch_size, threads
        Pool rows read at a time, and threads fetching and encoding them.
    """
    out = local_dir(out, "ImageFolder")
    for c in categories:
        dataset_files(storage, c)
    if len(set(categories)) != len(categories) or not categories:
        raise ExportError(f"give each category once, got {list(categories)}")
    report = ExportReport("imagefolder-combined" if combined else "imagefolder", out)
    stage = Staging(out)
    put = _FolderWriter(storage, stage.path, report, short_side, threads)
    with timed_export(report, [stage]):
        if combined:
            _combined(storage, categories, stage.path, rule, batch_size, put, progress)
        else:
            _per_category(storage, categories, splits, batch_size, put, progress)
        write_skipped(stage.path, report.skipped)
    return report


class _FolderWriter:
    """Writes images into class folders under ``root``, counting each per folder in ``report`` and
    listing there the ones left out."""

    def __init__(self, storage: Storage, root: str, report: ExportReport, short_side: int | None, threads: int) -> None:
        self.storage = storage
        self.root = root
        self.report = report
        self.short_side = short_side
        self.threads = threads
        self.max_pixels = pool_reading(storage).max_pixels  # decode under the limit the images were ingested with
        self.made: set[str] = set()

    def _encode(self, data: bytes, fmt: str | None) -> tuple[bytes, str]:
        return folder_file(data, fmt, self.short_side, self.max_pixels)

    def __call__(self, table: pa.Table, folders: list[str]) -> None:
        """Write the images of ``table``, each into its folder in ``folders`` (paths under ``root``)."""
        files = convert_images(table, self.storage, self._encode, self.threads)
        self.report.skipped += left_out(table.column("uri").to_pylist(), files)
        for image, folder, got in zip(table.column("image_id").to_pylist(), folders, files, strict=True):
            if isinstance(got, str):
                continue
            data, ext = got
            directory = os.path.join(self.root, folder)
            if directory not in self.made:
                os.makedirs(directory, exist_ok=True)
                self.made.add(directory)
            with open(os.path.join(directory, image + ext), "wb") as f:
                f.write(data)
            self.report.count(folder)


def _per_category(
    storage: Storage,
    categories: Sequence[str],
    splits: Sequence[str],
    batch_size: int,
    put: Put,
    progress: Progress | None,
) -> None:
    """Each category's images in folders named by label (under a folder per category when several)."""
    total = pool_rows(storage, categories)
    for n, c in enumerate(categories):
        for batch in dataset_batches(
            storage,
            c,
            batch_size=batch_size,
            splits=splits,
            progress=progress,
            progress_offset=n * total // len(categories),
            progress_total=total,
        ):
            labels = batch.column("label").to_pylist()
            put(batch, [lab if len(categories) == 1 else f"{c}/{lab}" for lab in labels])


def _combined(
    storage: Storage,
    categories: Sequence[str],
    directory: str,
    rule: str,
    batch_size: int,
    put: Put,
    progress: Progress | None,
) -> None:
    """Each image positive for some category in the folder of the one class ``rule`` gives it, with
    ``labels.csv`` and ``conflicts.csv`` in ``directory``."""
    streams = [dataset_batches(storage, c, batch_size=batch_size) for c in categories[1:]]
    streams.insert(0, dataset_batches(storage, categories[0], batch_size=batch_size, progress=progress))
    with (
        open(os.path.join(directory, "labels.csv"), "w", newline="") as lf,
        open(os.path.join(directory, "conflicts.csv"), "w", newline="") as cf,
    ):
        labels, conflicts = csv.writer(lf), csv.writer(cf)
        labels.writerow(["image_id", "uri", "class", "claimed_by"])
        conflicts.writerow(["image_id", "uri", "claimed_by", "class", "rule"])
        for batches in zip(*streams, strict=True):
            _check_same_pool(categories, batches)
            positive, by_people, confidence = _decisions(batches)
            winner, claims = resolve_classes(positive, by_people, confidence, rule)
            first = batches[0]
            ids, uris = first.column("image_id").to_pylist(), first.column("uri").to_pylist()
            for n in np.flatnonzero(claims > 1):
                claimed = _claimed_by(categories, positive[n])
                conflicts.writerow([ids[n], uris[n], claimed, categories[winner[n]] if winner[n] >= 0 else "", rule])
            keep = np.flatnonzero(winner >= 0)
            for n in keep:
                labels.writerow([ids[n], uris[n], categories[winner[n]], _claimed_by(categories, positive[n])])
            put(first.take(pa.array(keep)), [categories[w] for w in winner[keep]])


def _check_same_pool(categories: Sequence[str], batches: Sequence[pa.Table]) -> None:
    """ExportError unless the categories' batches hold the same images, in the same order."""
    first = batches[0]
    for c, b in zip(categories, batches, strict=True):
        if not b.column("image_id").equals(first.column("image_id")):
            raise ExportError(
                f"the datasets of {categories[0]!r} and {c!r} were built on different pools; "
                "finish both on the same pool before a combined export"
            )


def _decisions(batches: Sequence[pa.Table]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) arrays from the categories' batches of the same N images: decided positive, decided by
    people (not the model), and the confidence in that decision."""
    positive = np.stack([to_mask(pc.equal(b.column("label"), "positive")) for b in batches], axis=1)
    by_people = np.stack([to_mask(pc.not_equal(b.column("decided_by"), "model")) for b in batches], axis=1)
    confidence = np.stack([b.column("confidence").to_numpy(zero_copy_only=False) for b in batches], axis=1)
    return positive, by_people, confidence


def _claimed_by(categories: Sequence[str], positive: np.ndarray) -> str:
    """The categories an image is positive for, joined by ``;``."""
    return ";".join(c for c, p in zip(categories, positive, strict=True) if p)
