"""Reading a finished dataset, in batches, with people's reviews applied.

A category's dataset (``datasets/<category>/dataset/``: what the cascade decided, one row per pool image, in
pool order, in committed parts; an older root's one ``dataset.parquet`` also reads) is read beside
``pool/images.parquet`` in fixed-size batches, its parts one after another, so memory stays bounded by the
batch size whatever the pool size. Labels people gave in a review (stored under the
request ``review``) override the cascade's decision for the images they reviewed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..dataset_parts import dataset_files as finished_files
from ..labels import aggregate, read_votes, usable_votes
from ..progress import Progress
from ..storage import POOL, Storage, dataset_dir
from .report import ExportError

SPLITS = ("positive", "negative", "unresolved")
REVIEW = "review"  # the request id under which review answers are stored (labels/<c>/votes/request=review/)
_DATASET_COLUMNS = ["image_id", "uri", "label", "decided_by", "decided_iteration", "score", "p_positive"]
_POOL_COLUMNS = ["image_id", "width", "height", "format"]

Column = pa.Array | pa.ChunkedArray


def to_mask(values: Column) -> np.ndarray:
    """A boolean Arrow column as a numpy bool array (null counts as False)."""
    return np.asarray(values.to_numpy(zero_copy_only=False), bool)


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may be shorter) from batches of any sizes."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        buf.append(b)
        n += b.num_rows
        while n >= size:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, size)
            rest = table.slice(size)
            buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf)


def _file_batches(storage: Storage, paths: Sequence[str], columns: list[str], size: int) -> Iterator[pa.RecordBatch]:
    for path in paths:  # one file open at a time
        with storage.fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns)


def parquet_batches(storage: Storage, paths: Sequence[str], columns: list[str], size: int) -> Iterator[pa.Table]:
    """The ``columns`` of the Parquet files at ``paths``, read one after another as one table, in tables of
    ``size`` rows (the last may be shorter; a table may span two files)."""
    yield from _rebatch(_file_batches(storage, paths, columns, size), size)


def dataset_files(storage: Storage, category: str) -> list[str]:
    """The files of ``category``'s finished dataset, in pool order (``dataset_parts.dataset_files``);
    ExportError naming the command to run if it has none."""
    files = finished_files(storage, category)
    if files is None:
        raise ExportError(
            f"category {category!r} has no finished dataset ({storage.url_of(dataset_dir(category))} is missing); "
            f"run its cascade to the end (lsun-hitl run --root {storage.url} --category {category}) before exporting"
        )
    return files


def pool_rows(storage: Storage, categories: Sequence[str]) -> int:
    """Rows an export over ``categories`` reads: the pool's size once per category (its progress total)."""
    path = storage.path(POOL)
    with storage.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows * len(categories)


def review_labels(storage: Storage, category: str) -> dict[str, bool]:
    """People's review verdicts: ``{image_id: is a <category>}`` by majority of the review answers
    (``unsure`` carries no vote; a tie leaves the image out, so the cascade's label stands)."""
    votes = read_votes(storage, category, REVIEW)
    if votes.num_rows == 0:
        return {}
    agg = aggregate(usable_votes(votes), method="majority")
    out = {}
    for image, p in zip(agg.column("image_id").to_pylist(), agg.column("p_positive").to_pylist(), strict=True):
        if p is not None and p == p and p != 0.5:
            out[image] = p > 0.5
    return out


def dataset_batches(
    storage: Storage,
    category: str,
    *,
    batch_size: int = 4096,
    splits: Sequence[str] = SPLITS,
    progress: Progress | None = None,
    progress_offset: int = 0,
    progress_total: int | None = None,
) -> Iterator[pa.Table]:
    """The final dataset of ``category``, in tables of ``batch_size`` pool rows (fewer after filtering).

    Each row: image_id, uri, category, label, decided_by (human / model / review), decided_iteration,
    score (the model's logit), probability (its sigmoid), p_positive (people's aggregated answer),
    confidence (in the label: p_positive for people, probability for the model, 1 for reviews), width,
    height, format.

    Parameters
    ----------
    storage, category
        The storage root and the category, whose cascade has finished.
    batch_size
        Pool rows per table.
    splits
        The labels to keep (all of ``SPLITS`` by default).
    progress, progress_offset, progress_total
        ``progress(progress_offset + pool rows done, progress_total)`` is called once the caller is
        done with each table (total: the pool's size unless given).

    Raises
    ------
    ExportError
        An unknown split, a category without a finished dataset, or a dataset built on another pool.
    """
    bad = set(splits) - set(SPLITS)
    if bad:
        raise ExportError(f"unknown split(s) {sorted(bad)}; choose from {', '.join(SPLITS)}")
    files = dataset_files(storage, category)
    reviews = review_labels(storage, category)
    review_ids = pa.array(list(reviews), pa.string())
    review_pos = pa.array(list(reviews.values()), pa.bool_())
    pool = parquet_batches(storage, [storage.path(POOL)], _POOL_COLUMNS, batch_size)
    total = progress_total if progress_total is not None else pool_rows(storage, [category])
    seen = progress_offset
    for d in parquet_batches(storage, files, _DATASET_COLUMNS, batch_size):
        p = next(pool, None)
        if p is None or p.num_rows != d.num_rows or not p.column("image_id").equals(d.column("image_id")):
            raise ExportError(
                f"the dataset of {category!r} does not match the pool in {storage.path(POOL)} (was the pool "
                f"rebuilt after the run?); finish the cascade again on this pool before exporting"
            )
        table = _final_table(category, d, p, review_ids, review_pos)
        if tuple(splits) != SPLITS:
            table = table.filter(pc.is_in(table.column("label"), value_set=pa.array(list(splits), pa.string())))
        yield table
        seen += d.num_rows
        if progress:
            progress(seen, total)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _final_table(
    category: str, decided: pa.Table, pool: pa.Table, review_ids: pa.Array, review_pos: pa.Array
) -> pa.Table:
    """One batch of the dataset as ``dataset_batches`` yields it, from the same rows of the cascade's
    decisions and of the pool; ``review_ids`` (with verdicts ``review_pos``) override the decisions."""
    label = decided.column("label").cast(pa.string())
    by = decided.column("decided_by").cast(pa.string())
    score = decided.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    prob = _sigmoid(score)
    p_pos = decided.column("p_positive").to_numpy(zero_copy_only=False).astype(np.float64)
    confidence = _confidence(label, by, prob, p_pos)
    if len(review_ids):
        label, by, confidence = _apply_reviews(
            decided.column("image_id"), label, by, confidence, review_ids, review_pos
        )
    return pa.table(
        {
            "image_id": decided.column("image_id"),
            "uri": decided.column("uri"),
            "category": pa.array([category] * decided.num_rows, pa.string()),
            "label": label,
            "decided_by": by,
            "decided_iteration": decided.column("decided_iteration"),
            "score": pa.array(score, pa.float32()),
            "probability": pa.array(prob, pa.float32()),
            "p_positive": pa.array(p_pos, pa.float32()),
            "confidence": pa.array(confidence, pa.float32()),
            "width": pool.column("width"),
            "height": pool.column("height"),
            "format": pool.column("format"),
        }
    )


def _confidence(label: Column, by: Column, prob: np.ndarray, p_pos: np.ndarray) -> np.ndarray:
    """Confidence in each label: people's aggregated answer for their decisions (0.5 when they gave
    none), the model's probability for its own."""
    is_pos = to_mask(pc.equal(label, "positive"))
    human = to_mask(pc.equal(by, "human"))
    conf_pos = np.where(human, np.nan_to_num(p_pos, nan=0.5), prob)
    return np.where(is_pos, conf_pos, 1.0 - conf_pos)


def _apply_reviews(
    image_ids: Column,
    label: Column,
    by: Column,
    confidence: np.ndarray,
    review_ids: pa.Array,
    review_pos: pa.Array,
) -> tuple[Column, Column, np.ndarray]:
    """``label``, ``decided_by`` and ``confidence`` with each reviewed image given the review's verdict,
    decided by ``review``, with confidence 1."""
    idx = pc.index_in(image_ids, value_set=review_ids)
    hit = to_mask(pc.is_valid(idx))
    if not hit.any():
        return label, by, confidence
    verdict = review_pos.take(pc.drop_null(idx)).to_numpy(zero_copy_only=False)
    labels = np.array(label.to_pylist(), dtype=object)
    labels[hit] = np.where(verdict, "positive", "negative")
    bys = np.array(by.to_pylist(), dtype=object)
    bys[hit] = "review"
    confidence[hit] = 1.0
    return pa.array(labels, pa.string()), pa.array(bys, pa.string()), confidence
