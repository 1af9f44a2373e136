"""Importing people's review of exported tasks: Label Studio's annotation export, stored as labels that
override the cascade's decisions in every later export (through ``review_labels``)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..labelfile import label_studio_answers
from ..labels import LabelError, validate_votes, write_votes
from ..storage import Storage
from .dataset import REVIEW, dataset_batches, dataset_files, parquet_batches, review_labels


@dataclass(frozen=True)
class ReviewReport:
    """What a Label Studio annotation export changed."""

    category: str
    answers: int
    reviewed: int
    stored: bool  # False: this very export had been imported before (nothing stored twice)
    changed: dict[str, int]

    def __str__(self) -> str:
        changes = ", ".join(f"{k} {v}" for k, v in self.changed.items()) or "none"
        again = "" if self.stored else " (this export was imported before: nothing stored again)"
        return (
            f"review of {self.category}: {self.answers} answers on {self.reviewed} images{again}; "
            f"labels changed: {changes}"
        )


def import_review(storage: Storage, category: str, path: str, *, batch_size: int = 65536) -> ReviewReport:
    """Store a Label Studio annotation export (JSON) of review tasks as people's labels of ``category``.

    Answers are stored append-only under the request ``review`` (one file per export, named by its
    content hash, so importing the same export twice stores it once); every export reads them back
    through ``review_labels``.

    Raises
    ------
    LabelError
        The file cannot be read, is not Label Studio's JSON export, or names an image that is not in
        the dataset (the whole file is refused).
    """
    dataset = dataset_files(storage, category)
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise LabelError(f"label file {path!r} cannot be read ({exc})") from exc
    frame = _answers(storage, dataset, category, path, raw, batch_size)
    before = _current_labels(storage, category, set(frame["image_id"]), batch_size)
    unknown = sorted(set(frame["image_id"]) - set(before))
    if unknown:
        raise LabelError(
            f"label file {path!r} names {len(unknown)} image(s) that are not in the dataset of "
            f"{category!r}, e.g. {unknown[:3]}; export review tasks from this dataset "
            f"(lsun-hitl export --format label-studio) and import their annotations"
        )
    table = validate_votes(frame, set(before), REVIEW)
    stored = write_votes(storage, category, REVIEW, table, "labelstudio-" + hashlib.sha256(raw).hexdigest()[:24])
    changed = _changes(before, review_labels(storage, category))
    return ReviewReport(category, len(frame), len(before), stored is not None, changed)


def _answers(
    storage: Storage, dataset: list[str], category: str, path: str, raw: bytes, batch_size: int
) -> pd.DataFrame:
    """Rows ``image_id, labeler, answer`` of the export ``raw`` (read from ``path``, named in errors)."""
    try:
        tasks = json.loads(raw)
        by_uri = _uri_ids(storage, dataset, tasks, batch_size)
        return label_studio_answers(tasks, by_uri, category)
    except LabelError as exc:
        raise LabelError(f"label file {path!r}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise LabelError(
            f"label file {path!r} is not Label Studio's JSON export ({exc}); export the project "
            "as JSON in Label Studio and give that file"
        ) from exc


def _current_labels(storage: Storage, category: str, images: set[str], batch_size: int) -> dict[str, str]:
    """``{image_id: label}`` in the dataset as exported now, of those of ``images`` it holds."""
    wanted = pa.array(sorted(images), pa.string())
    labels: dict[str, str] = {}
    for batch in dataset_batches(storage, category, batch_size=batch_size):
        hit = batch.filter(pc.is_in(batch.column("image_id"), value_set=wanted))
        labels.update(zip(hit.column("image_id").to_pylist(), hit.column("label").to_pylist(), strict=True))
    return labels


def _changes(before: dict[str, str], verdict: dict[str, bool]) -> dict[str, int]:
    """How many labels the review changed, by ``"<old>-><new>"``, in the order the images come."""
    changed: Counter[str] = Counter()
    for image, old in before.items():
        if image in verdict:
            new = "positive" if verdict[image] else "negative"
            if new != old:
                changed[f"{old}->{new}"] += 1
    return dict(changed)


def _uri_ids(storage: Storage, dataset: list[str], tasks: Any, batch_size: int) -> pa.Table:
    """``image_id, uri`` of the dataset images that tasks without ``data.image_id`` name by URI."""
    uris = []
    if isinstance(tasks, list):
        uris = [
            t["data"].get("image")
            for t in tasks
            if isinstance(t, dict)
            and isinstance(t.get("data"), dict)
            and not t["data"].get("image_id")
            and t["data"].get("image")
        ]
    parts = []
    if uris:
        want = pa.array(sorted(set(uris)), pa.string())
        for b in parquet_batches(storage, dataset, ["image_id", "uri"], batch_size):
            parts.append(b.filter(pc.is_in(b.column("uri"), value_set=want)))
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string())])
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()
