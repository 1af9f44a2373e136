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
