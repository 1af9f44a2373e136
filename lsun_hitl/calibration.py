"""Calibrated thresholds from held-out human labels, with one-sided Clopper-Pearson bounds.

Given model scores and aggregated human answers on a calibration sample the model never trained
on, choose

* a high threshold ``t_pos``: images scoring >= t_pos are positives, and the precision of that set is
  at least ``target_precision`` (lower confidence bound at ``confidence``);
* a low threshold ``t_neg``: images scoring <= t_neg are negatives, and the false-omission rate
  (share of positives among them) is at most ``target_false_omission`` (upper bound).

Human answers are noisy, and that noise sets a floor: with labels 97% right, a calibration set cannot
show a false-omission rate under ~3%. The labels used here are aggregated (redundant answers where
people disagree, Dawid-Skene weights per labeler), which brings their error to a few per thousand, an
order of magnitude below the targets; errors are counted on the aggregated answer (p >= 0.5). The
residual noise mostly inflates the measured errors (people's false "yes" among model negatives), so
its effect on the bounds is conservative; ``label_noise`` reports its estimate (the mean posterior
disagreement) beside each threshold.

Thresholds come from a fixed grid (dense in logit space). The positive threshold is the lowest one
whose region passes its bound, the negative threshold the highest one (the "upper-confidence
correction" of threshold-based auto-labeling). The confidence is per threshold; with nested regions
the chance that the chosen one misses its target is somewhat above ``1 - confidence``. The evaluation
harness measures how often the targets hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import betaincinv

GRID = 1.0 / (1.0 + np.exp(-np.linspace(-12, 12, 961)))  # fixed thresholds, dense in logit space


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Thresholds:
    """Chosen thresholds and what the calibration sample says of them.

    ``positive`` / ``negative`` are None when no threshold met its target (the model decides nothing
    on that side this iteration).
    """

    positive: float | None
    negative: float | None
    precision: Interval | None
    false_omission: Interval | None
    n_calibration: int
    n_positive_region: int
    n_negative_region: int
    confidence: float
    label_noise: float = 0.0
    n_carried: int = 0  # calibration images carried over from earlier iterations
    n_rechecked: int = 0  # calibration images people were asked about again (the model disputed their label)

    def to_dict(self) -> dict:
        return asdict(self)


def clopper_pearson(errors: float, n: float, confidence: float) -> tuple[float, float]:
    """Two one-sided Clopper-Pearson bounds for a rate ``errors / n`` at ``confidence`` each."""
    if n <= 0:
        return 0.0, 1.0
    a = 1 - confidence
    # betaincinv(a, b, q) is the Beta(a, b) quantile q (scipy.stats.beta.ppf, at ~1/70 of its call cost)
    lo = 0.0 if errors <= 0 else float(betaincinv(errors, n - errors + 1, a))
    hi = 1.0 if errors >= n else float(betaincinv(errors + 1, n - errors, 1 - a))
    return lo, hi


def choose_thresholds(
    scores: np.ndarray,
    p_positive: np.ndarray,
    *,
    target_precision: float,
    target_false_omission: float,
    confidence: float = 0.95,
    min_region: int = 30,
    n_carried: int = 0,
) -> Thresholds:
    """Choose ``t_pos`` and ``t_neg`` from a calibration sample.

    Parameters
    ----------
    scores : array of float, shape (n,)
        Model scores in [0, 1] of the calibration images.
    p_positive : array of float, shape (n,)
        Aggregated human posterior that each calibration image is a positive; the image counts as
        a positive where it is >= 0.5.
    target_precision, target_false_omission, confidence
        The positive set must have precision >= target_precision and the negative set a false-omission
        rate <= target_false_omission, each as a one-sided bound at ``confidence``.
    min_region : int
        Regions with fewer calibration images are not considered.
    n_carried : int
        How many of the images were carried over from earlier iterations (recorded only).
    """
    scores = np.asarray(scores, np.float64)
    p = np.asarray(p_positive, np.float64)
    keep = np.isfinite(scores) & np.isfinite(p)
    scores, p = scores[keep], p[keep]
    n = len(scores)
    order = np.argsort(scores)
    s_sorted, y_sorted = scores[order], (p[order] >= 0.5).astype(np.float64)
    cum_pos = np.concatenate([[0.0], np.cumsum(y_sorted)])  # positives among the k lowest
    total_pos = cum_pos[-1]

    # Positive side: region s >= t, errors = people's "no" answers. The lowest t that passes.
    t_pos, prec = None, None
    for t in GRID:
        k = int(np.searchsorted(s_sorted, t, side="left"))
        size = n - k
        if size < min_region:
            break
        negatives = size - (total_pos - cum_pos[k])
        lo, hi = clopper_pearson(negatives, size, confidence)
        if 1 - hi >= target_precision:
            t_pos, prec = float(t), Interval(1 - negatives / size, 1 - hi, 1 - lo)
            break
    # Negative side: region s <= t, errors = people's "yes" answers. The highest t that passes.
    t_neg, fo = None, None
    for t in GRID[::-1]:
        if t_pos is not None and t >= t_pos:
            continue
        k = int(np.searchsorted(s_sorted, t, side="right"))
        if k < min_region:
            break
        positives = cum_pos[k]
        lo, hi = clopper_pearson(positives, k, confidence)
        if hi <= target_false_omission:
            t_neg, fo = float(t), Interval(positives / k, lo, hi)
            break
    n_pos = int(np.sum(scores >= t_pos)) if t_pos is not None else 0
    n_neg = int(np.sum(scores <= t_neg)) if t_neg is not None else 0
    noise = float(np.mean(np.minimum(p, 1 - p))) if n else 0.0
    return Thresholds(t_pos, t_neg, prec, fo, n, n_pos, n_neg, confidence, noise, n_carried)


def rate_interval(events: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval at ``confidence`` for a rate ``events / n`` (audit reports)."""
    return clopper_pearson(events, n, 1 - (1 - confidence) / 2)


def zero_error_size(rate: float, confidence: float) -> int:
    """Smallest region in which zero errors bound the error rate below ``rate`` at ``confidence``."""
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - rate)))
