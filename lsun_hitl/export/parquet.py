"""The final manifests as Parquet, hive-partitioned by category, to any fsspec URL."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..progress import Progress
from ..storage import Storage
from .dataset import SPLITS, dataset_batches, dataset_files, pool_rows
from .encoding import convert_images, left_out
from .report import ExportError, ExportReport
from .staging import export_target, timed_export

_WITH_IMAGES_BATCH = 512  # pool rows per batch when image bytes ride along, bounding memory


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
    """The final manifests as Parquet under ``out``, one file per category in a hive layout.

    Files are ``category=<c>/part-0.parquet``, so ``pyarrow.dataset``/pandas/DuckDB read the folder as
    one table with a ``category`` column; each is written atomically.

    Parameters
    ----------
    out, out_options
        Any fsspec URL or local path, and its storage options (by default those of ``storage`` when
        both are remote).
    with_images
        Add a column ``image``: the original file's bytes (images that cannot be read are left out).
    splits
        The labels to export.
    batch_size, threads
        Pool rows read at a time (512 with images), and threads fetching images.
    """
    target = export_target(storage, out, out_options)
    report = ExportReport("parquet", target.url)
    for category in categories:
        dataset_files(storage, category)  # a clear error before anything is written
    total = pool_rows(storage, categories)
    with timed_export(report):
        for n, category in enumerate(categories):
            batches = partial(
                dataset_batches,
                storage,
                category,
                batch_size=batch_size if not with_images else _WITH_IMAGES_BATCH,
                splits=splits,
                progress=progress,
                progress_offset=n * total // len(categories),
                progress_total=total,
            )
            part = _CategoryPart(category, batches, storage, with_images, threads)
            target.write_stream(target.path(f"category={category}", "part-0.parquet"), part.write)
            report.skipped += part.skipped
            report.written[category] = part.rows
    return report


def _original(data: bytes, _fmt: str | None) -> bytes:
    return data


class _CategoryPart:
    """Writes one category's Parquet file; ``rows`` and ``skipped`` say what the last write put in it.

    Parameters
    ----------
    batches
        Starts reading the category's dataset (again, when a failed write is retried).
    storage, with_images, threads
        Where the images are, whether to add their bytes as a column ``image``, and threads fetching them.
    """

    def __init__(
        self,
        category: str,
        batches: Callable[[], Iterator[pa.Table]],
        storage: Storage,
        with_images: bool,
        threads: int,
    ) -> None:
        self.category = category
        self.batches = batches
        self.storage = storage
        self.with_images = with_images
        self.threads = threads
        self.rows = 0
        self.skipped: list[tuple[str, str]] = []

    def write(self, f: Any) -> None:
        self.rows = 0
        self.skipped = []  # a retried write starts over
        writer = None
        for batch in self.batches():
            table = batch.drop_columns(["category"])  # the partition key, as the hive layout carries it
            if self.with_images:
                table = self._with_images(table)
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table)
            self.rows += table.num_rows
        if writer is None:
            raise ExportError(f"the dataset of {self.category!r} has no rows to export")
        writer.close()

    def _with_images(self, table: pa.Table) -> pa.Table:
        """``table`` with an ``image`` column of the original files, less the images left out."""
        blobs = convert_images(table, self.storage, _original, self.threads)
        self.skipped += left_out(table.column("uri").to_pylist(), blobs)
        keep = np.array([isinstance(b, bytes) for b in blobs], bool)
        return table.filter(pa.array(keep)).append_column(
            "image", pa.array([b for b in blobs if isinstance(b, bytes)], pa.binary())
        )
