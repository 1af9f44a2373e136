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


def test_fixed_sequence_stops_at_the_first_failing_region():
    """From the smallest region that could pass (start_share=0), a positive among the lowest scores stops
    the fixed-sequence scan where its bound first fails; the nested scan takes the widest region that passes
    on its own, beyond it."""
    s = np.linspace(0.001, 0.999, 1500)
    y = np.zeros(1500)
    y[[320, 1100, 1200, 1300, 1400]] = 1  # one early stray positive, then the real ones high up
    fixed = choose_thresholds(
        s, y, target_precision=0.95, target_false_omission=0.01, scan="fixed-sequence", start_share=0.0
    )
    nested = choose_thresholds(s, y, target_precision=0.95, target_false_omission=0.01, scan="nested")
    assert fixed.scan == "fixed-sequence" and nested.scan == "nested"
    # 299 clean images are the least that can show <= 1% at 95%; with the stray positive at 321 the
    # bound stays above 1% until the region is ~470 images, so the sequence stops before that.
    assert zero_error_size(0.01, 0.95) <= fixed.n_negative_region <= 321
    assert fixed.false_omission.high <= 0.01 and nested.false_omission.high <= 0.01
    assert nested.n_negative_region > 470
    with pytest.raises(ValueError, match="scan"):
        choose_thresholds(s, y, target_precision=0.95, target_false_omission=0.01, scan="best")
    with pytest.raises(ValueError, match="start_share"):
        choose_thresholds(s, y, target_precision=0.95, target_false_omission=0.01, start_share=1.0)


def test_a_wide_start_is_not_stopped_by_a_stray_positive_among_the_lowest_scores():
    """Ambiguous items the model is sure of (a few positives with scores near 0) stop a sequence that starts
    from the smallest region; one that starts from half the model's predicted negatives (chosen by the
    scores alone) steps over them and decides about what the nested scan does."""
    rng = np.random.default_rng(4)
    s, y = synthetic(3000, rng, separation=5.0)
    y = y.astype(float)
    y[np.argsort(s)[[40, 150]]] = 1.0  # two strays among the 200 lowest scores
    kw = {"target_precision": 0.95, "target_false_omission": 0.01, "scan": "fixed-sequence"}
    narrow = choose_thresholds(s, y, start_share=0.0, **kw)
    wide = choose_thresholds(s, y, **kw)
    nested = choose_thresholds(s, y, target_precision=0.95, target_false_omission=0.01, scan="nested")
    assert narrow.n_negative_region < 400  # stopped right after the strays
    assert wide.false_omission.high <= 0.01
    assert wide.n_negative_region > 0.9 * nested.n_negative_region
    assert wide.n_negative_region > narrow.n_negative_region + 1000


def test_one_wrong_no_among_the_highest_scores_does_not_stop_the_positive_side():
    """A positive scored near the top that people left "no" fails the smallest region that could pass (72
    images at 97.5%); a sequence starting at the smallest region that passes with one error (110) steps over
    it and decides the positive side. The start depends on the sizes alone, and the bound still holds."""
    from lsun_hitl.calibration import passing_size

    assert (passing_size(0.05, 0.975), passing_size(0.05, 0.975, 1), passing_size(0.05, 0.95, 1)) == (72, 110, 93)
    assert passing_size(0.05, 0.95) == zero_error_size(0.05, 0.95)
    rng = np.random.default_rng(5)
    s, y = synthetic(3000, rng, separation=6.0)
    y = y.astype(float)
    top = np.argsort(s)[::-1]
    y[top[:200]] = 1.0
    y[top[30]] = 0.0  # one wrong "no" among the 72 highest scores
    kw = {"target_precision": 0.95, "target_false_omission": 0.01, "confidence": 0.975, "scan": "fixed-sequence"}
    strict = choose_thresholds(s, y, positive_start_errors=0, **kw)
    tolerant = choose_thresholds(s, y, **kw)
    assert strict.positive is None and strict.n_positive_region == 0
    assert tolerant.positive is not None and tolerant.precision.low >= 0.95
    assert tolerant.n_positive_region > 200
    assert tolerant.negative < tolerant.positive and tolerant.false_omission.high <= 0.01
    with pytest.raises(ValueError, match="positive_start_errors"):
        choose_thresholds(s, y, positive_start_errors=-1, **kw)


def test_a_run_spends_its_error_budget_over_its_iterations():
    from lsun_hitl.calibration import iteration_confidence
    from lsun_hitl.config import CascadeParams

    run = [iteration_confidence(0.95, k) for k in range(1, 30)]
    assert run[:3] == pytest.approx([0.975, 0.9875, 0.99375])
    assert sum(1 - c for c in run) < 0.05  # union bound: the run misses with probability < 5% on each side
    assert CascadeParams().threshold_confidence(2) == pytest.approx(0.9875)
    assert CascadeParams(confidence_scope="threshold").threshold_confidence(2) == 0.95
    with pytest.raises(ValueError, match="1-based"):
        iteration_confidence(0.95, 0)


def test_chosen_thresholds_meet_their_targets_in_about_95_percent_of_draws():
    """Over many calibration draws the chosen thresholds miss their target in at most ~5% of them (the
    stated confidence) with either scan, and the fixed sequence decides at most what the nested scan does."""
    from scipy.stats import norm

    base, sep = 0.1, 3.0

    def logit(t):
        return np.log(t / (1 - t))

    def true_fo(t):
        a, b = base * norm.cdf(logit(t) - sep / 2), (1 - base) * norm.cdf(logit(t) + sep / 2)
        return a / (a + b)

    def true_precision(t):
        a, b = base * norm.sf(logit(t) - sep / 2), (1 - base) * norm.sf(logit(t) + sep / 2)
        return a / (a + b)

    rng = np.random.default_rng(7)
    scans = ("fixed-sequence", "nested")
    trials = 200
    misses = {(scan, side): 0 for scan in scans for side in ("fo", "precision")}
    decided = dict.fromkeys(scans, 0)
    for _ in range(trials):
        s, y = synthetic(1500, rng, separation=sep)
        for scan in scans:
            th = choose_thresholds(s, y.astype(float), target_precision=0.95, target_false_omission=0.01, scan=scan)
            decided[scan] += th.n_negative_region + th.n_positive_region
            misses[scan, "fo"] += th.negative is not None and true_fo(th.negative) > 0.01
            misses[scan, "precision"] += th.positive is not None and true_precision(th.positive) < 0.95
    # 5% of 200 is 10; 18 is beyond 2.5 binomial standard deviations
    assert all(m <= 18 for m in misses.values()), misses
    assert decided["fixed-sequence"] <= decided["nested"]
    assert decided["fixed-sequence"] > 0
