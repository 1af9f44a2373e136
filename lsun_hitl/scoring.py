"""Score every candidate image with the iteration's model, distributed on Dask.

The driver writes the candidates (image_id, uri) as one Parquet file whose row groups are the
partitions; each Dask task reads its row group, opens the storage itself (no filesystem object is
shipped), reads the images through fsspec in batches while the previous batch runs through the
model, and writes ``scores/<category>/iteration=<k>/part-<i>.parquet``. A part that already exists
is not scored again, so a retried or resumed step does only the missing work.

Memory per worker: the model, one partition's ids and uris, and two decoded batches
(``batch_size * image_size**2 * 3`` bytes each): about 30 MB at the defaults.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap
threshold at 64 KiB: every batch tensor is then mmap'ed and unmapped again, and scoring runs at half
speed (measured: 638 vs 1,364 images/s on one core). The worker task restores glibc's dynamic
thresholds for its process (``_tune_malloc``); memory then goes back to the OS in larger steps.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client
from fsspec.core import url_to_fs

from .cluster import run_on_dask
from .ingest import read_pool
from .progress import Progress
from .storage import Storage, scores_dir

SCORE_SCHEMA = pa.schema([("image_id", pa.string()), ("score", pa.float32()), ("error", pa.string())])
_MODEL_CACHE: dict[str, Any] = {}


def _model(storage: Storage, model_path: str) -> Any:
    from . import model as model_lib

    if model_path not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[model_path] = model_lib.load(storage.read_bytes(model_path)).to(model_lib.device())
    return _MODEL_CACHE[model_path]


def _read_batch(uris: list[str], options: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, list]:
    from .model import decode_many

    fs, _ = url_to_fs(uris[0], **options)
    paths = [url_to_fs(u, **options)[1] for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):
        got = {paths[0]: got}
    blobs, errors = [], []
    for p in paths:
        data = got.get(p)
        if isinstance(data, BaseException) or data is None:
            errors.append(f"unreadable: {type(data).__name__}: {data}")
            blobs.append(b"")
        else:
            errors.append(None)
            blobs.append(data)
    images, ok = decode_many(blobs, size, threads=2)
    errors = [e if e is not None or k else "not a decodable image" for e, k in zip(errors, ok, strict=True)]
    return images, ok, errors


def read_pool_images(storage: Storage, rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode the pool images at ``rows`` in this process: ``(images (N, size, size, 3) uint8, ok (N,))``.

    For the few thousand images a step trains or calibrates on; the whole pool is scored on Dask.
    """
    table = read_pool(storage, columns=["uri"])
    uris = table.column("uri").take(pa.array(rows, pa.int64())).to_pylist()
    images = np.zeros((len(rows), size, size, 3), np.uint8)
    ok = np.zeros(len(rows), bool)
    for start in range(0, len(uris), 512):
        imgs, good, _ = _read_batch(uris[start : start + 512], storage.options, size)
        images[start : start + len(good)], ok[start : start + len(good)] = imgs, good
    return images, ok


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Let glibc keep batch-sized buffers instead of mmap/munmap on every batch (Linux only)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 128 << 20)
    except OSError:  # not glibc: nothing to do
        pass


def score_partition(
    part: int,
    *,
    storage: Storage,
    candidates_path: str,
    model_path: str,
    out_dir: str,
    batch_size: int = 256,
    threads: int = 1,
) -> int:
    """Score row group ``part`` of the candidates file (runs on a Dask worker); return rows written."""
    import torch

    from .model import predict

    out_path = f"{out_dir}/part-{part:05d}.parquet"
    if storage.exists(out_path):
        return pq.ParquetFile(storage.fs.open(out_path, "rb")).metadata.num_rows
    torch.set_num_threads(threads)
    _tune_malloc()
    with storage.fs.open(candidates_path, "rb") as f:
        rows = pq.ParquetFile(f).read_row_group(part)
    model = _model(storage, model_path)
    ids = rows.column("image_id").to_pylist()
    uris = rows.column("uri").to_pylist()
    batches = [uris[i : i + batch_size] for i in range(0, len(uris), batch_size)]
    scores = np.full(len(uris), np.nan, np.float32)
    errors: list[str | None] = []
    with ThreadPoolExecutor(max_workers=1) as reader:  # decode batch i+1 while batch i runs
        pending = reader.submit(_read_batch, batches[0], storage.options, model.image_size) if batches else None
        for i in range(len(batches)):
            images, ok, errs = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(_read_batch, batches[i + 1], storage.options, model.image_size)
            start = i * batch_size
            if ok.any():
                scores[start : start + len(ok)][ok] = predict(model, images[ok], batch_size)
            errors.extend(errs)
    table = pa.table(
        {"image_id": ids, "score": pa.array(scores, from_pandas=True), "error": errors}, schema=SCORE_SCHEMA
    )
    storage.write_table(out_path, table)
    return table.num_rows


def score_candidates(
    storage: Storage,
    category: str,
    iteration: int,
    candidates: pa.Table,
    model_path: str,
    *,
    client: Client | None,
    partition_size: int = 4000,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> pa.Table:
    """Score ``candidates`` (image_id, uri) on ``client``; return (image_id, score, error) in input order.

    ``score`` is null where the image could not be read or decoded; ``error`` says why.
    """
    out_dir = storage.path(scores_dir(category, iteration))
    cand_path = f"{out_dir}/candidates.parquet"
    n_parts = max(1, -(-candidates.num_rows // partition_size))
    if not storage.exists(cand_path) or _row_count(storage, cand_path) != candidates.num_rows:
        storage.write_table(cand_path, candidates.select(["image_id", "uri"]), row_group_size=partition_size)
    if candidates.num_rows == 0:
        return SCORE_SCHEMA.empty_table()
    threads = 1 if client is not None else min(4, len(os.sched_getaffinity(0)))  # never more than the cores we have
    run_on_dask(
        client,
        score_partition,
        list(range(n_parts)),
        progress=progress,
        storage=storage,
        candidates_path=cand_path,
        model_path=model_path,
        out_dir=out_dir,
        batch_size=batch_size,
        threads=threads,
    )
    parts = [storage.read_table(f"{out_dir}/part-{i:05d}.parquet") for i in range(n_parts)]
    scores = pa.concat_tables(parts)
    if scores.column("image_id") != candidates.column("image_id"):
        raise RuntimeError(
            f"scores under {storage.url_of(scores_dir(category, iteration))} do not match the "
            "candidates; delete that folder and run the step again"
        )
    return scores


def _row_count(storage: Storage, path: str) -> int:
    with storage.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
