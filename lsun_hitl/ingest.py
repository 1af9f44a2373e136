"""Ingest: build the pool manifest from every image under a URL prefix, or from a list of URLs.

Each candidate image gets an id from a content hash (BLAKE2b-128 of its bytes), so exact duplicates
collapse to one pool row; the others are counted and listed in the rejects manifest. Files that are
not usable images go to the rejects manifest with the reason, a sentence naming the problem (``unreadable``,
``images.ImageError``).

Which images are usable is set by ``config.IngestParams``: ``max_image_pixels`` refuses larger images as
possible decompression bombs. It is applied by each probe, on whichever worker runs it, and recorded in the
pool manifest's metadata with how the ids were made (``pool_reading``), so that scoring and export decode the
pool's images under the limit they were accepted with, and know a file whose bytes no longer hash to its id
changed since ingest.

Listing is done once, by the driver, which writes it to ``pool/listing.parquet`` under the storage
root with one row group per chunk. Each Dask task is given only its chunk's number: it opens the
storage itself (no filesystem object is shipped), reads its row group of URLs, and reads, hashes and
probes those files. The task graph therefore stays a few bytes per chunk however many files there
are, instead of carrying every URL (52 MiB at a million files).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .cluster import run_on_dask
from .config import ConfigError, IngestParams
from .images import CONTENT_ID, DEFAULT_MAX_PIXELS, ID_KEY, PIXEL_LIMIT_KEY, ImageError, cause, image_id, probe
from .images import PoolReading as PoolReading  # re-exported: where every step reads them
from .images import pool_reading as pool_reading
from .progress import Progress
from .storage import LISTING, POOL, REJECTS, Storage

POOL_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
    ]
)
# the pool manifest's row groups: a partition's slice (``read_pool_rows``) reads the groups that hold it
POOL_ROW_GROUP = 64 * 1024
REJECT_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string())])
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".jfif")


# the pool manifest's schema metadata: the pixel limit its images were accepted under, and how its ids were made
def unreadable(error: BaseException | None) -> str:
    """Why a file could not be read (what fsspec's ``cat`` returned in place of its bytes), as a sentence:
    ingest's rejects, the scores' errors and the exports' skipped lists say it the same way."""
    if isinstance(error, FileNotFoundError):
        what = "the file no longer exists (deleted or moved after it was listed or ingested)"
    elif isinstance(error, IsADirectoryError):
        what = "it is a folder, not a file"
    elif isinstance(error, PermissionError):
        what = "permission to read the file was denied"
    elif isinstance(error, OSError) and error.errno == errno.ELOOP:
        what = "it is a symbolic link loop (too many levels of symbolic links)"
    elif error is None:
        what = "the storage returned no data for it"
    else:
        what = f"the file could not be read: {cause(error)}"
    return f"unreadable: {what}"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestReport:
    files: int
    images: int
    duplicates: int
    rejected: int

    def __str__(self) -> str:
        return (
            f"{self.files} files -> {self.images} pool images, {self.duplicates} exact duplicates "
            f"removed, {self.rejected} rejected"
        )


def check_prefix(prefix: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` of an image prefix; FileNotFoundError naming it when it does not exist."""
    fs, path = url_to_fs(prefix, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(
            f"image prefix {prefix!r} does not exist; pass a folder or URL prefix that holds the candidate images"
        )
    return fs, path


def list_prefix(prefix: str, storage_options: dict[str, Any] | None = None, *, links_outside: bool = True) -> list[str]:
    """Every file under ``prefix`` (recursively) as a full URL, sorted; hidden files skipped. Without
    ``links_outside``, local files whose real path (symbolic links resolved) is outside the prefix are left out.

    A local folder is walked with ``os.walk``, which reads directory entries only, where fsspec's
    ``find`` would stat every file and build a dict for each; the result is the same (a symbolic
    link to a folder is listed as a file, not followed). Other filesystems use ``find``, and their
    listings cache is dropped afterwards so the driver does not keep a dict per object.
    """
    fs, path = check_prefix(prefix, storage_options)
    if isinstance(fs, LocalFileSystem):
        files = _walk_local(path)
        if not links_outside:
            files = inside(path, files)
    else:
        files = fs.find(path)
        fs.invalidate_cache(path)
    urls = [fs.unstrip_protocol(p) for p in files if not p.rsplit("/", 1)[-1].startswith(".")]
    return sorted(urls)


def inside(prefix: str, files: list[str]) -> list[str]:
    """The local ``files`` whose real path lies under ``prefix``'s real path (a symbolic link to a file
    elsewhere is not the prefix's)."""
    root = os.path.realpath(prefix)
    base = root if os.path.isdir(root) else os.path.dirname(root)
    kept = [f for f in files if os.path.commonpath([base, os.path.realpath(f)]) == base]
    if len(kept) < len(files):
        log.warning(
            "%d file(s) under %s are symbolic links to files outside it and are left out (--links-outside takes them)",
            len(files) - len(kept),
            prefix,
        )
    return kept


def check_schemes(urls: Sequence[str], allowed: set[str]) -> None:
    """Raise ConfigError naming the first URL whose scheme is not in ``allowed`` (a bare path is ``file``)."""
    for url in urls:
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme not in allowed:
            raise ConfigError(
                f"{url!r} is a {scheme}:// URL; this list may name {', '.join(sorted(allowed))} URLs only."
                f" Pass --url-schemes {scheme} to ingest it"
            )


def allowed_schemes(storage: Storage, params: IngestParams) -> set[str]:
    """The URL schemes a list of images may name: the storage root's and ``params.url_schemes``."""
    root = storage.url.split("://", 1)[0] if "://" in storage.url else "file"
    return {root, *(s.strip() for s in params.url_schemes.split(",") if s.strip())}


def _walk_local(path: str) -> list[str]:
    """Every entry under the local ``path`` that is not a folder, symbolic links to folders included
    (``path`` itself if it is not a folder)."""
    if not os.path.isdir(path):
        return [path]
    files: list[str] = []
    for folder, dirs, names in os.walk(path):
        files.extend(f"{folder}/{name}" for name in names)
        files.extend(f"{folder}/{d}" for d in dirs if os.path.islink(f"{folder}/{d}"))
    return files


def probe_chunk(
    urls: Sequence[str], storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[pa.Table, pa.Table]:
    """Read, hash and fully decode each URL (runs on a Dask worker); refuse images over ``max_pixels``.

    Returns ``(images, rejects)`` tables with POOL_SCHEMA and REJECT_SCHEMA; never raises for a bad
    file: the reason is recorded instead.
    """
    rows: dict[str, list] = {name: [] for name in POOL_SCHEMA.names}
    rejects: dict[str, list] = {"uri": [], "reason": []}
    if not urls:
        return pa.Table.from_pydict(rows, POOL_SCHEMA), pa.Table.from_pydict(rejects, REJECT_SCHEMA)
    fs, _ = url_to_fs(urls[0], **(storage_options or {}))
    # every URL of a chunk shares the first one's filesystem; stripping the protocol per URL is the
    # same as url_to_fs without a filesystem lookup per file
    paths = [fs._strip_protocol(u) for u in urls]
    contents = fs.cat(paths, on_error="return", **one_request_per_file(fs))
    if not isinstance(contents, dict):  # a single path returns bytes
        contents = {paths[0]: contents}
    for url, path in zip(urls, paths, strict=True):
        data = contents.get(path)
        if isinstance(data, BaseException) or data is None:
            rejects["uri"].append(url)
            rejects["reason"].append(unreadable(data))
            continue
        try:
            info = probe(data, max_pixels)
        except ImageError as exc:
            rejects["uri"].append(url)
            rejects["reason"].append(str(exc))
            continue
        rows["image_id"].append(image_id(data))
        rows["uri"].append(url)
        rows["bytes"].append(len(data))
        rows["width"].append(info.width)
        rows["height"].append(info.height)
        rows["format"].append(info.format)
    return pa.Table.from_pydict(rows, POOL_SCHEMA), pa.Table.from_pydict(rejects, REJECT_SCHEMA)


def one_request_per_file(fs: Any) -> dict[str, Any]:
    """``cat`` options that read each whole file with one request.

    s3fs asks for an object's size (a HEAD request) before every whole-object read, to split objects
    above its block size into concurrent ranged reads; with ``max_concurrency=1`` it sends the GET
    alone. Images are far below that size, so this halves the requests per file.
    """
    cat_file = getattr(fs, "_cat_file", None)
    if cat_file is not None and "max_concurrency" in inspect.signature(cat_file).parameters:
        return {"max_concurrency": 1}
    return {}


def probe_part(
    part: int,
    *,
    storage: Storage,
    listing_path: str,
    source_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[pa.Table, pa.Table]:
    """Probe the files of row group ``part`` of the listing (runs on a Dask worker).

    Parameters
    ----------
    part
        Row group (chunk) number in the listing file.
    storage
        The storage root holding the listing; opened in this process.
    listing_path
        Filesystem path of the listing (``storage.path(LISTING)``).
    source_options
        fsspec options for the image URLs.
    max_pixels
        The pixel limit (``IngestParams.max_image_pixels``).

    Returns
    -------
    images, rejects
        As :func:`probe_chunk`.
    """
    urls = storage.read_row_group(listing_path, part, columns=["uri"]).column("uri").to_pylist()
    return probe_chunk(urls, source_options, max_pixels)


def dedupe(images: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keep one row per image_id (the lexicographically first uri); return ``(pool, duplicates)``.

    The pool comes back sorted by image_id; duplicates are reject rows naming the kept uri. Only the
    sort order, the sorted ids and the kept rows are materialized (Arrow arrays, no Python object
    per row), so the driver holds the probed rows about twice at the peak.
    """
    order = pc.sort_indices(images, sort_keys=[("image_id", "ascending"), ("uri", "ascending")])
    ids = pc.take(images.column("image_id"), order)
    n = len(ids)
    first = np.ones(n, dtype=bool)  # first row of each image_id in sorted order: the one kept
    if n > 1:
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    del ids
    order = order.to_numpy()
    pool = images.take(pa.array(order[first]))
    if first.all():
        return pool, REJECT_SCHEMA.empty_table()
    kept_rows = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))[~first]]
    kept_uri = pc.take(images.column("uri"), pa.array(kept_rows))
    reasons = pc.binary_join_element_wise("exact duplicate of ", kept_uri, "")
    dup_uri = pc.take(images.column("uri"), pa.array(order[~first]))
    return pool, pa.table({"uri": dup_uri, "reason": reasons}, schema=REJECT_SCHEMA)


def build_pool(
    storage: Storage,
    sources: str | Sequence[str],
    *,
    client: Client | None = None,
    source_options: dict[str, Any] | None = None,
    chunk_size: int = 1000,
    progress: Progress | None = None,
    params: IngestParams | None = None,
) -> IngestReport:
    """Build ``pool/images.parquet`` and ``pool/rejects.parquet`` under ``storage``.

    The listing is written to ``pool/listing.parquet`` (column ``uri``, one row group per chunk of
    ``chunk_size`` files) and each Dask task reads its own row group, so the task graph does not grow
    with the number of files.

    Parameters
    ----------
    storage
        The storage root the manifests (and the listing) are written under.
    sources
        A URL prefix (every file under it is a candidate) or a list of file URLs.
    client
        Dask client that probes chunks in parallel; None probes in this process.
    source_options
        fsspec options for the sources (defaults to the storage root's options).
    chunk_size
        Files per task (and per row group of the listing).
    progress
        Called as ``progress(chunks_done, chunks_total)`` while chunks finish.
    params
        Which files are usable images (``IngestParams``; its defaults when None). Its pixel limit is recorded
        in the pool manifest's metadata (``pool_reading``).

    Returns
    -------
    IngestReport
        Counts of files listed, pool images, exact duplicates and rejects.
    """
    params = (params or IngestParams()).validate()
    options = storage.options if source_options is None else source_options
    if isinstance(sources, str):
        urls = list_prefix(sources, options, links_outside=params.links_outside)
    else:
        check_schemes(sources, allowed_schemes(storage, params))
        urls = sorted(set(sources))
    if not urls:
        raise ValueError(f"no files found in {sources!r}: nothing to ingest")
    files = len(urls)
    listing_path = storage.path(LISTING)
    storage.write_table(listing_path, pa.table({"uri": pa.array(urls, pa.string())}), row_group_size=chunk_size)
    del urls  # the listing file holds them now; the driver keeps no copy while the tasks run
    results = run_on_dask(
        client,
        probe_part,
        list(range(storage.num_row_groups(listing_path))),
        progress=progress,
        storage=storage,
        listing_path=listing_path,
        source_options=options,
        max_pixels=params.max_image_pixels,
    )
    images = pa.concat_tables([r[0] for r in results])
    rejects = pa.concat_tables([r[1] for r in results])
    del results
    pool, dups = dedupe(images)
    del images
    all_rejects = pa.concat_tables([rejects, dups]).sort_by("uri")
    storage.write_table(storage.path(REJECTS), all_rejects)
    pool = pool.replace_schema_metadata({PIXEL_LIMIT_KEY: str(params.max_image_pixels).encode(), ID_KEY: CONTENT_ID})
    storage.write_table(storage.path(POOL), pool, row_group_size=POOL_ROW_GROUP)
    return IngestReport(files=files, images=pool.num_rows, duplicates=dups.num_rows, rejected=rejects.num_rows)


def read_pool(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """The pool manifest; a clear error if it has not been built yet."""
    return storage.read_table(_pool_path(storage), columns=columns)


def read_pool_rows(storage: Storage, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of the pool manifest, reading only the row groups that hold them (a partition's
    slice of a 100M-image pool costs its rows, not the pool)."""
    return storage.read_rows(_pool_path(storage), start, stop, columns=columns)


def take_pool(storage: Storage, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """The pool manifest's rows at ``rows`` (in that order), reading one row group at a time: memory is a row
    group and the result, not the pool."""
    return storage.take_rows(_pool_path(storage), rows, columns=columns)


def pool_size(storage: Storage) -> int:
    """How many images the pool holds (its footer only)."""
    with storage.fs.open(_pool_path(storage), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _pool_path(storage: Storage) -> str:
    path = storage.path(POOL)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no pool manifest at {storage.url_of(POOL)}; build it first with "
            "`lsun-hitl ingest --root ROOT --images PREFIX` (or `lsun-hitl import-fashion-mnist`)"
        )
    return path
