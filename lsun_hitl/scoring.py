"""Score every candidate image with the iteration's model, distributed on Dask.

The driver writes the candidates (image_id, uri) as one Parquet file whose row groups are the
partitions; each Dask task reads its row group, opens the storage itself (no filesystem object is
shipped), reads the images through fsspec in batches while the previous batch runs through the
model, and writes ``scores/<category>/iteration=<k>/part-<i>.parquet``. A part that already exists
is not scored again, so a retried or resumed step does only the missing work.

With the model-input cache (``lsun_hitl.inputs``, the cascade's default) a partition is one shard of
the pool: a shard some earlier pass of any category stored is read instead of its images; the first
pass decodes the whole shard, stores it, then scores its candidates. A frozen-backbone model goes one step
further (``lsun_hitl.features``): the first pass on its backbone also stores the shard's features, and every
later model on that backbone scores the shard from them.

What ingest recorded about the pool (``ingest.pool_reading``) is read once by the driver and passed to the
tasks: every decode applies the pixel limit the pool was ingested under, and each image's bytes are checked
against its content id (``ingest.image_id``) before it is decoded, so a file replaced since ingest is not
scored as if it were the image ingest accepted. Its score is null and its ``error`` says why, as for a file
deleted since, or an image that does not decode (the reason's sentence, ``images.ImageError``).

Memory per worker: the model, one partition's ids and uris, and two decoded batches
(``batch_size * image_size**2 * 3`` bytes each): about 30 MB at the defaults; with the cache, one
shard of model inputs (about 64 MiB, ``inputs.shard_rows_for``) instead of the batches.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap
threshold at 64 KiB: every batch tensor is then mmap'ed and unmapped again, and scoring runs at half
speed (measured: 638 vs 1,364 images/s on one core). The worker task restores glibc's dynamic
thresholds for its process (``_tune_malloc``); memory then goes back to the OS in larger steps.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client
from fsspec.core import url_to_fs

from .cluster import run_on_dask
from .features import FeatureCache
from .images import DEFAULT_MAX_PIXELS
from .ingest import PoolReading, image_id, pool_reading, read_pool_rows, take_pool, unreadable
from .inputs import INDEX_SCHEMA, InputCache
from .progress import Progress
from .steps import peak_rss_mb
from .storage import POOL, Storage, scores_dir

CHANGED = "the file changed since ingest (its content no longer matches its image id); ingest again to score it"
SCORE_SCHEMA = pa.schema([("image_id", pa.string()), ("score", pa.float32()), ("error", pa.string())])
_MODEL_CACHE: dict[str, Any] = {}


def _model(storage: Storage, model_path: str) -> Any:
    from . import model as model_lib

    if model_path not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        net = model_lib.for_inference(model_lib.load(storage.read_bytes(model_path)))
        _MODEL_CACHE[model_path] = net.to(model_lib.device())
    return _MODEL_CACHE[model_path]


def read_batch(
    uris: list[str],
    options: dict[str, Any],
    size: int,
    image_ids: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list]:
    """Read and decode ``uris`` (one filesystem request for all) into model inputs.

    With ``image_ids`` (the pool's content ids of those files) a file whose bytes no longer match its id
    (replaced since ingest) is not decoded. ``max_pixels`` is the pool's pixel limit. Returns the images
    (len(uris), size, size, 3) uint8 (zeros where one did not decode), a bool mask of those that decoded, and
    each one's error (None where it decoded): why it could not be read, changed, or the decoder's reason.
    """
    from .model import decode_each

    fs, _ = url_to_fs(uris[0], **options)
    paths = [url_to_fs(u, **options)[1] for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):
        got = {paths[0]: got}
    blobs, errors = [], []
    for i, p in enumerate(paths):
        data = got.get(p)
        if isinstance(data, BaseException) or data is None:
            errors.append(unreadable(data))
            blobs.append(b"")
        elif image_ids is not None and image_id(data) != image_ids[i]:
            errors.append(CHANGED)
            blobs.append(b"")
        else:
            errors.append(None)
            blobs.append(data)
    todo = [i for i, e in enumerate(errors) if e is None]
    images = np.zeros((len(uris), size, size, 3), np.uint8)
    if todo:
        decoded, reasons = decode_each([blobs[i] for i in todo], size, threads=2, max_pixels=max_pixels)
        images[todo] = decoded
        for i, reason in zip(todo, reasons, strict=True):
            errors[i] = reason
    return images, np.array([e is None for e in errors], bool), errors


def read_pool_images(
    storage: Storage, rows: np.ndarray, size: int, cache: InputCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The model inputs of the pool images at ``rows``, in this process: ``(images (N, size, size, 3) uint8, ok (N,))``.

    For the images a step trains or calibrates on; the whole pool is scored on Dask. With ``cache``, rows whose
    shard is stored are read from it and only the others are decoded (``pool_reading``: under the pool's pixel
    limit; a file that changed since ingest is not usable, ``ok`` False, as one that does not decode).
    """
    rows = np.asarray(rows, np.int64)
    if cache is not None:
        images, ok, cached = cache.take(rows)
    else:
        images, ok, cached = np.zeros((len(rows), size, size, 3), np.uint8), np.zeros(len(rows), bool), None
    todo = np.arange(len(rows)) if cached is None else np.flatnonzero(~cached)
    if len(todo):
        files = take_pool(storage, rows[todo], columns=["uri", "image_id"])
        uris, ids = files.column("uri").to_pylist(), files.column("image_id").to_pylist()
        reading = pool_reading(storage)
        for start in range(0, len(uris), 512):
            end = start + 512
            check = ids[start:end] if reading.content_ids else None
            imgs, good, _ = read_batch(uris[start:end], storage.options, size, check, reading.max_pixels)
            at = todo[start : start + len(good)]
            images[at], ok[at] = imgs, good
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


def _decoded(rows: pa.Table, options: dict[str, Any], size: int, batch_size: int, reading: PoolReading) -> Iterator:
    """``read_batch`` over the files of ``rows`` (uri, image_id) in batches, as ``reading`` says (the pool's
    pixel limit; checked against their ids where those are content ids), reading and decoding batch i+1 while
    batch i is used."""
    uris, ids = rows.column("uri").to_pylist(), rows.column("image_id").to_pylist()
    batches = [(uris[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, len(uris), batch_size)]

    def read(i: int) -> tuple:
        check = batches[i][1] if reading.content_ids else None
        return read_batch(batches[i][0], options, size, check, reading.max_pixels)

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, 0) if batches else None
        for i in range(len(batches)):
            got = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(read, i + 1)
            yield got


def _decode_all(rows: pa.Table, options: dict[str, Any], size: int, batch_size: int, reading: PoolReading) -> tuple:
    """``(images (N, size, size, 3) uint8, ok (N,), errors)`` of every file of ``rows``, decoded batch after
    batch."""
    images = np.zeros((rows.num_rows, size, size, 3), np.uint8)
    ok = np.zeros(rows.num_rows, bool)
    errors: list[str | None] = []
    start = 0
    for imgs, good, errs in _decoded(rows, options, size, batch_size, reading):
        images[start : start + len(good)], ok[start : start + len(good)] = imgs, good
        errors.extend(errs)
        start += len(good)
    return images, ok, errors


def score_group(
    item: tuple[int, str, int, int],
    *,
    storage: Storage,
    model_path: str,
    out_dir: str,
    batch_size: int = 256,
    threads: int = 1,
    cache: InputCache | None = None,
    reading: PoolReading | None = None,
) -> dict[str, Any]:
    """``(part, plan file, row group, candidates in it)``: score that row group of a scoring plan into
    ``part-<part>.parquet`` (runs on a Dask worker).

    Without ``cache`` the row group holds the candidates to score and each image is read and decoded.
    With it the row group holds one shard of the pool (every row of it when the shard is not cached yet,
    else only its candidates, flagged by the ``candidate`` column): a cached shard is read instead of its
    images; a missing one is decoded whole, stored, then scored. Returns the counts ``scored``, ``valid`` (a
    score, not an unreadable image), ``decoded`` and ``from_cache`` (scored from a shard stored earlier), and
    the ``worker`` (host:pid) with its ``peak_rss_mb`` (its high-water mark since it started). Images are
    read as ``reading`` (``ingest.pool_reading``; its defaults when None) says.

    A part already stored with as many rows is kept (a resumed step does only the missing work); one with
    another count was written by another plan and is scored again."""
    part, plan_path, group, expected = item
    out_path = f"{out_dir}/part-{part:05d}.parquet"
    if storage.exists(out_path):
        stored = _stored_part(storage, out_path)
        if stored["scored"] == expected:
            return stored
    rows = storage.read_row_group(plan_path, group)
    return _score_part(rows, storage, model_path, out_path, batch_size, threads, cache, reading or PoolReading())


def _stored_part(storage: Storage, out_path: str) -> dict[str, Any]:
    """``score_group``'s counts of a part stored earlier (nothing decoded or scored now)."""
    scores = storage.read_table(out_path, columns=["score"]).column("score")
    return {
        "scored": len(scores),
        "valid": len(scores) - scores.null_count,
        "decoded": 0,
        "from_cache": 0,
        "from_features": 0,
        "worker": _worker_name(),
        "peak_rss_mb": peak_rss_mb(),
    }


def _score_part(
    rows: pa.Table,
    storage: Storage,
    model_path: str,
    out_path: str,
    batch_size: int,
    threads: int,
    cache: InputCache | None,
    reading: PoolReading,
) -> dict[str, Any]:
    """Score one task's ``rows`` (see ``score_group``) and write them to ``out_path``; the task's counts."""
    import torch

    torch.set_num_threads(threads)
    _tune_malloc()
    model = _model(storage, model_path)
    from_features = 0
    if cache is None:
        ids, scores, errors = _score_decoded(rows, storage, model, batch_size, reading)
        decoded = len(ids)
    else:
        ids, scores, errors, decoded, from_features = _score_cached(rows, storage, model, batch_size, cache, reading)
    table = pa.table(
        {"image_id": ids, "score": pa.array(scores, from_pandas=True), "error": errors}, schema=SCORE_SCHEMA
    )
    storage.write_table(out_path, table)
    return {
        "scored": table.num_rows,
        "valid": int(np.isfinite(scores).sum()),
        "decoded": decoded,
        "from_cache": table.num_rows if cache is not None and not decoded else 0,
        "from_features": from_features,
        "worker": _worker_name(),
        "peak_rss_mb": peak_rss_mb(),
    }


def _score_decoded(
    rows: pa.Table, storage: Storage, model: Any, batch_size: int, reading: PoolReading
) -> tuple[list[str], np.ndarray, list[str | None]]:
    """Read, decode and score every row's image: (image ids, scores with NaN where one did not decode, errors)."""
    from .model import predict

    ids = rows.column("image_id").to_pylist()
    scores = np.full(len(ids), np.nan, np.float32)
    errors: list[str | None] = []
    start = 0
    for images, ok, errs in _decoded(rows, storage.options, model.image_size, batch_size, reading):
        if ok.any():
            scores[start : start + len(ok)][ok] = predict(model, images[ok], batch_size)
        errors.extend(errs)
        start += len(ok)
    return ids, scores, errors


def _score_cached(
    rows: pa.Table, storage: Storage, model: Any, batch_size: int, cache: InputCache, reading: PoolReading
) -> tuple[list[str], np.ndarray, list[str | None], int, int]:
    """Score the candidates of one pool shard from the input cache, decoding and storing the shard first if no
    pass has yet: (image ids, scores, errors, images decoded, images scored from stored features).

    A frozen-backbone model (one with a ``backbone_id``) scores from the shard's features in the feature cache
    when some pass stored them, reading no pixels; otherwise it computes them for the whole shard from its
    inputs and stores them first, for every later model on that backbone."""
    from .model import embed, precision_of, predict, predict_features

    shard = int(rows.column("row")[0].as_py()) // cache.shard_rows
    backbone = getattr(model, "backbone_id", None)
    precision = precision_of(next(model.parameters()).device)
    features = FeatureCache.beside(cache, backbone, precision) if backbone else None
    images: np.ndarray | None = None
    index = cache.read_index(shard) if features is not None and features.has(shard) else None
    decoded = 0
    if index is None:
        got = cache.read(shard)
        if got is None:  # the first pass over this shard, by any category: decode it whole and keep it
            images, ok, errs = _decode_all(rows, storage.options, cache.image_size, batch_size, reading)
            index = pa.table({"image_id": rows.column("image_id"), "ok": ok, "error": errs}, schema=INDEX_SCHEMA)
            cache.write(shard, images, index)
            decoded = rows.num_rows
        else:
            images, index = got
    want = rows.filter(rows.column("candidate"))
    offsets = want.column("row").to_numpy() - shard * cache.shard_rows
    if pc.any(pc.not_equal(index.column("image_id").take(pa.array(offsets)), want.column("image_id"))).as_py():
        raise RuntimeError(
            f"cached shard {shard} under {storage.url_of(cache.key)} does not hold this pool's images; delete "
            "that folder and score again"
        )
    ids = want.column("image_id").to_pylist()
    usable = index.column("ok").to_numpy(zero_copy_only=False)
    ok = usable[offsets]
    scores = np.full(len(ids), np.nan, np.float32)
    from_features = 0
    if features is not None and images is None:  # stored features: no pixels, no backbone
        if ok.any():
            scores[ok] = predict_features(model, features.take(shard, offsets[ok], index.num_rows))
        from_features = len(ids)
    elif features is not None:  # the first pass on this backbone: the whole shard's features, kept
        embedded = embed(model, images[usable], batch_size)
        every = np.zeros((len(usable), embedded.shape[1]), np.float32)
        every[usable] = embedded
        features.write(shard, every)
        if ok.any():
            scores[ok] = predict_features(model, every[offsets[ok]])
    elif ok.any():
        scores[ok] = predict(model, images[offsets[ok]], batch_size)
    errors = [
        e if e is not None or k else "not a decodable image"
        for e, k in zip(index.column("error").take(pa.array(offsets)).to_pylist(), ok, strict=True)
    ]
    return ids, scores, errors, decoded, from_features


def _peaks(counts: list[dict]) -> dict[str, float]:
    """Each worker's highest peak memory (MB) over the tasks it ran."""
    peaks: dict[str, float] = {}
    for c in counts:
        peaks[c["worker"]] = round(max(peaks.get(c["worker"], 0.0), c["peak_rss_mb"]), 1)
    return peaks


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def cache_plan(
    pool: pa.Table, rows: np.ndarray, cache: InputCache, offset: int = 0
) -> tuple[pa.Table, list[int], list[int]]:
    """The candidates file of a cached pass: one group per pool shard holding a candidate.

    ``pool`` holds the pool's rows ``offset`` onward (the whole pool by default) and ``rows`` the candidates'
    global rows, ascending. A shard already in ``cache`` contributes its candidate rows only; any other shard
    contributes every row (each must be decoded once to fill the shard), with ``candidate`` marking the ones
    to score. Returns ``(table with row, image_id, uri, candidate; the group sizes; candidates per group)``.
    """
    n = cache.shard_rows
    shards = np.unique(rows // n)
    done = cache.complete()
    take, flags, sizes, wanted = [], [], [], []
    for shard in shards.tolist():
        lo, hi = np.searchsorted(rows, [shard * n, (shard + 1) * n])
        if shard in done:
            group = rows[lo:hi]
            flag = np.ones(len(group), bool)
        else:
            group = np.arange(shard * n, min(offset + pool.num_rows, (shard + 1) * n))
            flag = np.zeros(len(group), bool)
            flag[group.searchsorted(rows[lo:hi])] = True
        take.append(group)
        flags.append(flag)
        sizes.append(len(group))
        wanted.append(int(hi - lo))
    index = np.concatenate(take) if take else np.zeros(0, np.int64)
    table = pool.select(["image_id", "uri"]).take(pa.array(index - offset, pa.int64()))
    table = table.add_column(0, "row", pa.array(index, pa.int64()))
    table = table.append_column("candidate", pa.array(np.concatenate(flags) if flags else np.zeros(0, bool)))
    return table, sizes, wanted


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
    pool: pa.Table | None = None,
    cache: InputCache | None = None,
) -> pa.Table:
    """Score ``candidates`` (image_id, uri) on ``client``; return (image_id, score, error) in input order.

    ``score`` is null where the image could not be read or decoded, or changed since ingest; ``error`` says
    why. With ``cache`` (and the whole ``pool``, whose ``row`` column ``candidates`` then carries, ascending)
    images are read from the model-input cache where it holds them and decoded into it where not. How many
    images were decoded is written beside the parts (``stats.json``).
    """
    out_dir = storage.path(scores_dir(category, iteration))
    cand_path = f"{out_dir}/candidates.parquet"
    if candidates.num_rows == 0:
        return SCORE_SCHEMA.empty_table()
    n = candidates.num_rows
    if cache is None:
        plan = candidates.select(["image_id", "uri"])
        sizes = wanted = [min(partition_size, n - i) for i in range(0, n, partition_size)]
    else:
        if pool is None or "row" not in candidates.column_names:
            raise ValueError("scoring from the input cache needs the pool and the candidates' pool rows")
        plan, sizes, wanted = cache_plan(pool, candidates.column("row").to_numpy(), cache)
    identity = (n, len(sizes), cache is not None)
    if not storage.exists(cand_path) or _plan_of(storage, cand_path) != identity:
        _write_plan(
            storage,
            cand_path,
            plan,
            sizes,
            {"candidates": str(n), "parts": str(len(sizes)), "cached": str(cache is not None)},
        )
    threads = 1 if client is not None else min(4, len(os.sched_getaffinity(0)))  # never more than the cores we have
    started = time.perf_counter()
    counts = run_on_dask(
        client,
        score_group,
        [(i, cand_path, i, c) for i, c in enumerate(wanted)],
        progress=progress,
        storage=storage,
        model_path=model_path,
        out_dir=out_dir,
        batch_size=batch_size,
        threads=threads,
        cache=cache,
        reading=pool_reading(storage),
    )
    parts = [storage.read_table(f"{out_dir}/part-{i:05d}.parquet") for i in range(len(sizes))]
    scores = pa.concat_tables(parts)
    if scores.column("image_id") != candidates.column("image_id"):
        raise RuntimeError(
            f"scores under {storage.url_of(scores_dir(category, iteration))} do not match the "
            "candidates; delete that folder and run the step again"
        )
    stats = {
        "candidates": candidates.num_rows,
        "part_rows": [len(p) for p in parts],
        "decoded": sum(c["decoded"] for c in counts),
        "from_cache": sum(c["from_cache"] for c in counts),
        "from_features": sum(c.get("from_features", 0) for c in counts),
        "seconds": time.perf_counter() - started,
        "cache": storage.url_of(cache.key) if cache is not None else None,
        "worker_peak_rss_mb": _peaks(counts),
    }
    storage.write_json(f"{out_dir}/stats.json", stats)
    return scores


def _write_plan(storage: Storage, path: str, plan: pa.Table, sizes: list[int], metadata: dict[str, str]) -> None:
    """A scoring plan: one row group per task (``sizes`` rows each), with ``metadata`` that identifies it."""
    schema = plan.schema.with_metadata(metadata)

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            offset = 0
            for size in sizes:
                if offset < plan.num_rows:
                    writer.write_table(plan.slice(offset, size).replace_schema_metadata(schema.metadata), size)
                offset += size

    storage.write_stream(path, write)


def _plan_of(storage: Storage, path: str) -> tuple[int, int, bool] | None:
    """(candidates, parts, cached) of a stored candidates file, or None for one written otherwise."""
    with storage.fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if b"candidates" not in meta:
        return None
    return int(meta[b"candidates"]), int(meta[b"parts"]), meta[b"cached"] == b"True"


# -- the flow's scoring step: planned range by range on the cluster ----------------------------------------


def score_ranges(starts: np.ndarray, shard_rows: int | None = None) -> list[tuple[int, int]]:
    """The pool's row ranges the scoring step plans one task each: the manifest's partitions (``starts``: each
    one's first row and the pool's size at the end), their bounds moved to the nearest shard boundary with the
    input cache so that no shard is split between two ranges. Empty ranges are dropped."""
    starts = np.asarray(starts, np.int64)
    n = int(starts[-1])
    if shard_rows:
        starts = np.minimum(np.round(starts / shard_rows).astype(np.int64) * shard_rows, n)
        starts[-1] = n
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a]


def plan_range(
    item: tuple[int, int, int],
    *,
    storage: Storage,
    category: str,
    iteration: int,
    n_rows: int,
    train: np.ndarray,
    plan_dir: str,
    partition_size: int,
    cache: InputCache | None,
) -> list[int]:
    """``(range number, first row, stop row)``: write the scoring plan of the pool's rows in that range, one
    row group per scoring task, and return how many candidates each task scores (runs on a Dask worker).

    The candidates (``manifest_parts.range_candidates``) with their uris from the pool's rows in range; without
    ``cache`` in tasks of ``partition_size``, with it one task per pool shard (``cache_plan``). A plan stored
    for the same range and settings is reused, so a resumed step scores what its parts were planned for."""
    from .manifest_parts import range_candidates

    r, lo, hi = item
    path = f"{plan_dir}/range-{r:05d}.parquet"
    identity = {"range": [lo, hi], "cached": cache is not None, "partition_size": partition_size}
    if storage.exists(path):
        with storage.fs.open(path, "rb") as f:
            meta = json.loads((pq.ParquetFile(f).schema_arrow.metadata or {}).get(b"plan", b"{}"))
        if {k: meta.get(k) for k in identity} == identity:
            return list(meta["counts"])
    rows, ids = range_candidates(storage, category, iteration, n_rows, lo, hi, train)
    pool = read_pool_rows(storage, lo, hi, columns=["image_id", "uri"])
    if not pool.column("image_id").take(pa.array(rows - lo, pa.int64())).combine_chunks().equals(ids):
        raise RuntimeError(
            f"the pool at {storage.url_of(POOL)} is not the one {category}'s manifest was built on (was it "
            "ingested again?); start the category over on this pool"
        )
    if cache is None:
        plan = pool.select(["image_id", "uri"]).take(pa.array(rows - lo, pa.int64()))
        sizes = [min(partition_size, len(rows) - i) for i in range(0, len(rows), partition_size)]
        counts = sizes
    else:
        plan, sizes, counts = cache_plan(pool, rows, cache, offset=lo)
    _write_plan(storage, path, plan, sizes, {"plan": json.dumps({**identity, "counts": counts})})
    return counts


def score_pool(
    storage: Storage,
    category: str,
    iteration: int,
    model_path: str,
    *,
    starts: np.ndarray,
    train: np.ndarray,
    client: Client | None,
    partition_size: int = 4000,
    batch_size: int = 256,
    progress: Progress | None = None,
    cache: InputCache | None = None,
) -> dict[str, Any]:
    """Score every candidate of ``iteration`` (the pool's rows unlabeled after ``iteration - 1`` less ``train``)
    on ``client``; return the step's figures, also written to ``stats.json`` beside the parts.

    Two maps and no whole-pool state here: each range of the manifest's partitions (``starts``,
    ``score_ranges``) plans its own candidates into scoring tasks, then every task scores its group into
    ``part-<i>.parquet``, numbered in candidate order (``part_rows`` lists their sizes: the split and the
    score lookups read them by position). ``scored`` counts the images given a score (not unreadable ones).
    """
    out_dir = storage.path(scores_dir(category, iteration))
    plan_dir = f"{out_dir}/plan"
    ranges = score_ranges(starts, cache.shard_rows if cache is not None else None)
    started = time.perf_counter()
    counts = run_on_dask(
        client,
        plan_range,
        [(r, lo, hi) for r, (lo, hi) in enumerate(ranges)],
        storage=storage,
        category=category,
        iteration=iteration,
        n_rows=int(starts[-1]),
        train=np.asarray(train, np.int64),
        plan_dir=plan_dir,
        partition_size=partition_size,
        cache=cache,
    )
    items = [(r, g, c) for r, cs in enumerate(counts) for g, c in enumerate(cs)]
    results = run_on_dask(
        client,
        score_group,
        [(i, f"{plan_dir}/range-{r:05d}.parquet", g, c) for i, (r, g, c) in enumerate(items)],
        progress=progress,
        storage=storage,
        model_path=model_path,
        out_dir=out_dir,
        batch_size=batch_size,
        threads=1 if client is not None else min(4, len(os.sched_getaffinity(0))),
        cache=cache,
        reading=pool_reading(storage),
    )
    stats = {
        "candidates": sum(c for _, _, c in items),
        "scored": sum(r["valid"] for r in results),
        "part_rows": [r["scored"] for r in results],
        "decoded": sum(r["decoded"] for r in results),
        "from_cache": sum(r["from_cache"] for r in results),
        "from_features": sum(r.get("from_features", 0) for r in results),
        "seconds": time.perf_counter() - started,
        "cache": storage.url_of(cache.key) if cache is not None else None,
        "worker_peak_rss_mb": _peaks(results),
    }
    if stats["part_rows"] != [c for _, _, c in items]:
        raise RuntimeError(f"the parts under {storage.url_of(scores_dir(category, iteration))} do not hold their plan")
    storage.write_json(f"{out_dir}/stats.json", stats)
    return stats
