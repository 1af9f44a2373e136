import numpy as np
import pytest

from lsun_hitl.calibration import choose_thresholds, clopper_pearson, zero_error_size


def synthetic(n, rng, base_rate=0.1, separation=4.0):
    y = rng.random(n) < base_rate
    logits = rng.normal(np.where(y, separation / 2, -separation / 2), 1.0)
    return 1 / (1 + np.exp(-logits)), y


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 59, 0.95)
    assert lo == 0 and hi == pytest.approx(1 - 0.05 ** (1 / 59), rel=1e-6)
    assert zero_error_size(0.05, 0.95) == 59
    lo, hi = clopper_pearson(5, 100, 0.95)
    assert 0.019 < lo < 0.05 < hi < 0.11


def test_thresholds_meet_targets_on_fresh_data():
    rng = np.random.default_rng(1)
    s, y = synthetic(3000, rng)
    th = choose_thresholds(s, y.astype(float), target_precision=0.95, target_false_omission=0.01)
    assert th.positive is not None and th.negative is not None and th.negative < th.positive
    assert th.precision.low >= 0.95 and th.false_omission.high <= 0.01
    # On a large fresh sample from the same distribution the targets hold.
    s2, y2 = synthetic(200_000, rng)
    assert y2[s2 >= th.positive].mean() >= 0.95
    assert y2[s2 <= th.negative].mean() <= 0.01


def test_useless_model_decides_nothing():
    rng = np.random.default_rng(2)
    y = rng.random(2000) < 0.3
    th = choose_thresholds(rng.random(2000), y.astype(float), target_precision=0.95, target_false_omission=0.01)
    assert th.positive is None and th.negative is None


def test_label_noise_is_reported_and_hard_counts_used():
    rng = np.random.default_rng(3)
    s, y = synthetic(2000, rng)
    p = np.where(y, 0.97, 0.02)
    th = choose_thresholds(s, p, target_precision=0.95, target_false_omission=0.01)
    assert th.label_noise == pytest.approx(np.mean(np.minimum(p, 1 - p)))
    assert th.positive is not None


def test_rechecking_disputed_labels_lifts_the_crowd_noise_floor():
    """Crowd labels 99.3% right hide a well-separated model's negatives behind a false-omission floor;
    asking again only where people and the model disagree (a few percent of the set) removes it."""
    from lsun_hitl.cascade import disputed

    rng = np.random.default_rng(5)
    s, y = synthetic(1500, rng, separation=7.0)
    flipped = rng.random(len(y)) < 0.007
    p = np.where(y ^ flipped, 0.99, 0.01)
    noisy = choose_thresholds(s, p, target_precision=0.95, target_false_omission=0.01)

    asked = disputed(p, s >= 0.5)
    assert asked.mean() < 0.05  # a few percent of the calibration set goes back to people
    assert np.all(asked[flipped & ((s >= 0.5) == y)])  # every crowd mistake the model contradicts
    rechecked = np.where(asked, y.astype(float), p)  # more answers settle the disputed ones
    clean = choose_thresholds(s, rechecked, target_precision=0.95, target_false_omission=0.01)

    assert clean.negative is not None
    assert noisy.negative is None or clean.negative > noisy.negative
    assert clean.n_negative_region > noisy.n_negative_region + 300
    s2, y2 = synthetic(200_000, rng, separation=7.0)
    assert y2[s2 <= clean.negative].mean() <= 0.01 and y2[s2 >= clean.positive].mean() >= 0.95


def test_unsure_labels_are_disputed_whatever_the_model_says():
    from lsun_hitl.cascade import disputed

    p = np.array([0.999, 0.001, 0.5, 0.3, 0.97, 0.02])
    model = np.array([True, False, True, False, True, True])
    assert disputed(p, model).tolist() == [False, False, True, True, False, True]
