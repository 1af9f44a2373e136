"""Export finished datasets in the formats the field reads.

Every export reads ``datasets/<category>/dataset.parquet`` (what the cascade decided, one row per pool
image, in pool order) beside ``pool/images.parquet``, in fixed-size batches: memory stays bounded by the
batch size whatever the pool size. Labels people gave in a review (``import_review``) override the
cascade's decision for the images they reviewed.

- ``export_lsun``: LSUN's release format, one LMDB per category (``<name>_train_lmdb``, and
  ``<name>_val_lmdb`` with ``val_fraction``): key the image id, value a JPEG (quality 75) resized so its
  shorter side is 256. Read by ``torchvision.datasets.LSUN`` (which accepts only LSUN's ten scene names)
  or, for any name, ``torchvision.datasets.lsun.LSUNClass``.
- ``export_parquet``: the final manifest with labels, scores and provenance (optionally the image bytes),
  hive-partitioned by category (``<out>/category=<c>/part-0.parquet``).
- ``export_imagefolder``: ``positive/`` and ``negative/`` folders per category for
  ``torchvision.datasets.ImageFolder``; with ``combined=True`` one folder per category holding the
  images resolved to that class by ``resolve_classes`` (conflicts listed in ``conflicts.csv``).
- ``export_label_studio``: Label Studio tasks (JSON) with the model's score as a prediction, and the
  labeling config they need; ``import_review`` stores Label Studio's annotation export back as labels.

An image several category flows decided positive is exported once per category it belongs to. Image files
are checked against their content id before export; one that changed or vanished since ingest is left
out and listed (``ExportReport.skipped``, ``skipped.csv``). Folder and LMDB exports are built beside their
destination and moved into place when complete; Parquet and JSON are written atomically through the
storage root's rules, to any fsspec URL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image, ImageOps

from .images import ImageError, _open, to_rgb
from .ingest import image_id as content_id
from .labels import LabelError, aggregate, read_votes, usable_votes, validate_votes, write_votes
from .progress import Progress
from .storage import POOL, Storage, dataset_key, storage_options_from_env

SPLITS = ("positive", "negative", "unresolved")
REVIEW = "review"  # the request id under which review answers are stored (labels/<c>/votes/request=review/)
# formats torchvision's ImageFolder opens, by PIL format name; anything else is re-encoded as PNG
FOLDER_EXT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".ppm"}
RULES = ("human-first", "drop")
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Header value="$question"/>
  <Choices name="answer" toName="image" choice="single" showInline="true">
    <Choice value="Yes"/>
    <Choice value="No"/>
    <Choice value="Unsure"/>
  </Choices>
</View>
"""


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the input and the fix."""


@dataclass
class ExportReport:
    """What an export wrote: images (or rows) per class, and the images left out with the reason."""

    format: str
    out: str
    written: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    skipped_file: str = "skipped.csv"

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "out": self.out,
            "written": self.written,
            "skipped": [list(s) for s in self.skipped],
            "seconds": round(self.seconds, 2),
        }

    def __str__(self) -> str:
        what = ", ".join(f"{k} {v:,}" for k, v in self.written.items()) or "nothing"
        text = f"{self.format} export -> {self.out}: {what} ({self.seconds:.1f} s)"
        if self.skipped:
            text += f"\n  {len(self.skipped)} image(s) left out, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"
        return text


# ---- reading a finished dataset, in batches --------------------------------------------------------------
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


def _parquet_batches(storage: Storage, path: str, columns: list[str], size: int) -> Iterator[pa.Table]:
    with storage.fs.open(path, "rb") as f:
        yield from _rebatch(pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns), size)


def dataset_path(storage: Storage, category: str) -> str:
    path = storage.path(dataset_key(category))
    if not storage.exists(path):
        raise ExportError(
            f"category {category!r} has no finished dataset ({path} is missing); run its cascade to the end "
            f"(lsun-hitl run --root {storage.url} --category {category}) before exporting"
        )
    return path


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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


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
    """The final dataset of ``category`` in tables of ``batch_size`` pool rows (fewer after filtering by
    ``splits``), each row: image_id, uri, category, label, decided_by (human / model / review),
    decided_iteration, score (the model's logit), probability (its sigmoid), p_positive (people's
    aggregated answer), confidence (in the label: p_positive for people, probability for the model, the
    review's majority share for reviews), width, height, format.

    ``progress(progress_offset + pool rows done, progress_total)`` is called once the caller is done
    with each batch (total: the pool's size unless given)."""
    bad = set(splits) - set(SPLITS)
    if bad:
        raise ExportError(f"unknown split(s) {sorted(bad)}; choose from {', '.join(SPLITS)}")
    path = dataset_path(storage, category)
    reviews = review_labels(storage, category)
    review_ids = pa.array(list(reviews), pa.string())
    review_pos = pa.array(list(reviews.values()), pa.bool_())
    cols = ["image_id", "uri", "label", "decided_by", "decided_iteration", "score", "p_positive"]
    pool_cols = ["image_id", "width", "height", "format"]
    pool = _parquet_batches(storage, storage.path(POOL), pool_cols, batch_size)
    total = progress_total if progress_total is not None else _total(storage, [category])
    seen = progress_offset
    for d in _parquet_batches(storage, path, cols, batch_size):
        p = next(pool, None)
        if p is None or p.num_rows != d.num_rows or not p.column("image_id").equals(d.column("image_id")):
            raise ExportError(
                f"the dataset of {category!r} does not match the pool in {storage.path(POOL)} (was the pool "
                f"rebuilt after the run?); finish the cascade again on this pool before exporting"
            )
        label = d.column("label").cast(pa.string())
        by = d.column("decided_by").cast(pa.string())
        score = d.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        prob = _sigmoid(score)
        p_pos = d.column("p_positive").to_numpy(zero_copy_only=False).astype(np.float64)
        is_pos = np.asarray(pc.equal(label, "positive").to_numpy(zero_copy_only=False), bool)
        human = np.asarray(pc.equal(by, "human").to_numpy(zero_copy_only=False), bool)
        conf_pos = np.where(human, np.nan_to_num(p_pos, nan=0.5), prob)
        confidence = np.where(is_pos, conf_pos, 1.0 - conf_pos)
        if len(reviews):
            idx = pc.index_in(d.column("image_id"), value_set=review_ids)
            hit = np.asarray(pc.is_valid(idx).to_numpy(zero_copy_only=False), bool)
            if hit.any():
                verdict = review_pos.take(pc.drop_null(idx)).to_numpy(zero_copy_only=False)
                lab = np.array(label.to_pylist(), dtype=object)
                lab[hit] = np.where(verdict, "positive", "negative")
                label = pa.array(lab, pa.string())
                bys = np.array(by.to_pylist(), dtype=object)
                bys[hit] = "review"
                by = pa.array(bys, pa.string())
                confidence[hit] = 1.0
        table = pa.table(
            {
                "image_id": d.column("image_id"),
                "uri": d.column("uri"),
                "category": pa.array([category] * d.num_rows, pa.string()),
                "label": label,
                "decided_by": by,
                "decided_iteration": d.column("decided_iteration"),
                "score": pa.array(score, pa.float32()),
                "probability": pa.array(prob, pa.float32()),
                "p_positive": pa.array(p_pos, pa.float32()),
                "confidence": pa.array(confidence, pa.float32()),
                "width": p.column("width"),
                "height": p.column("height"),
                "format": p.column("format"),
            }
        )
        if tuple(splits) != SPLITS:
            table = table.filter(pc.is_in(table.column("label"), value_set=pa.array(list(splits), pa.string())))
        yield table
        seen += d.num_rows
        if progress:
            progress(seen, total)


# ---- image bytes -------------------------------------------------------------------------------------
def fetch(uris: Sequence[str], image_ids: Sequence[str], storage_options: dict[str, Any]) -> list[bytes | str]:
    """The bytes of each image, or the reason it cannot be exported (unreadable, or changed since ingest:
    its content no longer matches its id). Reads run concurrently on object stores."""
    if not uris:
        return []
    fs, _ = url_to_fs(uris[0], **storage_options)
    paths = [url_to_fs(u, **storage_options)[1] for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):
        got = {paths[0]: got}
    out: list[bytes | str] = []
    for path, want in zip(paths, image_ids, strict=True):
        data = got.get(path)
        if isinstance(data, BaseException) or data is None:
            out.append(f"unreadable ({type(data).__name__}: {data})")
        elif content_id(data) != want:
            out.append("the file changed since ingest (its content no longer matches its image id)")
        else:
            out.append(data)
    return out


def _decode(data: bytes) -> Image.Image:
    img = _open(data)
    try:
        img = ImageOps.exif_transpose(img)
        img.seek(0) if getattr(img, "is_animated", False) else None
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Scale so the shorter side is ``short_side`` pixels (up or down), keeping the aspect ratio."""
    w, h = img.size
    scale = short_side / min(w, h)
    size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
    if size == (w, h):
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0 if scale < 1 else None)


def lsun_jpeg(data: bytes, short_side: int = 256, quality: int = 75) -> bytes:
    """An image as LSUN released it: RGB JPEG, quality 75, shorter side 256 pixels."""
    img = resize_short_side(_decode(data), short_side)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def folder_file(data: bytes, fmt: str | None, short_side: int | None = None) -> tuple[bytes, str]:
    """Bytes and file extension for an ImageFolder tree: the original file when torchvision opens its
    format and no resizing is asked, else re-encoded (JPEG sources as JPEG quality 90, others PNG)."""
    if short_side is None and fmt in FOLDER_EXT:
        return data, FOLDER_EXT[fmt]
    img = _decode(data)
    if short_side is not None:
        img = resize_short_side(img, short_side)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _convert_all(
    table: pa.Table, storage: Storage, convert: Callable[[bytes, str | None], Any], threads: int
) -> list[Any | str]:
    """``convert(bytes, format)`` over the images of ``table`` in threads; a str result is a skip reason."""
    blobs = fetch(table.column("uri").to_pylist(), table.column("image_id").to_pylist(), storage.options)

    def one(item: tuple[bytes | str, str | None]) -> Any:
        data, fmt = item
        if isinstance(data, str):
            return data
        try:
            return convert(data, fmt)
        except ImageError as exc:
            return f"not exportable: {exc}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, zip(blobs, table.column("format").to_pylist(), strict=True)))


def _total(storage: Storage, categories: Sequence[str]) -> int:
    path = storage.path(POOL)
    with storage.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows * len(categories)


# ---- local destinations, built beside and moved into place -----------------------------------------------
def _local_dir(out: str, what: str) -> str:
    if "://" in out and not out.startswith("file://"):
        raise ExportError(
            f"the {what} export is written to a local directory (its readers open files on disk), not {out!r}; "
            "give --out a local path and copy the result to object storage afterwards if needed"
        )
    return os.path.abspath(out.removeprefix("file://"))


class _Staging:
    """A temporary directory beside ``final``; ``commit`` replaces ``final`` with it in one rename
    (the old content is removed only after the new one is in place), ``abort`` removes it."""

    def __init__(self, final: str) -> None:
        self.final = final
        parent = os.path.dirname(final) or "."
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)

    def commit(self) -> None:
        old = None
        if os.path.exists(self.final):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(self.final)}-", dir=os.path.dirname(self.final))
            os.replace(self.final, os.path.join(old, "x"))
        os.replace(self.path, self.final)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_skipped(directory: str, skipped: list[tuple[str, str]], name: str = "skipped.csv") -> None:
    """The images left out and why, as CSV (removed when nothing was: a re-export leaves no stale list)."""
    path = os.path.join(directory, name)
    if not skipped:
        if os.path.exists(path):
            os.unlink(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "reason"])
        w.writerows(skipped)
    os.replace(tmp, path)


# ---- LSUN's LMDB ---------------------------------------------------------------------------------------
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
    """One LMDB per category in LSUN's release format under ``out``: ``<name>_train_lmdb`` (and
    ``<name>_val_lmdb`` when ``val_fraction`` > 0), keys the image ids (ASCII), values JPEG bytes.

    ``name`` defaults to the category; ``split`` is which images (LSUN released each category's
    positives). Read back with ``torchvision.datasets.lsun.LSUNClass(root=<out>/<name>_train_lmdb)``."""
    import lmdb

    if split not in SPLITS:
        raise ExportError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise ExportError(f"val_fraction must be in [0, 1), got {val_fraction}")
    started = time.time()
    out = _local_dir(out, "LSUN (LMDB)")
    name = name or category
    parts = ["train"] + (["val"] if val_fraction > 0 else [])
    staging = {part: _Staging(os.path.join(out, f"{name}_{part}_lmdb")) for part in parts}
    report = ExportReport("lsun", out, skipped_file=f"skipped-{name}.csv")
    envs = {part: lmdb.open(s.path, map_size=1 << 30, subdir=True, meminit=False) for part, s in staging.items()}
    try:
        for batch in dataset_batches(storage, category, batch_size=batch_size, progress=progress):
            chosen = batch.filter(pc.equal(batch.column("label"), split))
            jpegs = _convert_all(chosen, storage, lambda data, _fmt: lsun_jpeg(data, short_side, quality), threads)
            ids = chosen.column("image_id").to_pylist()
            val = in_val(ids, val_fraction)
            for part in parts:
                items = [
                    (i.encode("ascii"), j)
                    for i, j, v in zip(ids, jpegs, val, strict=True)
                    if isinstance(j, bytes) and v == (part == "val")
                ]
                _lmdb_put(envs[part], items)
                report.written[part] = report.written.get(part, 0) + len(items)
            report.skipped += [
                (u, j) for u, j in zip(chosen.column("uri").to_pylist(), jpegs, strict=True) if isinstance(j, str)
            ]
        for env in envs.values():
            env.sync()
            env.close()
        for s in staging.values():
            s.commit()
    except BaseException:
        for env in envs.values():
            env.close()
        for s in staging.values():
            s.abort()
        raise
    _write_skipped(out, report.skipped, report.skipped_file)
    report.seconds = time.time() - started
    return report


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


# ---- Parquet ---------------------------------------------------------------------------------------------
def _target(storage: Storage, out: str, options: dict[str, Any] | None) -> Storage:
    """Where a Parquet or Label Studio export goes: a local folder, or a URL with its own storage options
    (default: those of ``storage``, so an export beside a remote root needs none; else the
    environment's, ``LSUN_HITL_STORAGE_OPTIONS`` or the standard AWS settings)."""
    if "://" not in out:
        return Storage(os.path.abspath(out))
    if options is None:
        options = storage.options if not storage.is_local else storage_options_from_env()
    return Storage(out, options)


def export_parquet(
    storage: Storage,
    categories: Sequence[str],
    out: str,
    *,
    with_images: bool = False,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 4096,
    threads: int = 4,
    out_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """The final manifests as Parquet under ``out`` (any fsspec URL; ``out_options`` its storage options,
    by default those of ``storage`` when both are remote), one file per category in a hive layout
    (``category=<c>/part-0.parquet``, so ``pyarrow.dataset``/pandas/DuckDB read the folder as one table
    with a ``category`` column). ``with_images`` adds ``image`` (the original file's bytes)."""
    started = time.time()
    target = _target(storage, out, out_options)
    report = ExportReport("parquet", target.url)
    for category in categories:
        dataset_path(storage, category)  # a clear error before anything is written
    total = _total(storage, categories)
    for n, category in enumerate(categories):
        rows = 0
        skipped: list[tuple[str, str]] = []

        def write(f: Any, n: int = n, category: str = category, skipped: list = skipped) -> None:
            nonlocal rows
            rows = 0
            skipped.clear()  # a retried write starts over
            writer = None
            for batch in dataset_batches(
                storage,
                category,
                batch_size=batch_size if not with_images else 512,
                splits=splits,
                progress=progress,
                progress_offset=n * total // len(categories),
                progress_total=total,
            ):
                table = batch.drop_columns(["category"])  # the partition key, as the hive layout carries it
                if with_images:
                    blobs = _convert_all(table, storage, lambda data, _fmt: data, threads)
                    keep = np.array([isinstance(b, bytes) for b in blobs], bool)
                    skipped.extend(
                        (u, b)
                        for u, b in zip(table.column("uri").to_pylist(), blobs, strict=True)
                        if isinstance(b, str)
                    )
                    table = table.filter(pa.array(keep)).append_column(
                        "image", pa.array([b for b in blobs if isinstance(b, bytes)], pa.binary())
                    )
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema, compression="zstd")
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                raise ExportError(f"the dataset of {category!r} has no rows to export")
            writer.close()

        target.write_stream(target.path(f"category={category}", "part-0.parquet"), write)
        report.skipped += skipped
        report.written[category] = rows
    report.seconds = time.time() - started
    return report


# ---- ImageFolder -------------------------------------------------------------------------------------------
def resolve_classes(
    positive: np.ndarray, by_people: np.ndarray, confidence: np.ndarray, rule: str = "human-first"
) -> tuple[np.ndarray, np.ndarray]:
    """One class per image from several categories' binary decisions.

    Args:
        positive: (N, C) bool, image n was decided a positive of category c.
        by_people: (N, C) bool, that decision came from people (their labels or a review).
        confidence: (N, C) float, confidence in that decision (people's posterior, the model's probability).
        rule: ``"human-first"``: among the categories an image is positive for, people's decisions beat
            the model's, then the higher confidence wins, then the category listed first. ``"drop"``:
            an image positive for more than one category gets no class.

    Returns:
        (N,) int, the class index (-1: positive for no category, or dropped), and (N,) int, how many
        categories claimed the image (> 1 is a conflict).
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
    ``labels.csv`` every exported image's class."""
    started = time.time()
    out = _local_dir(out, "ImageFolder")
    for c in categories:
        dataset_path(storage, c)
    if len(set(categories)) != len(categories) or not categories:
        raise ExportError(f"give each category once, got {list(categories)}")
    report = ExportReport("imagefolder-combined" if combined else "imagefolder", out)
    stage = _Staging(out)
    made: set[str] = set()

    def put(table: pa.Table, folders: list[str]) -> None:
        files = _convert_all(table, storage, lambda data, fmt: folder_file(data, fmt, short_side), threads)
        for image, uri, folder, got in zip(
            table.column("image_id").to_pylist(), table.column("uri").to_pylist(), folders, files, strict=True
        ):
            if isinstance(got, str):
                report.skipped.append((uri, got))
                continue
            data, ext = got
            directory = os.path.join(stage.path, folder)
            if directory not in made:
                os.makedirs(directory, exist_ok=True)
                made.add(directory)
            with open(os.path.join(directory, image + ext), "wb") as f:
                f.write(data)
            report.written[folder] = report.written.get(folder, 0) + 1

    try:
        if combined:
            _combined(storage, categories, stage.path, rule, batch_size, put, progress)
        else:
            total = _total(storage, categories)
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
        _write_skipped(stage.path, report.skipped)
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    report.seconds = time.time() - started
    return report


def _combined(
    storage: Storage,
    categories: Sequence[str],
    directory: str,
    rule: str,
    batch_size: int,
    put: Callable[[pa.Table, list[str]], None],
    progress: Progress | None,
) -> None:
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
            first = batches[0]
            for c, b in zip(categories, batches, strict=True):
                if not b.column("image_id").equals(first.column("image_id")):
                    raise ExportError(
                        f"the datasets of {categories[0]!r} and {c!r} were built on different pools; "
                        "finish both on the same pool before a combined export"
                    )
            positive = np.stack(
                [
                    np.asarray(pc.equal(b.column("label"), "positive").to_numpy(zero_copy_only=False), bool)
                    for b in batches
                ],
                axis=1,
            )
            by_people = np.stack(
                [
                    np.asarray(pc.not_equal(b.column("decided_by"), "model").to_numpy(zero_copy_only=False), bool)
                    for b in batches
                ],
                axis=1,
            )
            confidence = np.stack([b.column("confidence").to_numpy(zero_copy_only=False) for b in batches], axis=1)
            winner, claims = resolve_classes(positive, by_people, confidence, rule)
            ids, uris = first.column("image_id").to_pylist(), first.column("uri").to_pylist()
            for n in np.flatnonzero(claims > 1):
                claimed = ";".join(c for c, p in zip(categories, positive[n], strict=True) if p)
                conflicts.writerow([ids[n], uris[n], claimed, categories[winner[n]] if winner[n] >= 0 else "", rule])
            keep = np.flatnonzero(winner >= 0)
            for n in keep:
                claimed = ";".join(c for c, p in zip(categories, positive[n], strict=True) if p)
                labels.writerow([ids[n], uris[n], categories[winner[n]], claimed])
            put(first.take(pa.array(keep)), [categories[w] for w in winner[keep]])


# ---- Label Studio --------------------------------------------------------------------------------------
def _image_url(template: str, uri: str, image_id: str, storage: Storage) -> str:
    root = storage.url_of("")
    path = uri[len(root) :].lstrip("/") if uri.startswith(root) else uri.split("://", 1)[-1]
    return template.format(uri=uri, image_id=image_id, path=path)


def export_label_studio(
    storage: Storage,
    category: str,
    out: str,
    *,
    splits: Sequence[str] = SPLITS,
    decided_by: Sequence[str] = ("human", "model", "review"),
    image_url: str = "{uri}",
    batch_size: int = 4096,
    out_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Label Studio tasks for reviewing a category: ``<out>/tasks.json`` (a JSON list, written in a
    stream) and ``<out>/label_config.xml`` (the labeling interface the tasks' predictions refer to).

    Each task's ``data`` holds ``image`` (``image_url`` with ``{uri}``, ``{path}`` — the image's path
    under the storage root — or ``{image_id}``; e.g. ``/data/local-files/?d=lsun/{path}`` for Label
    Studio's local storage), ``image_id``, ``question``, the cascade's ``label``, ``decided_by`` and
    ``decided_iteration``. Images the model scored carry a prediction: its choice (the dataset's label)
    and its probability as ``score``. People's answers come back with ``import_review``."""
    started = time.time()
    dataset_path(storage, category)
    target = _target(storage, out, out_options)
    report = ExportReport("label-studio", target.url)
    question = f"Is this a {category}?"
    written = 0

    def write(f: Any) -> None:
        nonlocal written
        written = 0
        f.write(b"[")
        for batch in dataset_batches(storage, category, batch_size=batch_size, splits=splits, progress=progress):
            batch = batch.filter(pc.is_in(batch.column("decided_by"), value_set=pa.array(list(decided_by))))
            rows = batch.select(["image_id", "uri", "label", "decided_by", "decided_iteration", "probability"])
            for r in rows.to_pylist():
                task: dict[str, Any] = {
                    "data": {
                        "image": _image_url(image_url, r["uri"], r["image_id"], storage),
                        "image_id": r["image_id"],
                        "question": question,
                        "label": r["label"],
                        "decided_by": r["decided_by"],
                        "decided_iteration": r["decided_iteration"],
                    }
                }
                p = r["probability"]
                if p is not None and p == p:
                    yes = r["label"] == "positive" if r["label"] != "unresolved" else p >= 0.5
                    task["predictions"] = [
                        {
                            "model_version": f"lsun-hitl {category} iteration {r['decided_iteration']}",
                            "score": round(float(p), 6),
                            "result": [
                                {
                                    "from_name": "answer",
                                    "to_name": "image",
                                    "type": "choices",
                                    "value": {"choices": ["Yes" if yes else "No"]},
                                }
                            ],
                        }
                    ]
                f.write((",\n" if written else "\n").encode() + json.dumps(task).encode())
                written += 1
        f.write(b"\n]\n")

    target.write_stream(target.path("tasks.json"), write)
    target.write_bytes(target.path("label_config.xml"), LABEL_STUDIO_CONFIG.encode())
    report.written["tasks"] = written
    report.seconds = time.time() - started
    return report


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
    through ``review_labels``. A task whose image is not in the dataset refuses the whole file."""
    from .labelfile import _label_studio

    dataset = dataset_path(storage, category)
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise LabelError(f"label file {path!r} cannot be read ({exc})") from exc
    try:
        tasks = json.loads(raw)
        by_uri = _uri_ids(storage, dataset, tasks, batch_size)
        frame = _label_studio(tasks, by_uri, category)
    except LabelError as exc:
        raise LabelError(f"label file {path!r}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise LabelError(
            f"label file {path!r} is not Label Studio's JSON export ({exc}); export the project "
            "as JSON in Label Studio and give that file"
        ) from exc
    wanted = pa.array(sorted(set(frame["image_id"])), pa.string())
    known: set[str] = set()
    before: dict[str, str] = {}
    for batch in dataset_batches(storage, category, batch_size=batch_size):
        hit = batch.filter(pc.is_in(batch.column("image_id"), value_set=wanted))
        known.update(hit.column("image_id").to_pylist())
        before.update(zip(hit.column("image_id").to_pylist(), hit.column("label").to_pylist(), strict=True))
    unknown = sorted(set(frame["image_id"]) - known)
    if unknown:
        raise LabelError(
            f"label file {path!r} names {len(unknown)} image(s) that are not in the dataset of "
            f"{category!r}, e.g. {unknown[:3]}; export review tasks from this dataset "
            f"(lsun-hitl export --format label-studio) and import their annotations"
        )
    table = validate_votes(frame, known, REVIEW)
    stored = write_votes(storage, category, REVIEW, table, "labelstudio-" + hashlib.sha256(raw).hexdigest()[:24])
    verdict = review_labels(storage, category)
    changed: dict[str, int] = {}
    for image, old in before.items():
        if image in verdict:
            new = "positive" if verdict[image] else "negative"
            if new != old:
                changed[f"{old}->{new}"] = changed.get(f"{old}->{new}", 0) + 1
    return ReviewReport(category, len(frame), len(before), stored is not None, changed)


def _uri_ids(storage: Storage, dataset: str, tasks: Any, batch_size: int) -> pa.Table:
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
        for b in _parquet_batches(storage, dataset, ["image_id", "uri"], batch_size):
            parts.append(b.filter(pc.is_in(b.column("uri"), value_set=want)))
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string())])
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()
