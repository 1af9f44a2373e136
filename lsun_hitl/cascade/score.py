"""Scoring: the iteration's model scores every image still undecided, on Dask."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..cluster import dask_client
from ..config import CascadeParams
from ..manifest import UNLABELED, CascadeState, manifest_counts, rows_held, stored_parts
from ..partitions import Partitioning
from ..progress import Progress
from ..sampling import Sample
from ..scoring import score_pool
from ..storage import Storage, scores_dir
from .sample import sample
from .train import input_cache, model_key_path


def candidates(state: CascadeState, drawn: Sample) -> np.ndarray:
    """Pool rows the model scores at this iteration: unlabeled ones not in its training sample."""
    mask = state.state == UNLABELED
    mask[drawn.train] = False
    return np.flatnonzero(mask)


def score(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    *,
    dask_address: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Score every candidate of ``iteration`` on Dask; return how many were given a score.

    Each range of the manifest's partitions plans its own candidates on the cluster (``scoring.score_pool``):
    this process holds the iteration's training rows and the tasks' counts, never the pool."""
    counts = manifest_counts(storage, category, iteration - 1)
    partitioning = Partitioning(rows_held(counts), stored_parts(storage, category, iteration - 1))
    with dask_client(dask_address, n_workers=params.dask_workers) as client:
        stats = score_pool(
            storage,
            category,
            iteration,
            model_key_path(storage, category, iteration),
            starts=partitioning.starts,
            train=sample(storage, category, params, iteration).train,
            client=client,
            partition_size=params.score_partition,
            batch_size=params.score_batch,
            progress=progress,
            cache=input_cache(storage, params, iteration),
        )
    return int(stats["scored"])


def score_parts(storage: Storage, category: str, iteration: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The scoring step's part files of ``iteration`` in candidate order, and each one's row count: those its
    ``stats.json`` lists, or (a root scored before it listed them) every part there by its number, counted
    from the footers."""
    directory = scores_dir(category, iteration)
    stats = storage.path(directory, "stats.json")
    sizes = storage.read_json(stats).get("part_rows") if storage.exists(stats) else None
    if sizes is not None:
        return tuple(storage.path(directory, f"part-{i:05d}.parquet") for i in range(len(sizes))), tuple(sizes)
    paths = sorted(
        storage.glob(storage.path(directory, "part-*.parquet")),
        key=lambda p: int(p.rsplit("part-", 1)[1].split(".")[0]),
    )

    def rows(path: str) -> int:
        with storage.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    return tuple(paths), tuple(rows(p) for p in paths)


def read_scores(storage: Storage, category: str, iteration: int, n: int) -> np.ndarray:
    """The stored scores of the ``n`` candidates of ``iteration``, in candidate order (NaN: unreadable image)."""
    paths, _ = score_parts(storage, category, iteration)
    table = pa.concat_tables(
        [storage.read_table(p, columns=["score"]) for p in paths] or [pa.table({"score": pa.array([], pa.float32())})]
    )
    if table.num_rows != n:
        raise RuntimeError(
            f"iteration {iteration}: {table.num_rows} scores for {n} candidates; run the score step again"
        )
    return table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
