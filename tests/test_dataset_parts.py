"""The final dataset in committed parts (lsun_hitl.dataset_parts, cascade.finish) and the audit's draw: the same
dataset, summary and audit sample for 1, 4 and 7 manifest parts; the summary that the whole-state computation
gave; exports bounded by the batch size; an older root's one-file dataset still read and exported."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl import export
from lsun_hitl.cascade import Summary, audit_rows, finish, target_warnings
from lsun_hitl.config import CascadeParams
from lsun_hitl.dataset_parts import (
    dataset_files,
    dataset_table,
    dataset_totals,
    exact_sum,
    part_totals,
    read_dataset,
    reduce_totals,
)
from lsun_hitl.evaluation import evaluate
from lsun_hitl.manifest import (
    BY_HUMAN,
    BY_MODEL,
    NEGATIVE,
    POSITIVE,
    ROLE_CALIBRATION,
    ROLE_REMAINDER,
    ROLE_TRAIN,
    UNLABELED,
    CascadeState,
    write_manifest,
)
from lsun_hitl.partitions import commit_record
from lsun_hitl.split import Funnel
from lsun_hitl.storage import POOL, Storage, dataset_dir, dataset_key, groundtruth_key, report_key

CATEGORY = "shirt"
N = 5_003  # no multiple of 4 or 7: parts of unequal sizes
LAST = 3
PARAMS = CascadeParams(audit_sample=150, seed=11)


def ids(n: int, offset: int = 0) -> list[str]:
    return [f"{i + offset:032x}" for i in range(n)]


def write_pool(storage: Storage, n: int = N, offset: int = 0) -> None:
    """A pool of ``n`` images sorted by id, in row groups of 1,000 (a part's slice spans several)."""
    image_ids = ids(n, offset)
    pool = pa.table(
        {
            "image_id": image_ids,
            "uri": [f"file:///images/{i}.png" for i in image_ids],
            "bytes": pa.array(np.full(n, 100), pa.int64()),
            "width": pa.array(np.full(n, 28), pa.int32()),
            "height": pa.array(np.full(n, 28), pa.int32()),
            "format": ["PNG"] * n,
        }
    )
    storage.write_table(storage.path(POOL), pool, row_group_size=1_000)


def final_state(n: int = N, seed: int = 1) -> CascadeState:
    """A finished run's state: people's and the model's decisions, undecided rows, posteriors with no answer
    (NaN) and subnormal ones, scores with gaps."""
    rng = np.random.default_rng(seed)
    state = CascadeState.initial(pa.array(ids(n)))
    decided = rng.random(n) < 0.85
    human = decided & (rng.random(n) < 0.3)
    model = decided & ~human
    p = rng.random(n).astype(np.float32)
    p[rng.random(n) < 0.03] = np.float32(1e-40)
    p[rng.random(n) < 0.03] = np.float32(3e-9)
    p[rng.random(n) < 0.02] = np.nan
    state.p_positive[human] = p[human]
    state.state[human] = np.where(p[human] >= 0.5, POSITIVE, NEGATIVE)
    score = rng.normal(0, 3, n).astype(np.float32)
    score[rng.random(n) < 0.05] = np.nan
    state.score[~human] = score[~human]
    state.state[model] = np.where(score[model] > 0, POSITIVE, NEGATIVE)
    state.decided_by[human], state.decided_by[model] = BY_HUMAN, BY_MODEL
    state.decided_iteration[decided] = rng.integers(1, LAST + 1, int(decided.sum()))
    state.human_role[human] = rng.choice([ROLE_TRAIN, ROLE_CALIBRATION, ROLE_REMAINDER], int(human.sum()))
    return state


FUNNELS = [
    Funnel(k, 4000, 700, 90, 3000, 300 * k, 900 + k, 1000, 1.0, -1.0, 0.93 + k / 100, 0.9, 0.004 * k, 0.011)
    for k in range(1, LAST + 1)
]


def finished_root(path, n_parts: int) -> Storage:
    """A root whose run is over: the pool, iteration 0 and the last iteration's manifest in ``n_parts`` parts,
    the funnels."""
    storage = Storage(str(path))
    write_pool(storage)
    write_manifest(storage, CATEGORY, 0, CascadeState.initial(pa.array(ids(N))), n_parts=n_parts)
    write_manifest(storage, CATEGORY, LAST, final_state(), n_parts=n_parts)
    for f in FUNNELS:
        storage.write_json(storage.path(report_key(CATEGORY, f"funnel/iteration={f.iteration}.json")), f.to_dict())
    return storage


def whole_state_summary(state: CascadeState, total, stop: str, params: CascadeParams) -> Summary:
    """The summary as ``finish`` computed it from the whole state before datasets were partitioned, with the sum
    of people's posteriors taken by ``total``."""
    pos, neg, by_human = state.state == POSITIVE, state.state == NEGATIVE, state.decided_by == BY_HUMAN

    def share(p_human: np.ndarray, parts: list) -> tuple:
        n = len(p_human) + sum(c for c, _, _ in parts)
        est = bound = total(p_human)
        for count, rate, rate_bound in parts:
            est, bound = est + count * rate, bound + count * rate_bound
        return est / n, bound / n

    est, low = share(
        state.p_positive[pos & by_human], [(f.model_positive, f.precision, f.precision_low) for f in FUNNELS]
    )
    fo, fo_high = share(
        state.p_positive[neg & by_human], [(f.model_negative, f.false_omission, f.false_omission_high) for f in FUNNELS]
    )
    human = state.human_labeled()
    return Summary(
        category=CATEGORY,
        pool=len(state),
        positive=int(np.sum(pos)),
        negative=int(np.sum(neg)),
        unresolved=int(np.sum(state.state == UNLABELED)),
        decided_by_model=int(np.sum(state.decided_by == BY_MODEL)),
        human_labeled_images=human,
        human_labeled_share=human / len(state),
        human_answers=0,
        estimated_precision=est,
        estimated_precision_low=low,
        amplification=int(np.sum(state.state != UNLABELED)) / human,
        iterations=LAST,
        stop_reason=stop,
        estimated_false_omission=fo,
        estimated_false_omission_high=fo_high,
        warnings=target_warnings(est, fo, human / len(state), params),
    )


def test_exact_sums_add_up_the_same_for_any_grouping():
    rng = np.random.default_rng(0)
    x = rng.random(20_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-45, 3, 20_000).astype(np.float32)
    x[::7] *= -1
    x[::97] = np.nan
    x[5] = np.float32(1e-45)  # the smallest subnormal
    whole = exact_sum(x)
    assert Fraction(whole, 2**150) == sum(Fraction(float(v)) for v in x[~np.isnan(x)])
    assert whole / 2**150 == math.fsum(x[~np.isnan(x)].astype(np.float64))
    for n_parts in (4, 7, 64):
        assert sum(exact_sum(p) for p in np.array_split(x, n_parts)) == whole
    assert exact_sum(np.zeros(0, np.float32)) == 0 and exact_sum(np.array([np.nan], np.float32)) == 0


def test_finish_writes_the_same_dataset_summary_and_audit_sample_in_1_4_and_7_parts(tmp_path, dask_cluster):
    state = final_state()
    roots, summaries, audits = {}, {}, {}
    for n_parts in (1, 4, 7):
        roots[n_parts] = storage = finished_root(tmp_path / f"parts={n_parts}", n_parts)
        address = dask_cluster.scheduler.address if n_parts > 1 else None  # one part: in this process
        summaries[n_parts] = finish(storage, CATEGORY, "budget", PARAMS, dask_address=address)
        audits[n_parts] = audit_rows(storage, CATEGORY, PARAMS)
        files = dataset_files(storage, CATEGORY)
        assert len(files) == n_parts and all(f"/{dataset_dir(CATEGORY)}/attempt=" in f for f in files)
        stored = storage.read_json(storage.path(dataset_key(CATEGORY, "summary.json")))
        assert Summary(**{**stored, "warnings": tuple(stored["warnings"])}) == summaries[n_parts]
    one = read_dataset(roots[1], CATEGORY)
    for n_parts in (4, 7):
        assert read_dataset(roots[n_parts], CATEGORY).equals(one)
        assert summaries[n_parts] == summaries[1]
        assert all(np.array_equal(a, b) for a, b in zip(audits[n_parts], audits[1], strict=True))
    # the dataset is the state's rows beside the pool's uris, in pool order
    assert one.column("image_id").to_pylist() == ids(N)
    assert one.column("uri").to_pylist() == [f"file:///images/{i}.png" for i in ids(N)]
    names = np.array(["unresolved", "positive", "negative"])
    assert one.column("label").to_pylist() == names[state.state].tolist()
    by = np.array([None, "human", "model"], dtype=object)[state.decided_by]
    assert one.column("decided_by").to_pylist() == by.tolist()
    p = one.column("p_positive").to_numpy(zero_copy_only=False)
    assert np.array_equal(p, state.p_positive, equal_nan=True)
    # the summary is the whole-state computation's: exactly, with the posteriors summed exactly; within float32
    # rounding of the sum, with today's float32 nansum
    exact = whole_state_summary(state, lambda a: math.fsum(a[~np.isnan(a)].astype(np.float64)), "budget", PARAMS)
    assert summaries[1] == exact
    rounded = whole_state_summary(state, lambda a: float(np.nansum(a)), "budget", PARAMS)
    estimates = ("estimated_precision", "estimated_precision_low", "estimated_false_omission")
    estimates += ("estimated_false_omission_high",)
    for field in estimates:
        assert getattr(summaries[1], field) == pytest.approx(getattr(rounded, field), rel=1e-6, abs=0)
    unset = {**dict.fromkeys(estimates), "warnings": ()}
    assert dataclasses.replace(summaries[1], **unset) == dataclasses.replace(rounded, **unset)
    assert summaries[1].positive + summaries[1].negative + summaries[1].unresolved == N
    # a restarted finish keeps the committed dataset (no second map: the same attempt) and gives the same summary
    seven = roots[7]
    before = commit_record(seven, dataset_dir(CATEGORY))
    assert finish(seven, CATEGORY, "budget", PARAMS) == summaries[7]
    assert commit_record(seven, dataset_dir(CATEGORY))["attempt"] == before["attempt"]
    assert dataset_totals(seven, CATEGORY) == reduce_totals([part_totals(one)])
    # the audit: the model's positives and negatives, params.audit_sample of each, its own stream of the seed
    pos, neg = audits[1]
    model = state.decided_by == BY_MODEL
    assert len(pos) == len(neg) == PARAMS.audit_sample and np.all(np.diff(pos) > 0) and np.all(np.diff(neg) > 0)
    assert np.all(model[pos] & (state.state[pos] == POSITIVE)) and np.all(model[neg] & (state.state[neg] == NEGATIVE))
    other_pos, _ = audit_rows(seven, CATEGORY, dataclasses.replace(PARAMS, seed=12))
    assert len(np.intersect1d(other_pos, pos)) < 50  # ~ 150 x 150 / 1,900 model positives by chance
    everything, _ = audit_rows(seven, CATEGORY, dataclasses.replace(PARAMS, audit_sample=N))
    assert np.array_equal(everything, np.flatnonzero(model & (state.state == POSITIVE)))


def test_finish_refuses_a_manifest_of_another_pool(tmp_path):
    storage = finished_root(tmp_path, 1)
    write_pool(storage, offset=1)  # the pool rebuilt after the run: other ids
    with pytest.raises(ValueError, match="does not match the pool"):
        finish(storage, CATEGORY, "budget", PARAMS)
    assert dataset_files(storage, CATEGORY) is None and commit_record(storage, dataset_dir(CATEGORY)) is None


def test_exports_read_the_parts_in_batches_and_an_older_root_s_one_file_dataset_still_exports(tmp_path, dask_cluster):
    parts = finished_root(tmp_path / "parts", 7)
    finish(parts, CATEGORY, "budget", PARAMS, dask_address=dask_cluster.scheduler.address)
    # an older root: the same pool and run, its dataset one file written whole, no commit
    old = finished_root(tmp_path / "old", 1)
    uri = pa.array([f"file:///images/{i}.png" for i in ids(N)])
    old.write_table(old.path(dataset_key(CATEGORY)), dataset_table(final_state(), uri))
    assert dataset_files(old, CATEGORY) == [old.path(dataset_key(CATEGORY))]
    assert read_dataset(old, CATEGORY).equals(read_dataset(parts, CATEGORY))
    assert dataset_totals(old, CATEGORY) == dataset_totals(parts, CATEGORY)
    # batches of exactly batch_size rows across the parts' ends (parts of ~715 rows, batches of 1,000)
    batches = list(export.dataset_batches(parts, CATEGORY, batch_size=1_000))
    assert [b.num_rows for b in batches] == [1_000] * 5 + [3]
    exported = pa.concat_tables(batches)
    from_old = pa.concat_tables(export.dataset_batches(old, CATEGORY, batch_size=1_000))
    assert exported.to_pandas().equals(from_old.to_pandas())  # NaN scores at the same places count as equal
    assert exported.column("image_id").to_pylist() == ids(N) and set(exported.column("width").to_pylist()) == {28}
    positives = pa.concat_tables(export.dataset_batches(old, CATEGORY, batch_size=777, splits=["positive"]))
    assert positives.num_rows == int(np.sum(final_state().state == POSITIVE))
    # evaluation reads either layout
    truth = pa.table({"uri": uri, CATEGORY: pa.array(np.arange(N) % 3 == 0)})  # a yes/no per category
    for storage in (old, parts):
        storage.write_table(storage.path(groundtruth_key("synthetic")), truth)
    got = [evaluate(storage, CATEGORY) for storage in (old, parts)]
    assert got[0] == got[1] and got[0].unresolved == int(np.sum(final_state().state == UNLABELED))
    # finishing the older root commits parts and removes the one file they replace
    finish(old, CATEGORY, "budget", PARAMS)
    assert not old.exists(old.path(dataset_key(CATEGORY))) and len(dataset_files(old, CATEGORY)) == 1
    assert read_dataset(old, CATEGORY).equals(read_dataset(parts, CATEGORY))
    with pytest.raises(export.ExportError, match="has no finished dataset"):
        next(export.dataset_batches(parts, "coat"))
