"""The model-input cache: scoring from it gives the scores decoding gives, and a pool is decoded once."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl import model as model_lib
from lsun_hitl.cascade.score import score_parts
from lsun_hitl.config import ModelParams
from lsun_hitl.inputs import InputCache, pool_fingerprint, shard_rows_for, stored_pool_fingerprint
from lsun_hitl.manifest import NEGATIVE, UNLABELED, CascadeState, write_manifest
from lsun_hitl.partitions import Partitioning
from lsun_hitl.scoring import read_pool_images, score_candidates, score_pool, score_ranges
from lsun_hitl.storage import POOL, Storage, scores_dir

from .conftest import png_bytes

SIZE = 16


@pytest.fixture()
def pool(tmp_path, fashion) -> tuple[Storage, pa.Table, str]:
    """1,300 pool images (three shards of 512 rows) in a local root, one of them not an image; a model."""
    storage = Storage(str(tmp_path / "root"))
    images, _ = fashion
    uris = []
    for i in range(1300):
        path = storage.path(f"images/{i:05d}.png")
        data = b"not an image" if i == 700 else png_bytes(images[i])
        storage.write_bytes(path, data)
        uris.append(storage.url_of(f"images/{i:05d}.png"))
    table = pa.table({"image_id": [f"id{i:05d}" for i in range(1300)], "uri": uris})
    storage.write_table(storage.path(POOL), table)
    net = model_lib.build(ModelParams(arch="small_convnet", image_size=SIZE)).eval()
    model_path = storage.path("models/m.pt")
    storage.write_bytes(model_path, model_lib.save(net))
    return storage, table, model_path


def _score(storage, table, model_path, category, rows, client, cache):
    todo = table.take(pa.array(rows, pa.int64()))
    if cache is not None:
        todo = todo.add_column(0, "row", pa.array(rows, pa.int64()))
    scores = score_candidates(
        storage, category, 1, todo, model_path, client=client, partition_size=200, pool=table, cache=cache
    )
    return scores, storage.read_json(storage.path(scores_dir(category, 1), "stats.json"))


def test_cached_scores_equal_decoded_and_each_shard_is_decoded_once(pool, dask_cluster):
    storage, table, model_path = pool
    cache = InputCache(storage, pool_fingerprint(table.column("image_id")), SIZE, shard_rows=512)
    rng = np.random.default_rng(0)
    # category a scores rows of shards 0 and 1 only; b scores a different subset reaching shard 2
    rows_a = np.sort(rng.choice(1024, 600, replace=False))
    rows_b = np.union1d(rng.choice(1300, 900, replace=False), [700])  # with the file that is not an image

    plain, stats_plain = _score(storage, table, model_path, "plain", rows_b, dask_cluster, None)
    assert stats_plain["decoded"] == len(rows_b) and stats_plain["from_cache"] == 0

    a, stats_a = _score(storage, table, model_path, "a", rows_a, dask_cluster, cache)
    assert stats_a["decoded"] == 1024, "the first pass decodes the two shards it touches whole"
    # training reads: rows of the stored shards come from the cache, the others (shard 2) are decoded
    some = np.array([1299, 3, 700, 1100, 512, 9])
    cached_images, cached_ok = read_pool_images(storage, some, SIZE, cache)
    decoded_images, decoded_ok = read_pool_images(storage, some, SIZE)
    assert np.array_equal(cached_images, decoded_images) and np.array_equal(cached_ok, decoded_ok)
    assert cached_ok.tolist() == [True, True, False, True, True, True], "row 700 is not an image"
    assert cache.take(some)[2].tolist() == [False, True, True, False, True, True]
    assert stats_a["from_cache"] == 0
    assert cache.complete() == {0, 1}
    b, stats_b = _score(storage, table, model_path, "b", rows_b, dask_cluster, cache)
    assert stats_b["decoded"] == 1300 - 1024, "only the shard no pass had reached is decoded"
    assert stats_b["from_cache"] == np.sum(rows_b < 1024) and cache.complete() == {0, 1, 2}
    again, stats_again = _score(storage, table, model_path, "c", rows_b, dask_cluster, cache)
    assert stats_again["decoded"] == 0 and stats_again["from_cache"] == len(rows_b)

    for got, rows in ((a, rows_a), (b, rows_b), (again, rows_b)):
        assert got.column("image_id").to_pylist() == table.column("image_id").take(pa.array(rows)).to_pylist()
    ref = plain.column("score").to_numpy(zero_copy_only=False)
    for got in (b, again):
        s = got.column("score").to_numpy(zero_copy_only=False)
        assert np.array_equal(np.isnan(s), np.isnan(ref)), "the same images are unreadable"
        np.testing.assert_allclose(s[~np.isnan(s)], ref[~np.isnan(ref)], rtol=0, atol=1e-6)
    bad = int(np.searchsorted(rows_b, 700))
    assert np.isnan(ref[bad]) and plain.column("error")[bad].as_py()
    assert again.column("error")[bad].as_py() == plain.column("error")[bad].as_py()


def test_fingerprint_and_shard_size():
    ids = pa.array(["ab", "c"])
    assert pool_fingerprint(ids) != pool_fingerprint(pa.array(["a", "bc"])), "id boundaries count"
    assert pool_fingerprint(ids) == pool_fingerprint(pa.chunked_array([["ab"], ["c"]])), "chunking does not"
    assert pool_fingerprint(ids) != pool_fingerprint(pa.array(["c", "ab"]))
    assert shard_rows_for(32) == 16384 and shard_rows_for(64) == 4096 and shard_rows_for(224) == 512


def test_the_scoring_step_planned_per_range_gives_the_same_scores_for_any_partitioning(pool, dask_cluster):
    """The flow's scoring step (``score_pool``): each range of the manifest's parts plans its own candidates, so
    1 and 4 parts, with and without the cache, score the same candidates in the same order to the same values;
    no shard is decoded by two ranges; a part lost after the step is the only one scored again."""
    storage, table, model_path = pool
    state = CascadeState.initial(table.column("image_id").combine_chunks())
    state.state[1::7] = NEGATIVE  # decided before: not candidates (row 700, not an image, stays one)
    train = np.arange(3, 1300, 11)
    train = train[state.state[train] == UNLABELED]
    expected = np.setdiff1d(np.flatnonzero(state.state == UNLABELED), train)
    assert stored_pool_fingerprint(storage) == pool_fingerprint(table.column("image_id"))
    runs = {}
    for category, parts, shard_rows, client in (
        ("one", 1, None, None),
        ("four", 4, None, dask_cluster),
        ("one-cached", 1, 512, dask_cluster),
        ("four-cached", 4, 256, dask_cluster),
    ):
        write_manifest(storage, category, 0, state, n_parts=parts)
        cache = None if shard_rows is None else InputCache(storage, category + "-shards", SIZE, shard_rows)
        stats = score_pool(
            storage,
            category,
            1,
            model_path,
            starts=Partitioning(1300, parts).starts,
            train=train,
            client=client,
            partition_size=97,
            cache=cache,
        )
        files, sizes = score_parts(storage, category, 1)
        got = pa.concat_tables([storage.read_table(f) for f in files])
        assert got.column("image_id").to_pylist() == table.column("image_id").take(pa.array(expected)).to_pylist()
        assert list(sizes) == stats["part_rows"] and stats["candidates"] == len(expected)
        assert stats["scored"] == len(expected) - 1, "every candidate scored but the file that is not an image"
        if cache is not None:
            assert stats["decoded"] == 1300, "each shard decoded once, by one range"
        runs[category] = (got.column("score").to_numpy(zero_copy_only=False), stats)
    ref = runs["one"][0]
    for scores, _ in runs.values():
        assert np.array_equal(np.isnan(scores), np.isnan(ref))
        np.testing.assert_allclose(scores[~np.isnan(scores)], ref[~np.isnan(ref)], rtol=0, atol=1e-6)
    # ranges: the 4 parts' bounds (325, 650, 975) moved to the nearest 256-row shard boundary
    assert score_ranges(Partitioning(1300, 4).starts, 256) == [(0, 256), (256, 768), (768, 1024), (1024, 1300)]
    # a lost part is scored again, alone; the others are kept
    files, _ = score_parts(storage, "four", 1)
    kept = {f: os.stat(f).st_ino for f in files}
    os.unlink(files[2])
    again = score_pool(
        storage,
        "four",
        1,
        model_path,
        starts=Partitioning(1300, 4).starts,
        train=train,
        client=dask_cluster,
        partition_size=97,
    )
    assert again["decoded"] == again["part_rows"][2] and again["part_rows"] == runs["four"][1]["part_rows"]
    assert {f: os.stat(f).st_ino for f in files if f != files[2]} == {f: i for f, i in kept.items() if f != files[2]}


def _frozen_model(storage: Storage, name: str, backbone: bytes, seed: int) -> str:
    """A frozen-backbone small_convnet on ``backbone`` (state-dict bytes) with a head fit to random targets."""
    params = ModelParams(arch="small_convnet", image_size=SIZE, freeze_backbone=True, threads=1)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (64, SIZE, SIZE, 3), dtype=np.uint8)
    net = model_lib.train(images, (rng.random(64) < 0.5).astype(np.float32), params, seed=seed, pretrained=backbone)
    path = storage.path(f"models/{name}.pt")
    storage.write_bytes(path, model_lib.save(net))
    return path


def test_a_frozen_backbone_s_features_are_computed_once_per_pool_and_every_category_scores_from_them(
    pool, dask_cluster
):
    import io

    import torch

    storage, table, _ = pool
    cache = InputCache(storage, pool_fingerprint(table.column("image_id")), SIZE, shard_rows=512)

    def backbone(seed: int) -> bytes:
        torch.manual_seed(seed)
        buf = io.BytesIO()
        torch.save(model_lib.Classifier("small_convnet", SIZE).net.state_dict(), buf)
        return buf.getvalue()

    shared = backbone(1)
    first, second = _frozen_model(storage, "first", shared, 0), _frozen_model(storage, "second", shared, 1)
    other = _frozen_model(storage, "other", backbone(2), 2)
    ids = {p: model_lib.load(storage.read_bytes(p)).backbone_id for p in (first, second, other)}
    assert ids[first] == ids[second] != ids[other] and ids[first] is not None

    rows = np.union1d(np.random.default_rng(3).choice(1300, 800, replace=False), [700])
    plain = {p: _score(storage, table, p, f"plain-{i}", rows, dask_cluster, None)[0] for i, p in enumerate(ids)}
    got_1, stats_1 = _score(storage, table, first, "one", rows, dask_cluster, cache)
    assert stats_1["decoded"] == 1300 and stats_1["from_features"] == 0, "the first pass decodes and embeds"
    features = storage.path("cache/features", f"pool={cache.fingerprint}", f"backbone={ids[first]}", "precision=fp32")
    assert sorted(os.listdir(features)) == [f"shard-{k:06d}.npy" for k in range(3)]
    got_2, stats_2 = _score(storage, table, second, "two", rows, dask_cluster, cache)
    assert stats_2["decoded"] == 0 and stats_2["from_features"] == len(rows), "another category reads features"
    got_3, stats_3 = _score(storage, table, other, "three", rows, dask_cluster, cache)
    assert stats_3["decoded"] == 0 and stats_3["from_features"] == 0, "another backbone embeds from the inputs"

    for got, path in ((got_1, first), (got_2, second), (got_3, other)):
        s, ref = (t.column("score").to_numpy(zero_copy_only=False) for t in (got, plain[path]))
        assert np.array_equal(np.isnan(s), np.isnan(ref)) and np.isnan(s).sum() == 1, "row 700 only"
        np.testing.assert_allclose(s[~np.isnan(s)], ref[~np.isnan(ref)], rtol=0, atol=1e-5)
    assert not np.allclose(
        got_1.column("score").to_numpy(zero_copy_only=False)[:50],
        got_2.column("score").to_numpy(zero_copy_only=False)[:50],
    ), "two heads on one backbone score differently"
    bad = int(np.searchsorted(rows, 700))
    assert got_2.column("error")[bad].as_py() == plain[second].column("error")[bad].as_py()


def test_the_input_cache_benchmark_runs_small_and_a_frozen_backbone_s_later_passes_read_features(pool, capsys):
    """benchmarks/input_cache.py on 1,300 images, three categories (CI's small version; figures are not checked)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import input_cache

    storage, _, _ = pool
    argv = ["--root", storage.root, "--categories", "3", "--arch", "small_convnet", "--image-size", "16"]
    assert input_cache.main([*argv, "--sample", "100", "--frozen"]) == 0
    out = capsys.readouterr().out
    assert "decoded 1,300, from stored features 0" in out, "the first pass decodes and stores features"
    assert out.count("decoded 0, from stored features 1,300") == 2, "the other two read them"
    assert "| 3 categories, cache |" in out and "x one uncached pass (goal <= 2x)" in out
    assert not os.path.exists(os.path.join(storage.root, "bench-input-cache")), "the benchmark cleans up"
