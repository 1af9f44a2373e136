"""Partitions of a pool, the sample drawn over them, and tables written as committed sets of part files.

The building blocks of manifests past one process's memory (100M images): each step maps over partitions on
the cluster and the flow process keeps only small reductions. Three rules make the results the same whatever the
partition count:

- **Partitions are contiguous ranges of the pool's rows.** The pool is sorted by ``image_id``; partition ``p`` of
  ``P`` holds rows ``[p * n // P, (p + 1) * n // P)``, so partitions ``0 .. P-1`` in order are the pool in its
  order, and a row's global index (its position in the pool) does not depend on ``P``.
- **The sample is bottom-k of a keyed hash of that global index** (``sample_keys``): each row gets a 64-bit key
  from ``(seed, iteration, category, row)``; the ``k`` unlabeled rows with the smallest keys are a uniform sample
  without replacement. Each partition returns its own ``k`` smallest and the reduce keeps the ``k`` smallest of
  those, which are the ``k`` smallest of the whole pool.
- **A partitioned table is visible only when committed** (``commit``): its parts are written under a fresh
  ``attempt=<id>/`` folder, then one small file, ``_committed.json``, names the attempt and its parts. Readers
  (``committed_files``, ``read_dataset``) read only what it names, so they see the previous commit or the new one
  whole, never a mix. The attempt a commit replaced stays until the next commit (a reader scanning it finishes);
  an attempt that died before its commit is ignored, and ``sweep`` removes it once no writer is active.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .storage import Storage

COMMIT_FILE = "_committed.json"


@dataclass(frozen=True)
class Partitioning:
    """``n_partitions`` contiguous row ranges over a pool of ``n_rows`` rows (see the module's docstring)."""

    n_rows: int
    n_partitions: int

    def __post_init__(self) -> None:
        if self.n_partitions < 1:
            raise ValueError(f"n_partitions must be at least 1, got {self.n_partitions}")

    @property
    def starts(self) -> np.ndarray:
        """First global row of each partition, and ``n_rows`` at the end (``n_partitions + 1`` values)."""
        return np.arange(self.n_partitions + 1, dtype=np.int64) * self.n_rows // self.n_partitions

    def rows(self, p: int) -> tuple[int, int]:
        """``(start, stop)``: the global rows of partition ``p``."""
        if not 0 <= p < self.n_partitions:
            raise IndexError(f"partition {p} of {self.n_partitions}")
        s = self.starts
        return int(s[p]), int(s[p + 1])

    def of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The partition of each global row index in ``rows``."""
        return np.searchsorted(self.starts, np.asarray(rows, np.int64), side="right") - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over uint64 arrays: a bijective mix whose outputs pass BigCrush as a counter hash."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as the algorithm wants
        x = x + np.uint64(0x9E3779B97F4A7C15)  # a new array: the in-place steps below leave the caller's alone
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(factor)
        x ^= x >> np.uint64(31)
        return x


def sample_keys(rows: np.ndarray, *, seed: int, iteration: int, category: str) -> np.ndarray:
    """Parameters
    ----------
    rows : array of int, shape (n,)
        Global pool row indices.
    seed, iteration, category
        What the draw is a function of: the 64-bit seed, the iteration and an 8-byte BLAKE2b hash of the
        category's name are mixed into one stream key, so different triples give unrelated keys.

    Returns
    -------
    keys : array of uint64, shape (n,)
        One pseudo-random key per row, a pure function of the row and the stream.
    """
    name = int.from_bytes(hashlib.blake2b(category.encode(), digest_size=8).digest(), "little")
    stream = np.uint64(0)
    for part in (seed, iteration, name):
        stream = _splitmix64(np.array([stream ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)], np.uint64))[0]
    return _splitmix64(np.asarray(rows, np.int64).astype(np.uint64) ^ stream)


def bottom_k(rows: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows with the smallest keys, in key order: ``(rows, keys)``.

    ``sample_keys`` gives distinct rows distinct keys (an injective mix of the row), so the result is unique.

    The map of a partitioned draw (each partition's unlabeled rows) and its reduce (the concatenated results),
    in O(n) time: ``np.argpartition``, then a sort of the ``k`` kept. ``keys`` are ``sample_keys`` (uint64) or
    ``score_keys`` (float64, finite).
    """
    rows = np.asarray(rows, np.int64)
    keys = np.asarray(keys, np.float64 if np.asarray(keys).dtype.kind == "f" else np.uint64)
    k = max(0, min(int(k), len(rows)))
    if k < len(rows):
        keep = np.argpartition(keys, k - 1)[:k] if k else np.zeros(0, np.int64)
        rows, keys = rows[keep], keys[keep]
    order = np.argsort(keys, kind="stable")
    return rows[order], keys[order]


def unit_floats(keys: np.ndarray) -> np.ndarray:
    """``sample_keys`` as uniform floats in (0, 1): the top 53 bits, centred in their interval (never 0 or 1)."""
    return ((np.asarray(keys, np.uint64) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def score_keys(rows: np.ndarray, weights: np.ndarray, *, seed: int, iteration: int, stream: str) -> np.ndarray:
    """Keys whose bottom-k is a weighted sample without replacement (Efraimidis and Spirakis' exponential keys).

    Parameters
    ----------
    rows : array of int, shape (n,)
        Global pool row indices.
    weights : array of float, shape (n,)
        Positive, finite weights: each draw picks a row with probability proportional to its weight among the
        rows not yet picked. Rows whose weight is not positive get an infinite key (never drawn: leave them out).
    seed, iteration, stream
        As ``sample_keys``'s ``seed``, ``iteration`` and ``category``: the uniform variate of each row is that
        stream's key, so the draw is a pure function of the rows, their weights and the stream.

    Returns
    -------
    keys : array of float64, shape (n,)
        ``-log(u) / w``: exponential with rate ``w``; the ``k`` smallest are the sample, in draw order, and like
        ``sample_keys`` they merge over partitions (``merge_bottom_k``).
    """
    u = unit_floats(sample_keys(rows, seed=seed, iteration=iteration, category=stream))
    w = np.asarray(weights, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        keys = -np.log(u) / w
    keys[~(w > 0) | ~np.isfinite(w)] = np.inf
    return keys


def draw_bottom_k(
    parts: Sequence[np.ndarray], k: int, *, seed: int, iteration: int, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Bottom-k over ``parts`` (each an array of global unlabeled rows, in any grouping): map, then reduce.

    Returns the ``k`` rows with the smallest keys in key order and their keys; the same for any grouping of
    the same rows (``tests/test_partitions.py``). On a cluster each part's ``bottom_k`` runs where the part is.
    """
    mapped = [bottom_k(r, sample_keys(r, seed=seed, iteration=iteration, category=category), k) for r in parts]
    return merge_bottom_k(mapped, k)


def merge_bottom_k(mapped: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reduce of a partitioned draw: the ``k`` smallest-keyed of the parts' ``bottom_k`` results."""
    if not mapped:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return bottom_k(np.concatenate([m[0] for m in mapped]), np.concatenate([m[1] for m in mapped]), k)


# -- committed sets of part files -------------------------------------------------------------------------


def new_attempt() -> str:
    """A fresh attempt id: parts of two writers (a retried task, a second flow) never share a folder."""
    return uuid.uuid4().hex[:12]


def part_key(directory: str, attempt: str, part: int) -> str:
    return f"{directory.strip('/')}/attempt={attempt}/part-{part:05d}.parquet"


def few_valued(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` worth dictionary-encoding: Arrow dictionaries, integers and booleans.

    Ids, uris and scores take nearly one value a row: Parquet's writer fills a dictionary page with them, then
    falls back to plain pages, and the attempt cost a third of writing a manifest part (docs/benchmarks §2b).
    """
    wanted = (pa.types.is_dictionary, pa.types.is_integer, pa.types.is_boolean)
    return [f.name for f in schema if any(is_type(f.type) for is_type in wanted)]


def write_part(storage: Storage, directory: str, attempt: str, part: int, table: pa.Table) -> str:
    """Write one part of an attempt (atomically, as every storage write); return its key. Runs on workers."""
    key = part_key(directory, attempt, part)
    storage.write_table(storage.path(key), table, row_group_size=256 * 1024, dictionary=few_valued(table.schema))
    return key


def commit_record(storage: Storage, directory: str) -> dict | None:
    """The commit record at ``directory`` (attempt, parts, rows, previous and the writer's ``meta``), or None."""
    return _record(storage, directory)


def _record(storage: Storage, directory: str) -> dict | None:
    path = storage.path(directory.strip("/"), COMMIT_FILE)
    return storage.read_json(path) if storage.exists(path) else None


def commit(storage: Storage, directory: str, attempt: str, n_parts: int, rows: int, meta: dict | None = None) -> None:
    """Make ``attempt``'s ``n_parts`` parts the table at ``directory``.

    Raises ``FileNotFoundError`` naming the missing part if the attempt is incomplete, and ``ValueError`` if
    the parts' footers do not hold ``rows`` rows together: nothing is committed then. The commit is one atomic
    write of ``_committed.json``, which also names the attempt it replaced; the attempt replaced before that
    (two commits back) is removed, so a reader still scanning the previous commit finishes, and an attempt some
    other writer has not committed yet is never touched (``sweep`` removes leftovers when no writer is active).
    Committing the same attempt again changes nothing. ``meta`` (small, JSON) is kept in the record, read back
    with ``commit_record``.
    """
    directory = directory.strip("/")
    parts = [part_key(directory, attempt, p) for p in range(n_parts)]
    missing = [k for k in parts if not storage.exists(storage.path(k))]
    if missing:
        raise FileNotFoundError(f"cannot commit {directory}: part {missing[0]} of attempt {attempt} is missing")
    before = _record(storage, directory)
    if before is not None and before["attempt"] == attempt:
        return
    held = sum(_footer_rows(storage, storage.path(k)) for k in parts)
    if held != rows:
        raise ValueError(f"cannot commit {directory}: the parts of attempt {attempt} hold {held:,} rows, not {rows:,}")
    record = {
        "attempt": attempt,
        "parts": [k.removeprefix(directory + "/") for k in parts],
        "rows": int(rows),
        "previous": None if before is None else before["attempt"],
        **(meta or {}),
    }
    storage.write_json(storage.path(directory, COMMIT_FILE), record)
    stale = None if before is None else before.get("previous")
    if stale and stale != attempt:
        _remove_attempt(storage, directory, stale)


def _footer_rows(storage: Storage, path: str) -> int:
    """The row count a Parquet file's footer records (the footer alone is read)."""
    with storage.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _remove_attempt(storage: Storage, directory: str, attempt: str) -> None:
    """Best effort: a leftover folder costs disk, not correctness (readers follow ``_committed.json``)."""
    path = storage.path(directory, f"attempt={attempt}")
    try:
        if storage.exists(path):
            storage.fs.rm(path, recursive=True)
    except OSError:
        pass


def sweep(storage: Storage, directory: str) -> list[str]:
    """Remove every attempt at ``directory`` but the committed one (call it when no writer or reader is active:
    a run's end); the attempts removed."""
    directory = directory.strip("/")
    record = _record(storage, directory)
    keep = None if record is None else record["attempt"]
    removed = []
    root = storage.path(directory)
    names = (
        [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.fs.ls(root, detail=False)] if storage.exists(root) else []
    )
    for name in names:
        if name.startswith("attempt=") and name != f"attempt={keep}":
            _remove_attempt(storage, directory, name.removeprefix("attempt="))
            removed.append(name.removeprefix("attempt="))
    return removed


def committed_files(storage: Storage, directory: str) -> list[str] | None:
    """The committed part files of ``directory`` (storage paths, in part order), or None if nothing is committed."""
    record = _record(storage, directory)
    if record is None:
        return None
    return [storage.path(directory.strip("/"), name) for name in record["parts"]]


def read_dataset(storage: Storage, directory: str) -> ds.Dataset:
    """The committed table at ``directory`` as one ``pyarrow.dataset`` (parts in order); raises
    ``FileNotFoundError`` if nothing is committed there."""
    files = committed_files(storage, directory)
    if files is None:
        raise FileNotFoundError(f"no committed table at {storage.url_of(directory)} (no {COMMIT_FILE})")
    return ds.dataset(files, format="parquet", filesystem=storage.fs)
