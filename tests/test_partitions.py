"""Partitions (lsun_hitl.partitions): the sample does not depend on the partition count, and a partitioned
table is seen whole or not at all, on local disk and on S3 (moto), through pyarrow.dataset and DuckDB."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl.partitions import (
    Partitioning,
    commit,
    committed_files,
    new_attempt,
    read_dataset,
    sample_keys,
    write_part,
)
from lsun_hitl.sampling import draw_sample_partitioned
from lsun_hitl.storage import Storage

N = 100_000


def unlabeled_rows(seed: int = 7) -> np.ndarray:
    """A pool of N rows of which a random 60% are still unlabeled."""
    return np.flatnonzero(np.random.default_rng(seed).random(N) < 0.6)


def split(rows: np.ndarray, n_partitions: int) -> list[np.ndarray]:
    part = Partitioning(N, n_partitions).of_rows(rows)
    return [rows[part == p] for p in range(n_partitions)]


def test_partitions_are_contiguous_ranges_that_cover_the_pool():
    for n_partitions in (1, 4, 64, 7):
        p = Partitioning(N, n_partitions)
        ranges = [p.rows(i) for i in range(n_partitions)]
        assert ranges[0][0] == 0 and ranges[-1][1] == N
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
        rows = np.arange(N)
        assert np.array_equal(np.repeat(np.arange(n_partitions), sizes), p.of_rows(rows))
    with pytest.raises(ValueError, match="n_partitions"):
        Partitioning(N, 0)


def test_the_sample_is_the_same_for_1_4_and_64_partitions_and_uniform():
    rows = unlabeled_rows()
    kw = dict(n_train=2_500, n_calibration=3_000, max_fraction=0.5, seed=3, iteration=2, category="shirt")
    one = draw_sample_partitioned([rows], **kw)
    for n_partitions in (4, 64):
        other = draw_sample_partitioned(split(rows, n_partitions), **kw)
        assert np.array_equal(one.train, other.train) and np.array_equal(one.calibration, other.calibration)
    # reordering the rows inside the parts changes nothing either
    shuffled = draw_sample_partitioned([np.random.default_rng(1).permutation(rows)], **kw)
    assert np.array_equal(one.calibration, shuffled.calibration)
    assert len(one.train) == 2_500 and len(one.calibration) == 3_000
    assert not np.intersect1d(one.train, one.calibration).size and np.isin(one.train, rows).all()
    # uniform over the unlabeled rows: each tenth of them holds its share of the sample (binomial sd ~ 23)
    chosen = np.concatenate([one.train, one.calibration])
    tenths = np.bincount(np.searchsorted(rows, chosen) * 10 // len(rows), minlength=10)
    assert np.all(np.abs(tenths - 550) < 120), tenths
    # every (seed, iteration, category) is its own stream
    for change in (dict(seed=4), dict(iteration=3), dict(category="coat")):
        again = draw_sample_partitioned([rows], **{**kw, **change})
        assert len(np.intersect1d(again.calibration, one.calibration)) < 400  # ~ 3,000 x 5.5% by chance


def test_sample_keys_are_distinct_per_row():
    keys = sample_keys(np.arange(1_000_000), seed=0, iteration=1, category="trouser")
    assert len(np.unique(keys)) == 1_000_000


def table(start: int, stop: int, tag: str) -> pa.Table:
    return pa.table({"row": pa.array(np.arange(start, stop)), "tag": pa.array([tag] * (stop - start))})


def write_all(storage: Storage, directory: str, tag: str, n_partitions: int, upto: int | None = None) -> str:
    attempt = new_attempt()
    p = Partitioning(1_000, n_partitions)
    for i in range(n_partitions if upto is None else upto):
        write_part(storage, directory, attempt, i, table(*p.rows(i), tag))
    return attempt


def check_committed_table_is_seen_whole(storage: Storage) -> list[str]:
    directory = "manifests/shirt/iteration=1"
    assert committed_files(storage, directory) is None
    with pytest.raises(FileNotFoundError, match="no committed table"):
        read_dataset(storage, directory)
    first = write_all(storage, directory, "old", 4)
    commit(storage, directory, first, 4, rows=1_000)
    commit(storage, directory, first, 4, rows=1_000)  # idempotent
    # a second writer dies after two of its parts: readers still see the first commit, whole
    crashed = write_all(storage, directory, "new", 4, upto=2)
    with pytest.raises(FileNotFoundError, match="part-00002"):
        commit(storage, directory, crashed, 4, rows=1_000)
    seen = read_dataset(storage, directory).to_table()
    assert seen.num_rows == 1_000 and set(seen.column("tag").to_pylist()) == {"old"}
    # a complete retry commits, and only its parts remain
    retry = write_all(storage, directory, "new", 4)
    commit(storage, directory, retry, 4, rows=1_000)
    seen = read_dataset(storage, directory).to_table()
    assert seen.column("row").to_pylist() == list(range(1_000)) and set(seen.column("tag").to_pylist()) == {"new"}
    attempts = storage.glob(storage.path(directory, "attempt=*"))
    assert len(attempts) == 1 and attempts[0].rstrip("/").endswith(f"attempt={retry}")
    return committed_files(storage, directory)


def test_a_partitioned_table_is_seen_whole_on_local_disk_and_by_duckdb(tmp_path):
    files = check_committed_table_is_seen_whole(Storage(str(tmp_path)))
    got = duckdb.sql(f"select count(*), min(row), max(row), min(tag) from read_parquet({files!r})").fetchall()[0]
    assert got == (1_000, 0, 999, "new")


def test_a_partitioned_table_is_seen_whole_on_s3(s3_bucket):
    url, options = s3_bucket
    check_committed_table_is_seen_whole(Storage(url, options))
