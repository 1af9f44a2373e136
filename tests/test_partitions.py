"""Partitions (lsun_hitl.partitions): the sample does not depend on the partition count, and a partitioned
table is seen whole or not at all, on local disk and on S3 (moto), through pyarrow.dataset and DuckDB."""

from __future__ import annotations

import json

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
    sweep,
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
    kw = dict(n_train=2_500, n_calibration=3_000, seed=3, iteration=2, category="shirt")
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
    # every part there, but one of them short (its footer says so): refused, the first commit still seen
    short = write_all(storage, directory, "short", 4)
    write_part(storage, directory, short, 3, table(750, 990, "short"))
    with pytest.raises(ValueError, match="hold 990 rows, not 1,000"):
        commit(storage, directory, short, 4, rows=1_000)
    assert set(read_dataset(storage, directory).to_table().column("tag").to_pylist()) == {"old"}
    # a complete retry commits, and only its parts remain
    retry = write_all(storage, directory, "new", 4)
    commit(storage, directory, retry, 4, rows=1_000)
    seen = read_dataset(storage, directory).to_table()
    assert seen.column("row").to_pylist() == list(range(1_000)) and set(seen.column("tag").to_pylist()) == {"new"}

    # the commit keeps the attempt it replaced (a reader may still scan it) and never touches one it did not
    # commit (another writer's); sweep, at a run's end, leaves the committed attempt only
    def attempts() -> set[str]:
        return {p.rstrip("/").rsplit("attempt=", 1)[1] for p in storage.glob(storage.path(directory, "attempt=*"))}

    assert attempts() == {first, crashed, short, retry}
    assert sorted(sweep(storage, directory)) == sorted([first, crashed, short]) and attempts() == {retry}
    third = write_all(storage, directory, "third", 4)
    commit(storage, directory, third, 4, rows=1_000)
    fourth = write_all(storage, directory, "fourth", 4)
    commit(storage, directory, fourth, 4, rows=1_000)
    assert attempts() == {third, fourth}  # two commits back (retry) removed, the one replaced kept
    assert set(read_dataset(storage, directory).to_table().column("tag").to_pylist()) == {"fourth"}
    return committed_files(storage, directory)


def test_a_partitioned_table_is_seen_whole_on_local_disk_and_by_duckdb(tmp_path):
    files = check_committed_table_is_seen_whole(Storage(str(tmp_path)))
    got = duckdb.sql(f"select count(*), min(row), max(row), min(tag) from read_parquet({files!r})").fetchall()[0]
    assert got == (1_000, 0, 999, "fourth")


def test_a_partitioned_table_is_seen_whole_on_s3(s3_bucket):
    url, options = s3_bucket
    check_committed_table_is_seen_whole(Storage(url, options))


# -- the manifest in parts --------------------------------------------------------------------------------

POOL = 10_000


def make_pool(root) -> Storage:
    from lsun_hitl.ingest import POOL as POOL_KEY

    storage = Storage(str(root))
    ids = sorted(f"{i:032x}" for i in np.random.default_rng(0).choice(2**60, POOL, replace=False))
    storage.write_table(storage.path(POOL_KEY), pa.table({"image_id": ids, "uri": [f"file:///x/{i}" for i in ids]}))
    return storage


def updates(n_iterations: int = 3) -> tuple[list, object]:
    """Three iterations' samples (bottom-k), people's answers and model scores, by global row, made by replaying
    them on the whole state: what the flow process would hold."""
    from lsun_hitl.calibration import Thresholds
    from lsun_hitl.manifest import ROLE_CALIBRATION, ROLE_TRAIN, CascadeState
    from lsun_hitl.manifest_parts import IterationUpdate
    from lsun_hitl.split import apply_human_labels, apply_thresholds

    rng = np.random.default_rng(5)
    state = CascadeState.initial(pa.array([f"{i}" for i in range(POOL)]))
    out = []
    for it in range(1, n_iterations + 1):
        s = draw_sample_partitioned(
            [state.unlabeled_index()],
            n_train=300,
            n_calibration=400,
            seed=1,
            iteration=it,
            category="shirt",
        )
        train_p, cal_p = rng.random(len(s.train)).astype(np.float32), rng.random(len(s.calibration)).astype(np.float32)
        apply_human_labels(state, s.train, train_p, ROLE_TRAIN, it)
        apply_human_labels(state, s.calibration, cal_p, ROLE_CALIBRATION, it)
        scored = state.unlabeled_index()
        scores = rng.random(len(scored)).astype(np.float32)
        scores[::97] = np.nan  # unreadable images stay unlabeled
        thresholds = Thresholds(0.97, 0.05 * it, None, None, 400, 0, 0, 0.95)
        apply_thresholds(state, scored, scores, thresholds, it)
        out.append(IterationUpdate(it, s.train, train_p, s.calibration, cal_p, scored, scores, thresholds))
    return out, state


def run_parts(storage: Storage, client, n_partitions: int, its: list, layout_today: bool = False) -> list[dict]:
    """Iteration 0 and ``its`` on the cluster, one task per part, each committed by the coordinator; each
    write also draws the next iteration's sample (1,000 rows stored), which must equal the sample's own map."""
    from dataclasses import replace

    from lsun_hitl.manifest import CascadeState
    from lsun_hitl.manifest_parts import (
        advance_part,
        initial_part,
        manifest_dir,
        sample_part,
        split_off_next_sample,
        store_next_sample,
        stored_next_sample,
        sum_counts,
    )
    from lsun_hitl.partitions import merge_bottom_k
    from lsun_hitl.storage import manifest_key

    part = Partitioning(POOL, n_partitions)

    def commit_with_next(results: list[dict], iteration: int, attempt: str) -> list[dict]:
        counts, mapped = split_off_next_sample(results)
        assert len(mapped) == n_partitions
        entry = store_next_sample(
            storage, manifest_dir("shirt", iteration), attempt, mapped, iteration=iteration + 1, seed=1, k=1000
        )
        commit(storage, manifest_dir("shirt", iteration), attempt, n_partitions, POOL, meta={"next_sample": entry})
        return counts

    if layout_today:  # iteration 0 as an older root's single file: read as one partition, sliced
        from lsun_hitl.ingest import read_pool

        initial = CascadeState.initial(read_pool(storage).column("image_id"))
        storage.write_table(storage.path(manifest_key("shirt", 0)), initial.to_table())
    else:
        attempt = new_attempt()
        commit_with_next(
            client.gather(
                [
                    client.submit(initial_part, storage, "shirt", part, p, attempt, (1, 1000))
                    for p in range(n_partitions)
                ]
            ),
            0,
            attempt,
        )
    totals = []
    for u in its:
        # the sample as a map over the parts (each its bottom-k) and a reduce: the one the flow process drew
        mapped = client.gather(
            [client.submit(sample_part, storage, "shirt", u.iteration, part, p, 700, 1) for p in range(n_partitions)]
        )
        drawn, _ = merge_bottom_k(mapped, 700)
        assert np.array_equal(np.sort(drawn[:400]), u.calibration) and np.array_equal(np.sort(drawn[400:]), u.train)
        # and the same rows, in the same order, from the draw stored with the manifest before (none in an old root)
        stored = stored_next_sample(storage, "shirt", u.iteration, seed=1, k=700)
        if layout_today and u.iteration == 1:
            assert stored is None
        else:
            assert np.array_equal(stored, drawn)
        assert stored_next_sample(storage, "shirt", u.iteration, seed=2, k=700) is None  # another seed's: drawn again
        assert stored_next_sample(storage, "shirt", u.iteration, seed=1, k=1001) is None  # more than was stored
        attempt = new_attempt()
        update = replace(u, next_sample=(1, 1000))
        futures = [client.submit(advance_part, storage, "shirt", part, p, update, attempt) for p in range(n_partitions)]
        totals.append(sum_counts(commit_with_next(client.gather(futures), u.iteration, attempt)))
    return totals


def test_the_manifest_in_1_4_and_64_parts_on_dask_is_the_same_and_today_s_layout_still_opens(tmp_path, dask_cluster):
    from lsun_hitl.manifest import read_manifest as read_whole

    its, whole = updates()
    tables, counts = {}, {}
    for n_partitions in (1, 4, 64):
        storage = make_pool(tmp_path / f"p{n_partitions}")
        counts[n_partitions] = run_parts(storage, dask_cluster, n_partitions, its)
        tables[n_partitions] = [read_whole(storage, "shirt", it).to_table() for it in range(4)]
    for n_partitions in (4, 64):
        assert counts[n_partitions] == counts[1]
        assert all(a.equals(b) for a, b in zip(tables[n_partitions], tables[1], strict=True))
    # and the same as today's path, the whole state advanced in the flow process
    final = read_whole(Storage(str(tmp_path / "p1")), "shirt", 3)
    for name in ("state", "decided_iteration", "decided_by", "human_role", "score", "p_positive"):
        assert np.array_equal(getattr(final, name), getattr(whole, name), equal_nan=True), name
    last = counts[1][-1]
    assert last["human"] == 3 * 700 and last["model_positive"] > 0 and last["model_negative"] > 0
    assert last["unlabeled"] + last["positive"] + last["negative"] == POOL
    # through DuckDB over the committed parts, as one table
    from lsun_hitl.partitions import committed_files

    storage = Storage(str(tmp_path / "p64"))
    files = committed_files(storage, "manifests/shirt/iteration=3")
    got = duckdb.sql(f"select state, count(*) from read_parquet({files!r}) group by state order by state").fetchall()
    assert dict(got) == {"negative": last["negative"], "positive": last["positive"], "unlabeled": last["unlabeled"]}
    # an existing root in today's layout (one manifest.parquet) is read as one partition and goes on in parts
    today = make_pool(tmp_path / "today")
    assert run_parts(today, dask_cluster, 4, its, layout_today=True) == counts[1]
    assert read_whole(today, "shirt", 3).to_table().equals(tables[1][3])


def test_people_s_labels_read_part_by_part_are_the_whole_state_s_in_any_partition_count(tmp_path):
    """What training learns from (``manifest_parts.human_labels``), read a part at a time, equals the rows and
    posteriors of the whole state, with and without the calibration images, whatever the parts."""
    from lsun_hitl.manifest import BY_HUMAN, ROLE_CALIBRATION, write_manifest
    from lsun_hitl.manifest_parts import human_labels

    _, whole = updates()
    for n_parts in (1, 5):
        storage = Storage(str(tmp_path / f"p{n_parts}"))
        write_manifest(storage, "shirt", 3, whole, n_parts)
        for without_calibration in (False, True):
            human = whole.decided_by == BY_HUMAN
            if without_calibration:
                human &= whole.human_role != ROLE_CALIBRATION
            rows, p_positive = human_labels(storage, "shirt", 3, without_calibration=without_calibration)
            assert np.array_equal(rows, np.flatnonzero(human)) and len(rows) > 0
            assert np.array_equal(p_positive, whole.p_positive[rows]) and p_positive.dtype == np.float32


def test_scores_in_parts_decide_the_same_and_a_mismatched_partitioning_is_refused(tmp_path, dask_cluster):
    from lsun_hitl.manifest import read_manifest as read_whole
    from lsun_hitl.manifest_parts import advance_part, manifest_dir, sample_part
    from lsun_hitl.partitions import merge_bottom_k

    its, _ = updates(1)
    (u,) = its
    reference = make_pool(tmp_path / "ref")
    run_parts(reference, dask_cluster, 4, its)
    storage = make_pool(tmp_path / "scores")
    run_parts(storage, dask_cluster, 4, [])
    part = Partitioning(POOL, 4)
    attempt = new_attempt()
    for p in range(4):
        start, stop = part.rows(p)
        inside = (u.scored_rows >= start) & (u.scored_rows < stop)
        table = pa.table({"row": pa.array(u.scored_rows[inside]), "score": pa.array(u.scores[inside])})
        write_part(storage, "scores/shirt/iteration=1", attempt, p, table)
    commit(storage, "scores/shirt/iteration=1", attempt, 4, int(len(u.scored_rows)))
    from dataclasses import replace

    by_parts = replace(
        u, scored_rows=np.zeros(0, np.int64), scores=np.zeros(0, np.float32), scores_dir="scores/shirt/iteration=1"
    )
    attempt = new_attempt()
    for p in range(4):
        advance_part(storage, "shirt", part, p, by_parts, attempt)
    commit(storage, manifest_dir("shirt", 1), attempt, 4, POOL)
    assert read_whole(storage, "shirt", 1).to_table().equals(read_whole(reference, "shirt", 1).to_table())
    # parts committed with another partition count are read across (the setting changed between iterations)
    draws = {
        n: merge_bottom_k([sample_part(storage, "shirt", 2, Partitioning(POOL, n), p, 10, 1) for p in range(n)], 10)
        for n in (3, 4, 8)
    }
    assert all(np.array_equal(draws[n][0], draws[4][0]) for n in (3, 8))
    # scores partitioned differently: one message, nothing written
    swapped = new_attempt()  # scores whose part 0 holds part 1's rows
    for p, source in enumerate([1, 0, 2, 3]):
        start, stop = part.rows(source)
        write_part(
            storage,
            "scores/bad",
            swapped,
            p,
            pa.table({"row": pa.array(np.arange(start, stop))}).append_column(
                "score", pa.array(np.zeros(stop - start, np.float32))
            ),
        )
    commit(storage, "scores/bad", swapped, 4, POOL)
    with pytest.raises(ValueError, match="rows outside"):
        advance_part(storage, "shirt", part, 0, replace(by_parts, scores_dir="scores/bad"), new_attempt())


def test_the_flow_s_steps_in_1_and_4_manifest_parts_give_the_same_thresholds_manifests_and_dataset(
    tmp_path, dask_cluster, prefect_harness
):
    """The real flow (Prefect, Dask, the simulated crowd) with one manifest part; then the same run's
    calibrations and splits again in 4 parts on the Dask cluster, every other step's stored output reused: the
    same thresholds, calibration sets, manifests, funnels, dataset and summary."""
    import dataclasses
    import shutil

    from flows.runner import run_cascade, simulated_crowd
    from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.ingest import build_pool
    from lsun_hitl.manifest import manifest_iterations, read_manifest, stored_parts
    from lsun_hitl.truth import read_truth

    from .small_cascade import PARAMS

    one = Storage(str(tmp_path / "one"))
    build_pool(one, import_fashion_mnist(one, limit=3000, seed=2), client=dask_cluster)
    address = dask_cluster.scheduler.address
    # uniform training draws: with this seed the active draw's second model (a few dozen steps) decides nothing,
    # and the comparison needs decisions; the active draws' own partitionings are tests/test_active_sampling.py's
    base = dataclasses.replace(PARAMS, train_draw="uniform")
    with simulated_crowd(one, "trouser", SimulatedCrowd(read_truth(one, "trouser"), CrowdParams(seed=6))):
        first = run_cascade("trouser", one.url, params=base, dask_address=address)
    shutil.copytree(tmp_path / "one", tmp_path / "four")
    four = Storage(str(tmp_path / "four"))
    iterations = manifest_iterations(four, "trouser")
    funnels = [one.read_json(one.path(f"reports/trouser/funnel/iteration={k}.json")) for k in iterations[1:]]
    assert sum(f["model_positive"] + f["model_negative"] for f in funnels) > 0  # the model decided some
    assert len(iterations) >= 3 and all(stored_parts(one, "trouser", k) == 1 for k in iterations)
    model_iterations = [
        k for k in iterations[1:] if (tmp_path / f"one/calibration/trouser/iteration={k}.json").exists()
    ]
    for k in iterations[1:]:  # what the calibrations and splits wrote (and what follows them), made again
        shutil.rmtree(tmp_path / "four" / f"manifests/trouser/iteration={k}")
        (tmp_path / "four" / f"reports/trouser/funnel/iteration={k}.json").unlink()
    for k in model_iterations:
        (tmp_path / "four" / f"calibration/trouser/iteration={k}.json").unlink()
        (tmp_path / "four" / f"calibration/trouser/set-iteration={k}.parquet").unlink()
    shutil.rmtree(tmp_path / "four" / "datasets")
    params = dataclasses.replace(base, manifest_partition=750)  # 3,000 rows: 4 parts
    with simulated_crowd(four, "trouser", SimulatedCrowd(read_truth(four, "trouser"), CrowdParams(seed=6))):
        again = run_cascade("trouser", four.url, params=params, dask_address=address)
    assert all(stored_parts(four, "trouser", k) == 4 for k in iterations[1:])
    for k in iterations:
        assert read_manifest(four, "trouser", k).to_table().equals(read_manifest(one, "trouser", k).to_table()), k
        funnel = f"reports/trouser/funnel/iteration={k}.json"
        if k:
            assert four.read_json(four.path(funnel)) == one.read_json(one.path(funnel)), k
    assert len(model_iterations) >= 2
    for k in model_iterations:
        # The same thresholds and calibration sets. Not compared: people's posteriors of rechecked images and
        # the label noise reported from them, which can differ in a few decimals between a run and its re-run
        # (the recheck's answers may still be arriving when the first run calibrates: issue 28's replay); the
        # side of each label, which is all the bounds count, must be the same.
        thresholds = f"calibration/trouser/iteration={k}.json"
        got, want = four.read_json(four.path(thresholds)), one.read_json(one.path(thresholds))
        assert {**got, "label_noise": None} == {**want, "label_noise": None}, k
        chosen_on = f"calibration/trouser/set-iteration={k}.parquet"
        got, want = four.read_table(four.path(chosen_on)), one.read_table(one.path(chosen_on))
        assert got.drop_columns(["p_positive"]).equals(want.drop_columns(["p_positive"])), k
        sides = [t.column("p_positive").to_numpy(zero_copy_only=False) >= 0.5 for t in (got, want)]
        assert np.array_equal(*sides), k
    from lsun_hitl.dataset_parts import dataset_files
    from lsun_hitl.dataset_parts import read_dataset as read_final

    assert len(dataset_files(four, "trouser")) == 4 and len(dataset_files(one, "trouser")) == 1
    assert read_final(four, "trouser").equals(read_final(one, "trouser"))
    assert again == first
    # a run that died between a split's commit and its funnel file gets the funnel back from the commit
    from lsun_hitl.cascade import start

    lost = tmp_path / "four" / f"reports/trouser/funnel/iteration={iterations[1]}.json"
    kept = lost.read_bytes()
    lost.unlink()
    assert start(four, "trouser", params) == iterations[-1]
    assert four.read_json(str(lost)) == json.loads(kept)


def test_the_flow_s_sample_step_is_the_same_for_1_and_4_manifest_parts_on_dask(tmp_path, dask_cluster):
    """``cascade.sample`` (the flow's draw): the same rows, ids and roles whether the previous manifest is one
    part read here or four mapped on the cluster, with sizes from the commit's counts and ids from the pool."""
    from lsun_hitl import cascade
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.ingest import POOL_ROW_GROUP
    from lsun_hitl.manifest import NEGATIVE, UNLABELED, CascadeState, write_manifest
    from lsun_hitl.storage import POOL, sample_key

    n = 3 * POOL_ROW_GROUP + 123  # the pool in several row groups: ids are read group by group
    ids = pa.array([f"{i:032x}" for i in range(n)])
    state = CascadeState.initial(ids)
    state.state[np.random.default_rng(0).random(n) < 0.4] = NEGATIVE
    params = CascadeParams(train_sample=700, first_calibration_sample=900)
    tables = []
    for name, parts, address in (("one", 1, None), ("four", 4, dask_cluster.scheduler.address)):
        storage = Storage(str(tmp_path / name))
        storage.write_table(storage.path(POOL), pa.table({"image_id": ids}), row_group_size=POOL_ROW_GROUP)
        write_manifest(storage, "shirt", 0, state, n_parts=parts)
        drawn = cascade.sample(storage, "shirt", params, 1, address)
        assert len(drawn.train) == 700 and len(drawn.calibration) == 900
        tables.append(storage.read_table(storage.path(sample_key("shirt", 1))))
    one, four = tables
    assert one.equals(four)
    assert one.column("role").to_pylist() == ["train"] * 700 + ["calibration"] * 900
    rows = one.column("row").to_numpy()
    assert (state.state[rows] == UNLABELED).all() and len(np.unique(rows)) == 1_600
    assert one.column("image_id").to_pylist() == ids.take(pa.array(rows)).to_pylist()
