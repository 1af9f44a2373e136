"""Training samples chosen for learning, calibration samples a uniform draw over what training leaves open.

The bounds on the model's decisions hold only if the calibration images are a uniform draw from the images the
model then decides. These tests fail if the calibration draw leans on how the training sample was chosen.
"""

import numpy as np
import pyarrow as pa

from lsun_hitl.manifest_parts import train_draws
from lsun_hitl.partitions import bottom_k, merge_bottom_k, sample_keys
from lsun_hitl.sampling import compose_sample
from lsun_hitl.storage import Storage


def _pool(n: int = 3000, rare: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open rows, their truth (``rare`` positives) and a last model's scores that rank positives high."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    truth = rng.random(n) < rare
    scores = np.where(truth, rng.beta(5, 2, n), rng.beta(1, 12, n)).astype(np.float32)
    return rows, truth, scores


def _draw(rows, scores, *, iteration, n_train=600, n_calibration=300, active=True):
    order, _ = bottom_k(rows, sample_keys(rows, seed=1, iteration=iteration, category="bag"), len(rows))
    uniform, by_score = train_draws(rows, scores, seed=1, iteration=iteration, category="bag", k=n_train)
    by_score_rows = by_score[0] if active else np.zeros(0, np.int64)
    return order, compose_sample(order, uniform[0], by_score_rows, n_train=n_train, n_calibration=n_calibration)


def test_the_calibration_sample_is_uniform_over_what_the_active_training_sample_leaves_open():
    """Over 300 draws the calibration images' mean score is the mean over the open images training left (a
    uniform draw from them), not the mean over all open images (a draw that ignored training), though the
    training sample takes several times the base rate of positives."""
    rows, truth, scores = _pool()
    s = scores.astype(np.float64)
    gaps_left, gaps_all, enrichment = [], [], []
    for iteration in range(1, 301):
        order, drawn = _draw(rows, scores, iteration=iteration)
        assert len(drawn.train) == 600 and len(drawn.calibration) == 300
        assert len(np.intersect1d(drawn.train, drawn.calibration)) == 0
        # the calibration sample is the calibration stream's first 300 open rows that training did not take
        assert np.array_equal(drawn.calibration, np.sort(order[~np.isin(order, drawn.train)][:300]))
        left = ~np.isin(rows, drawn.train)
        cal = np.isin(rows, drawn.calibration)
        gaps_left.append(s[cal].mean() - s[left].mean())
        gaps_all.append(s[cal].mean() - s.mean())
        enrichment.append(truth[np.isin(rows, drawn.train)].mean() / truth.mean())
    se = np.std(gaps_left) / np.sqrt(len(gaps_left))
    assert abs(np.mean(gaps_left)) < 4 * se, (np.mean(gaps_left), se)
    assert np.mean(gaps_all) < -10 * se  # the test can tell: training took the high scores out of what is left
    assert np.mean(enrichment) > 2  # and the training sample is rich in positives


def test_the_calibration_draw_is_the_same_stream_whatever_chose_the_training_sample():
    """Uniform and active training samples of one iteration: each calibration sample is the first rows of the
    same calibration stream that its training sample left; the uniform one is today's draw (first rows calibrate,
    the next train), and the active one differs only by the rows its training took."""
    rows, _, scores = _pool(seed=3)
    order, uniform = _draw(rows, scores, iteration=2, active=False)
    _, active = _draw(rows, scores, iteration=2, active=True)
    assert np.array_equal(uniform.calibration, np.sort(order[:300]))
    assert np.array_equal(uniform.train, np.sort(order[300:900]))
    assert np.array_equal(active.calibration, np.sort(order[~np.isin(order, active.train)][:300]))
    taken = np.isin(uniform.calibration, active.train)
    assert np.array_equal(np.setdiff1d(uniform.calibration, active.train), uniform.calibration[~taken])
    # no scores yet (the first iteration): the active draw is the uniform one
    _, first = _draw(rows, np.full(len(rows), np.nan, np.float32), iteration=2, active=True)
    assert np.array_equal(first.calibration, uniform.calibration) and np.array_equal(first.train, uniform.train)


def test_training_draws_are_the_same_over_any_partitioning():
    rows, _, scores = _pool(n=5000, seed=5)
    whole_uniform, whole_score = train_draws(rows, scores, seed=0, iteration=3, category="bag", k=400)
    for n_parts in (4, 64):
        bounds = np.linspace(0, len(rows), n_parts + 1).astype(int)
        mapped = [
            train_draws(rows[a:b], scores[a:b], seed=0, iteration=3, category="bag", k=400)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        assert np.array_equal(merge_bottom_k([m[0] for m in mapped], 400)[0], whole_uniform[0])
        assert np.array_equal(merge_bottom_k([m[1] for m in mapped], 400)[0], whole_score[0])
    # the score-weighted draw never takes a row without a positive score; the uniform one may
    scores[:2500] = np.nan
    _, by_score = train_draws(rows, scores, seed=0, iteration=3, category="bag", k=400)
    assert not np.isin(by_score[0], rows[:2500]).any()


def test_the_flow_s_active_sample_is_the_same_stored_with_the_manifest_or_drawn_on_dask(tmp_path, dask_cluster):
    """Iteration 2's sample (``cascade.sample``): drawn from the draws the split stored with iteration 1's
    manifest, or by a map over one or four parts on the cluster where none was stored: the same rows and roles,
    its training half taken by score, its calibration the first open rows of the calibration stream training
    left."""
    from lsun_hitl import cascade
    from lsun_hitl.cascade.sample import largest_sample, largest_train
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.manifest import CascadeState, write_manifest
    from lsun_hitl.manifest_parts import IterationUpdate, advance_part, split_off_next_train, store_next_train
    from lsun_hitl.partitions import Partitioning, commit, commit_record, new_attempt
    from lsun_hitl.storage import POOL, manifest_dir, sample_key

    n = 6000
    ids = pa.array([f"{i:032x}" for i in range(n)])
    rng = np.random.default_rng(0)
    truth = rng.random(n) < 0.05
    before = CascadeState.initial(ids)
    params = CascadeParams(train_sample=500, first_calibration_sample=600, calibration_sample=600, seed=4)
    tables = []
    for name, parts, address, stored in (
        ("stored", 1, None, True),
        ("one", 1, None, False),
        ("four", 4, dask_cluster.scheduler.address, False),
    ):
        storage = Storage(str(tmp_path / name))
        storage.write_table(storage.path(POOL), pa.table({"image_id": ids}))
        write_manifest(storage, "bag", 0, before, n_parts=parts)
        scores = np.where(truth, 0.8, 0.05).astype(np.float32)
        update = IterationUpdate(
            iteration=1,
            train=np.arange(0, 300, dtype=np.int64),
            train_p=truth[:300].astype(np.float32),
            scored_rows=np.arange(300, n, dtype=np.int64),
            scores=scores[300:],
            next_sample=(params.seed, largest_sample(params)) if stored else None,
            next_train=(params.seed, largest_train(params)) if stored else None,
        )
        partitioning = Partitioning(n, parts)
        attempt = new_attempt()
        counts = [advance_part(storage, "bag", partitioning, p, update, attempt) for p in range(parts)]
        meta = {
            "counts": [
                {k: c[k] for k in ("unlabeled", "positive", "negative", "human", "human_positive")} for c in counts
            ]
        }
        if stored:
            from lsun_hitl.manifest_parts import split_off_next_sample, store_next_sample

            trains = split_off_next_train(counts)
            _, draws = split_off_next_sample(counts)
            directory = manifest_dir("bag", 1)
            meta["next_sample"] = store_next_sample(
                storage, directory, attempt, draws, iteration=2, seed=params.seed, k=largest_sample(params)
            )
            meta["next_train"] = store_next_train(
                storage, directory, attempt, trains, iteration=2, seed=params.seed, k=largest_train(params)
            )
        commit(storage, manifest_dir("bag", 1), attempt, parts, n, meta=meta)
        assert ("next_train" in commit_record(storage, manifest_dir("bag", 1))) == stored
        drawn = cascade.sample(storage, "bag", params, 2, address)
        assert len(drawn.train) == 500 and len(drawn.calibration) == 600
        assert truth[drawn.train].mean() > 3 * truth[300:].mean()  # half of it by score: rich in positives
        assert not np.isin(drawn.train, np.arange(300)).any()  # only open rows
        tables.append(storage.read_table(storage.path(sample_key("bag", 2))))
    assert tables[0].equals(tables[1]) and tables[1].equals(tables[2])
    open_rows = np.arange(300, n, dtype=np.int64)
    order, _ = bottom_k(open_rows, sample_keys(open_rows, seed=4, iteration=2, category="bag"), len(open_rows))
    assert np.array_equal(drawn.calibration, np.sort(order[~np.isin(order, drawn.train)][:600]))


def test_seed_positives_stored_by_the_command_join_the_first_training_sample(tmp_path):
    """``lsun-hitl seed-positives`` (as a user runs it, URIs in a CSV) stores the images; the first iteration's
    training sample holds every one of them beside its uniform draw, and its calibration sample is still the
    calibration stream's first open rows that training did not take."""
    import subprocess
    import sys
    from pathlib import Path

    from lsun_hitl import cascade
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.manifest_parts import write_initial
    from lsun_hitl.partitions import Partitioning
    from lsun_hitl.storage import POOL

    n = 4000
    storage = Storage(str(tmp_path / "root"))
    ids = [f"{i:032x}" for i in range(n)]
    uris = [f"file:///images/{i}.png" for i in range(n)]
    storage.write_table(storage.path(POOL), pa.table({"image_id": ids, "uri": uris}))
    params = CascadeParams(train_sample=300, first_calibration_sample=500, seed=2)
    write_initial(storage, "bag", Partitioning(n, 1), next_sample=(params.seed, 300 + 500))
    seeds = np.array([5, 77, 1200, 3999])
    (tmp_path / "seeds.csv").write_text("uri\n" + "\n".join(uris[i] for i in seeds) + "\n")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cli", "seed-positives", "--root", storage.url, "--category", "bag"]
    done = subprocess.run([*cmd, str(tmp_path / "seeds.csv")], capture_output=True, text=True, cwd=repo, timeout=120)
    assert done.returncode == 0 and "4 seed positives stored for 'bag'" in done.stdout, done.stderr
    drawn = cascade.sample(storage, "bag", params, 1)
    assert len(drawn.train) == 300 and len(drawn.calibration) == 500
    assert np.isin(seeds, drawn.train).all()
    rows = np.arange(n, dtype=np.int64)
    order, _ = bottom_k(rows, sample_keys(rows, seed=2, iteration=1, category="bag"), n)
    assert np.array_equal(drawn.calibration, np.sort(order[~np.isin(order, drawn.train)][:500]))
