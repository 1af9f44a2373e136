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

Thresholds come from a fixed grid (dense in logit space), and each side is a nested family of regions
(``s >= t`` for positives, ``s <= t`` for negatives). Two ways to pick one (``scan``):

* ``"nested"``: the widest region whose own bound passes, wherever it lies. The confidence holds per threshold;
  taking the best of many nested regions makes the chance that the chosen one misses its target higher than
  ``1 - confidence``, most where the share of positives rises steeply near the cut, as it does on real
  model scores (docs/tuning.md has the measured miss rates).
* ``"fixed-sequence"`` (the default; Learn-then-Test's fixed-sequence test, Angelopoulos et al. 2021):
  start from a region fixed by the scores alone, widen it one grid step at a time while the bound passes,
  and stop at the first failure. The chosen region then meets its target with probability at least
  ``confidence``: the sequence is fixed before any label is looked at, so no correction for the number of
  thresholds tried is needed. Where it starts matters: from the smallest region that could pass at all
  (``start_share=0``), one stray positive among the lowest-scored calibration images stops it. From the half
  of the model's own predicted negatives (scores < 0.5) it is surest of (``start_share=0.5``, the default),
  a few strays do not stop it (``benchmarks/guarantee.py`` replays both scans on real model scores against
  the ground truth; docs/tuning.md). The positive side starts from its highest-scored region, made just
  wide enough that one wrong "no" does not stop it (``positive_start_errors``).

The confidence of one threshold is not the confidence of a run: a cascade chooses two thresholds per
iteration, for several iterations. ``iteration_confidence`` spends a run's error budget over its
iterations (half to the first, a quarter to the second, ...), so that with the fixed-sequence scan each
side's model-decided set meets its target over the whole run with probability at least the run's
confidence (a union bound: the whole set can only miss if one iteration's part does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

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
    scan: str = "nested"  # how the thresholds were picked: "fixed-sequence" or "nested" (see the module)

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


Scan = Literal["fixed-sequence", "nested"]
SCANS: tuple[str, ...] = ("fixed-sequence", "nested")


def choose_thresholds(
    scores: np.ndarray,
    p_positive: np.ndarray,
    *,
    target_precision: float,
    target_false_omission: float,
    confidence: float = 0.95,
    min_region: int = 30,
    n_carried: int = 0,
    scan: Scan = "fixed-sequence",
    start_share: float = 0.5,
    positive_start_errors: int = 1,
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
    scan : {"fixed-sequence", "nested"}
        How the threshold is picked among the passing ones (see the module docstring):
        "fixed-sequence" makes ``confidence`` hold for the chosen threshold.
    start_share : float in [0, 1)
        Fixed-sequence only, negative side: the first region tested holds this share of the calibration images
        the model calls negative (scores < 0.5), those it is surest of; 0 starts from the smallest region that
        could pass at all. Chosen from the scores alone, it keeps the guarantee. The positive side starts from
        its highest-scored region (``positive_start_errors``), not from a share: stray positives sit among the
        lowest scores (ambiguous items the model is sure of), stray negatives rarely among the highest, and a
        wide start there loses most model positives (docs/tuning.md).
    positive_start_errors : int
        Fixed-sequence only, positive side: the first region tested is the smallest in which this many people's
        "no" answers would still pass (``passing_size``: 110 images at 97.5% for a 95% target with one, 72 with
        none). With 0, one label left wrong after recheck among the highest-scored calibration images stops the
        scan before it starts, losing every model positive (docs/tuning.md). Chosen from the sizes alone, it
        keeps the guarantee.
    """
    if scan not in SCANS:
        raise ValueError(f"scan {scan!r} is unknown; use one of {', '.join(SCANS)}")
    if not 0 <= start_share < 1:
        raise ValueError(f"start_share {start_share!r} is outside [0, 1)")
    if positive_start_errors < 0:
        raise ValueError(f"positive_start_errors {positive_start_errors!r} is negative")
    scores = np.asarray(scores, np.float64)
    p = np.asarray(p_positive, np.float64)
    keep = np.isfinite(scores) & np.isfinite(p)
    scores, p = scores[keep], p[keep]
    n = len(scores)
    order = np.argsort(scores)
    s_sorted, y_sorted = scores[order], (p[order] >= 0.5).astype(np.float64)
    cum_pos = np.concatenate([[0.0], np.cumsum(y_sorted)])  # positives among the k lowest
    total_pos = cum_pos[-1]

    # Positive side: region s >= t, errors = people's "no" answers.
    k_pos = np.searchsorted(s_sorted, GRID, side="left")
    size_pos = n - k_pos
    errors_pos = size_pos - (total_pos - cum_pos[k_pos])
    i_pos = _pick(
        size_pos,
        errors_pos,
        1 - target_precision,
        confidence,
        min_region,
        scan,
        passing_size(1 - target_precision, confidence, positive_start_errors),
    )
    t_pos = prec = None
    if i_pos is not None:
        size, negatives = size_pos[i_pos], errors_pos[i_pos]
        lo, hi = clopper_pearson(negatives, size, confidence)
        t_pos, prec = float(GRID[i_pos]), Interval(1 - negatives / size, 1 - hi, 1 - lo)
    # Negative side: region s <= t (below t_pos), errors = people's "yes" answers.
    below = GRID < t_pos if t_pos is not None else np.ones(len(GRID), bool)
    k_neg = np.searchsorted(s_sorted, GRID[below], side="right")
    i_neg = _pick(
        k_neg[::-1],
        cum_pos[k_neg][::-1],
        target_false_omission,
        confidence,
        min_region,
        scan,
        start_share * np.sum(scores < 0.5),  # the model's own predicted negatives
    )
    t_neg = fo = None
    if i_neg is not None:
        i_neg = int(below.sum()) - 1 - i_neg
        size, positives = k_neg[i_neg], cum_pos[k_neg[i_neg]]
        lo, hi = clopper_pearson(positives, size, confidence)
        t_neg, fo = float(GRID[i_neg]), Interval(positives / size, lo, hi)
    n_pos = int(np.sum(scores >= t_pos)) if t_pos is not None else 0
    n_neg = int(np.sum(scores <= t_neg)) if t_neg is not None else 0
    noise = float(np.mean(np.minimum(p, 1 - p))) if n else 0.0
    return Thresholds(t_pos, t_neg, prec, fo, n, n_pos, n_neg, confidence, noise, n_carried, scan=scan)


def _pick(
    sizes: np.ndarray,
    errors: np.ndarray,
    target: float,
    confidence: float,
    min_region: int,
    scan: Scan,
    first_size: float = 0.0,
) -> int | None:
    """Index of the chosen region among nested ones, ``sizes`` (m,) widest first, ``errors`` (m,) in each;
    None when none may be chosen. A region passes when its upper bound on the error rate is <= ``target``.
    The fixed sequence starts at the smallest region of at least ``first_size`` images (scores alone)."""
    start = max(min_region, zero_error_size(target, confidence))  # smaller regions cannot pass at all

    def passes(i: int) -> bool:
        return clopper_pearson(errors[i], sizes[i], confidence)[1] <= target

    if scan == "nested":
        for i in range(len(sizes)):
            if sizes[i] < start:
                return None
            if passes(i):
                return i
        return None
    chosen = None
    for i in range(len(sizes) - 1, -1, -1):  # safest (smallest) region first
        if sizes[i] < max(start, first_size):
            continue
        if not passes(i):
            break
        chosen = i
    return chosen


def rate_interval(events: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval at ``confidence`` for a rate ``events / n`` (audit reports)."""
    return clopper_pearson(events, n, 1 - (1 - confidence) / 2)


def zero_error_size(rate: float, confidence: float) -> int:
    """Smallest region in which zero errors bound the error rate below ``rate`` at ``confidence``."""
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - rate)))


def passing_size(rate: float, confidence: float, errors: int = 0) -> int:
    """Smallest region in which ``errors`` errors still bound the error rate below ``rate`` at ``confidence``
    (``zero_error_size`` for none): 59 for none and 93 for one at 5% and 95%; 72 and 110 at 97.5%."""
    n = zero_error_size(rate, confidence)
    if errors <= 0:
        return n
    n = max(n, errors + 1)
    while clopper_pearson(errors, n, confidence)[1] > rate:
        n += 1
    return n


def iteration_confidence(confidence: float, iteration: int) -> float:
    """The confidence of one iteration's thresholds when a run's ``confidence`` is spent over its iterations.

    Iteration ``k`` (1-based) gets ``2**-k`` of the run's error budget ``1 - confidence``: 0.975 and then
    0.9875, ... for a run at 0.95. The budgets add up to less than the run's, whatever the number of
    iterations, so (union bound) each side's model decisions over the whole run meet their target with
    probability at least ``confidence`` when every threshold's own confidence holds (the fixed-sequence scan).
    """
    if iteration < 1:
        raise ValueError(f"iteration {iteration} is not 1-based")
    return 1.0 - (1.0 - confidence) * 0.5**iteration
