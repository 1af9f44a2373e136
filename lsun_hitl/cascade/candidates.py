"""An iteration's candidates across the manifest's parts: where each part's candidates start in the scoring
step's parts, and the maps that read them (the split's, and the score lookup of calibration and recheck).

The candidates of iteration ``k`` are the rows unlabeled after ``k - 1`` less ``k``'s training sample, in pool
order; the scoring step's parts hold their scores in that order. Part ``p``'s candidates therefore start at the
number the parts before it hold, which the previous commit's counts give (or one map counts). Every map here
runs in this process for a one-part manifest, on the Dask cluster otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from ..cluster import dask_client, run_on_dask
from ..config import CascadeParams
from ..manifest import manifest_counts, n_manifest_parts, rows_held, stored_part_counts
from ..manifest_parts import open_part, score_lookup_part
from ..partitions import Partitioning
from ..report import SCORE_BINS
from ..storage import Storage
from .score import score_parts


@dataclass(frozen=True)
class Candidates:
    """Where iteration ``iteration``'s candidates lie: per part of the previous manifest, how many and the first
    one's index into the scoring step's parts (``score_files``, ``score_sizes`` rows each)."""

    iteration: int
    partitioning: Partitioning
    first: np.ndarray  # int64, one per part
    count: np.ndarray  # int64, one per part
    score_files: tuple[str, ...]
    score_sizes: tuple[int, ...]


@contextlib.contextmanager
def executor(dask_address: str | None, params: CascadeParams, partitioning: Partitioning) -> Iterator[Client | None]:
    """The Dask cluster at ``dask_address``, else a LocalCluster when there are several parts, else this
    process (a one-part manifest is not worth a cluster's start)."""
    if not dask_address and partitioning.n_partitions == 1:
        yield None
        return
    with dask_client(dask_address, n_workers=params.dask_workers) as client:
        yield client


def partitioning_before(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Partitioning:
    """The parts ``iteration`` works in: the pool's rows at ``params.manifest_partition`` rows a part."""
    n_rows = rows_held(manifest_counts(storage, category, iteration - 1))
    return Partitioning(n_rows, n_manifest_parts(n_rows, params.manifest_partition))


def locate(
    client: Client | None,
    storage: Storage,
    category: str,
    iteration: int,
    partitioning: Partitioning,
    train: np.ndarray,
) -> Candidates:
    """``Candidates`` of ``iteration`` given its training rows; raises if the scores do not cover them."""
    files, sizes = score_parts(storage, category, iteration)
    stored = stored_part_counts(storage, category, iteration - 1)
    if stored is not None and len(stored) == partitioning.n_partitions:
        unlabeled = np.array([c["unlabeled"] for c in stored], np.int64)
    else:  # an older root's one file, or parts of another count: counted on the cluster
        unlabeled = np.asarray(
            run_on_dask(
                client,
                _open,
                list(range(partitioning.n_partitions)),
                storage=storage,
                category=category,
                iteration=iteration - 1,
                partitioning=partitioning,
            ),
            np.int64,
        )
    count = unlabeled - np.bincount(partitioning.of_rows(train), minlength=partitioning.n_partitions)
    if int(count.sum()) != sum(sizes):
        raise RuntimeError(
            f"iteration {iteration}: {sum(sizes)} scores for {int(count.sum())} candidates; run the score step again"
        )
    first = np.concatenate([[0], np.cumsum(count)])[:-1]
    return Candidates(iteration, partitioning, first, count, files, sizes)


def candidate_scores(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    train: np.ndarray,
    rows: np.ndarray,
    dask_address: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The scores of candidate pool ``rows`` (in their order) and the histogram of every candidate's score over
    ``SCORE_BINS``: one map over the parts, each reading its slice of the scores."""
    partitioning = partitioning_before(storage, category, params, iteration)
    with executor(dask_address, params, partitioning) as client:
        where = locate(client, storage, category, iteration, partitioning, train)
        parts = run_on_dask(
            client,
            _lookup,
            [(p, int(where.first[p])) for p in range(partitioning.n_partitions)],
            storage=storage,
            category=category,
            iteration=iteration,
            partitioning=partitioning,
            train=train,
            wanted=np.asarray(rows, np.int64),
            score_files=where.score_files,
            score_sizes=where.score_sizes,
            bins=SCORE_BINS,
        )
    found = np.concatenate([np.zeros(0, np.int64)] + [r for r, _, _ in parts])
    scores = np.concatenate([np.zeros(0, np.float32)] + [s for _, s, _ in parts])
    order = np.argsort(found)
    out = scores[order][np.searchsorted(found[order], rows)] if len(rows) else np.zeros(0, np.float32)
    return out.astype(np.float32), np.sum([h for _, _, h in parts], axis=0)


def _open(p: int, **kwargs: Any) -> int:
    return open_part(p=p, **kwargs)


def _lookup(item: tuple[int, int], **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, candidate_start = item
    return score_lookup_part(p=p, candidate_start=candidate_start, **kwargs)
