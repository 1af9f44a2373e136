import numpy as np

from lsun_hitl.baselines import all_by_crowd, thresholds_on_validation
from lsun_hitl.crowd import CrowdParams


def test_point_thresholds_meet_the_targets_on_validation():
    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.2
    scores = np.clip(labels * 0.6 + rng.normal(0.2, 0.15, 4000), 0, 1)
    t_pos, t_neg = thresholds_on_validation(scores, labels, 0.95, 0.01)
    assert t_neg <= t_pos
    assert labels[scores >= t_pos].mean() >= 0.95
    assert labels[scores < t_neg].mean() <= 0.01
    # a lower positive threshold would miss the target: it is the lowest that meets it
    below = np.sort(scores[scores < t_pos])[-1]
    assert labels[scores >= below].mean() < 0.95 or below == t_pos


def test_all_by_crowd_is_accurate_and_costly():
    rng = np.random.default_rng(1)
    uris = [f"u{i}" for i in range(2000)]
    truth = dict(zip(uris, rng.random(2000) < 0.1, strict=True))
    result = all_by_crowd([f"i{i}" for i in range(2000)], uris, truth, CrowdParams(seed=1))
    assert result.precision > 0.9 and result.false_omission < 0.01  # 3+ noisy answers: good, not perfect
    assert 3.0 <= result.human_answers / result.pool <= 5.0 and result.coverage == 1.0
    assert 0.9 < result.recall <= 1.0  # the crowd misses few positives; recall counts them against the truth
