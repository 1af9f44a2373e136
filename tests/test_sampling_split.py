import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl.calibration import Thresholds
from lsun_hitl.manifest import (
    BY_HUMAN,
    BY_MODEL,
    NEGATIVE,
    POSITIVE,
    ROLE_TRAIN,
    UNLABELED,
    CascadeState,
    check_transition,
)
from lsun_hitl.sampling import draw_sample
from lsun_hitl.split import apply_human_labels, apply_thresholds, stop_reason


def test_sample_is_seeded_disjoint_and_capped():
    unl = np.arange(0, 10_000, 2)
    a = draw_sample(unl, n_train=300, n_calibration=200, max_fraction=0.25, seed=7, iteration=1)
    b = draw_sample(unl, n_train=300, n_calibration=200, max_fraction=0.25, seed=7, iteration=1)
    c = draw_sample(unl, n_train=300, n_calibration=200, max_fraction=0.25, seed=7, iteration=2)
    assert np.array_equal(a.train, b.train) and not np.array_equal(a.train, c.train)
    assert len(np.intersect1d(a.train, a.calibration)) == 0
    assert set(a.train) <= set(unl) and set(a.calibration) <= set(unl)
    small = draw_sample(unl[:400], n_train=300, n_calibration=200, max_fraction=0.25, seed=0, iteration=1)
    assert len(small.train) == 100 and len(small.calibration) == 100
    budget = draw_sample(unl, n_train=300, n_calibration=200, max_fraction=0.25, seed=0, iteration=1, budget_left=250)
    assert len(budget.calibration) == 200 and len(budget.train) == 50


def state(n=10):
    return CascadeState.initial(pa.array([f"{i:04d}" for i in range(n)]))


def test_split_decides_only_unlabeled_and_never_flips():
    s = state()
    apply_human_labels(s, np.array([0, 1]), np.array([0.9, 0.1]), ROLE_TRAIN, 1)
    before = s.copy()
    th = Thresholds(0.8, 0.2, None, None, 0, 0, 0, 0.95)
    scores = np.array([0.1, 0.95, 0.5, 0.05, np.nan, 0.9], np.float32)
    pos, neg = apply_thresholds(s, np.array([0, 1, 2, 3, 4, 5]), scores, th, 2)
    assert (pos, neg) == (1, 1)  # rows 5 and 3; rows 0, 1 were already decided by people
    assert s.state[0] == POSITIVE and s.decided_by[0] == BY_HUMAN
    assert s.state[5] == POSITIVE and s.decided_by[5] == BY_MODEL and s.decided_iteration[5] == 2
    assert s.state[3] == NEGATIVE and s.state[2] == UNLABELED and s.state[4] == UNLABELED
    check_transition(before, s)
    with pytest.raises(ValueError):
        apply_human_labels(s, np.array([5]), np.array([0.1]), ROLE_TRAIN, 3)
    flipped = s.copy()
    flipped.state[5] = NEGATIVE
    with pytest.raises(AssertionError):
        check_transition(s, flipped)


def test_manifest_table_roundtrip():
    s = state()
    apply_human_labels(s, np.array([2]), np.array([0.7]), ROLE_TRAIN, 1)
    apply_thresholds(
        s, np.array([3, 4]), np.array([0.99, 0.01], np.float32), Thresholds(0.9, 0.1, None, None, 0, 0, 0, 0.95), 1
    )
    t = s.to_table()
    assert t.column("state").to_pylist()[2:5] == ["positive", "positive", "negative"]
    assert t.column("decided_by").to_pylist()[2:5] == ["human", "model", "model"]
    assert t.column("decided_iteration").to_pylist()[0] is None
    back = CascadeState.from_table(t)
    for name in ("state", "decided_iteration", "decided_by", "human_role"):
        assert np.array_equal(getattr(back, name), getattr(s, name)), name


def test_stop_rules():
    kw = dict(
        pool=10_000,
        iteration=1,
        human_labeled=100,
        max_iterations=5,
        stop_unlabeled=100,
        stop_unlabeled_fraction=0.02,
        human_budget=None,
    )
    assert stop_reason(unlabeled=5000, **kw) is None
    assert "left unlabeled" in stop_reason(unlabeled=150, **kw)
    assert "budget" in stop_reason(unlabeled=5000, **kw | {"human_budget": 100})
    # 300 labels left cannot buy a calibration sample that certifies anything (437 needed): spent
    assert "300 labels left" in stop_reason(unlabeled=5000, **kw | {"human_budget": 400, "min_sample": 437})
    assert stop_reason(unlabeled=5000, **kw | {"human_budget": 600, "min_sample": 437}) is None
    assert "iteration limit" in stop_reason(unlabeled=5000, **kw | {"iteration": 5})
    assert "every image" in stop_reason(unlabeled=0, **kw)
    # finishing by hand is cheaper than another iteration of 1,000 images
    assert "fewer than another iteration" in stop_reason(unlabeled=900, **kw | {"next_sample": 1000})
    assert stop_reason(unlabeled=1100, **kw | {"next_sample": 1000}) is None


def test_the_remainder_goes_to_people_only_within_the_budget():
    from lsun_hitl.split import remainder_to_people

    assert remainder_to_people(25_000, 5_500, None)  # no budget: people always finish
    assert remainder_to_people(1_200, 5_500, 7_000)  # fits in the 1,500 left
    assert remainder_to_people(1_500, 5_500, 7_000)
    assert not remainder_to_people(1_501, 5_500, 7_000)  # does not fit: stays unresolved
    assert not remainder_to_people(0, 5_500, None)  # nothing to ask


def test_calibration_images_still_undecided_are_carried_over(tmp_path):
    """Earlier calibration images between the last thresholds join the next calibration set."""
    from lsun_hitl.cascade import carried_calibration, new_calibration_size
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.storage import Storage, calibration_key, calibration_set_key

    storage = Storage(str(tmp_path))
    scores = np.array([0.01, 0.2, 0.5, 0.8, 0.99, np.nan], np.float32)
    storage.write_table(
        storage.path(calibration_set_key("bag", 1)),
        pa.table(
            {
                "row": pa.array(np.arange(6), pa.int64()),
                "image_id": [f"i{k}" for k in range(6)],
                "p_positive": pa.array([0, 0, 1, 1, 1, 0], pa.float32()),
                "from_iteration": pa.array([1] * 6, pa.int32()),
                "score": pa.array(scores),
            }
        ),
    )
    storage.write_json(
        storage.path(calibration_key("bag", 1)),
        Thresholds(0.9, 0.1, None, None, 6, 1, 1, 0.95).to_dict(),
    )
    params = CascadeParams(calibration_sample=1000, calibration_min_new=300, carry_calibration=True)
    carried = carried_calibration(storage, "bag", params, 2)
    assert carried.column("image_id").to_pylist() == ["i1", "i2", "i3"]  # 0.01 and 0.99 were decided, NaN too
    assert "score" not in carried.column_names
    assert carried_calibration(storage, "bag", params, 1).num_rows == 0
    assert carried_calibration(storage, "bag", CascadeParams(), 2).num_rows == 0  # off by default
    assert new_calibration_size(params, 3, 2) == 997 and new_calibration_size(params, 900, 2) == 300
    assert new_calibration_size(CascadeParams(carry_calibration=False, calibration_sample=800), 900, 2) == 800
    # the first iteration draws its own, larger calibration sample (its cut decides most of the pool)
    assert new_calibration_size(CascadeParams(), 0, 1) == 3000 and new_calibration_size(CascadeParams(), 0, 2) == 1500


def test_a_remainder_that_does_not_fit_the_budget_is_no_reason_to_stop(tmp_path):
    """ "People finishing is cheaper than another round" holds only where people will finish: under a budget
    the remainder does not fit, the loop goes on while the budget can still buy a useful iteration."""
    from lsun_hitl.cascade import should_stop
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.manifest import NEGATIVE, CascadeState, write_manifest
    from lsun_hitl.split import apply_human_labels
    from lsun_hitl.storage import Storage

    storage = Storage(str(tmp_path))
    state = CascadeState.initial(pa.array([f"i{k}" for k in range(20_000)]))
    apply_human_labels(state, np.arange(5_500), np.zeros(5_500), 1, 1)  # the first iteration's samples
    state.state[5_500:16_800] = NEGATIVE  # the model decided 11,300 negatives; 3,200 are left
    write_manifest(storage, "coat", 1, state)
    params = CascadeParams(stop_unlabeled=0, stop_unlabeled_fraction=0.0)
    assert "fewer than another iteration" in should_stop(storage, "coat", params, 1)  # people finish 3,200
    budget = CascadeParams(stop_unlabeled=0, stop_unlabeled_fraction=0.0, human_budget=7_000)
    assert should_stop(storage, "coat", budget, 1) is None  # 1,500 left: another iteration, not a remainder
    assert "budget nearly spent" in should_stop(storage, "coat", CascadeParams(human_budget=5_900), 1)


def test_a_funnel_logs_as_one_readable_line():
    from lsun_hitl.split import Funnel

    f = Funnel(1, 70_000, 5_500, 550, 67_500, 0, 57_254, 7_246, None, 0.28394, None, None, 0.00603, 0.00978)
    line = str(f)
    assert "\n" not in line and "Funnel(" not in line
    assert line.startswith("iteration 1: 70,000 open -> people labeled 5,500 (550 yes)")
    assert (
        "0 positive [no cut]" in line and "57,254 negative [cut at 0.2839, false omission 0.0060 (<= 0.0098)]" in line
    )
    assert line.endswith("7,246 open")
