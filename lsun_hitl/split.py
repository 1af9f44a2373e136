"""Split: apply an iteration's human labels and calibrated thresholds to the cascade state.

Pure functions over the state arrays; decided images never flip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .calibration import Thresholds
from .manifest import (
    BY_HUMAN,
    BY_MODEL,
    NEGATIVE,
    POSITIVE,
    UNLABELED,
    CascadeState,
)
from .plan import forecast_line


@dataclass(frozen=True)
class Funnel:
    """One iteration of the cascade in numbers (what the UI table and the plots show)."""

    iteration: int
    unlabeled_before: int
    human_labeled: int
    human_positive: int
    scored: int
    model_positive: int
    model_negative: int
    unlabeled_after: int
    threshold_positive: float | None
    threshold_negative: float | None
    precision: float | None
    precision_low: float | None
    false_omission: float | None
    false_omission_high: float | None
    # what people are expected to label in all when the run ends, projected at this model's rate (``plan.forecast``)
    forecast_human: int | None = None
    forecast_share: float | None = None
    decided_share: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        """One line for logs: what people and the model decided, with each side's threshold and bound."""

        def side(threshold: float | None, rate: str) -> str:
            return "no cut" if threshold is None else f"cut at {threshold:.4g}, {rate}"

        pos = side(
            self.threshold_positive,
            f"precision {self.precision or 0:.3f} (>= {self.precision_low or 0:.3f})",
        )
        neg = side(
            self.threshold_negative,
            f"false omission {self.false_omission or 0:.4f} (<= {self.false_omission_high or 0:.4f})",
        )
        return (
            f"iteration {self.iteration}: {self.unlabeled_before:,} open -> people labeled {self.human_labeled:,} "
            f"({self.human_positive:,} yes); the model scored {self.scored:,} and decided "
            f"{self.model_positive:,} positive [{pos}] and {self.model_negative:,} negative [{neg}]; "
            f"{self.unlabeled_after:,} open"
        ) + (
            ""
            if self.forecast_human is None
            else "\n  " + forecast_line(self.forecast_human, self.forecast_share or 0.0, self.decided_share)
        )


def apply_human_labels(
    state: CascadeState, index: np.ndarray, p_positive: np.ndarray, role: int, iteration: int
) -> None:
    """Decide ``index`` rows by people (in place): positive where ``p_positive >= 0.5``."""
    if np.any(state.state[index] != UNLABELED):
        raise ValueError("people labeled an image that was already decided")
    p = np.asarray(p_positive, np.float32)
    state.p_positive[index] = p
    state.state[index] = np.where(p >= 0.5, POSITIVE, NEGATIVE)
    state.decided_iteration[index] = iteration
    state.decided_by[index] = BY_HUMAN
    state.human_role[index] = role


def beyond_thresholds(scores: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the ``scores`` at or beyond the positive and the negative threshold (NaN scores in neither).

    A score past both (thresholds that cross) counts as positive only.
    """
    scores = np.asarray(scores, np.float32)
    finite = np.isfinite(scores)
    pos = np.zeros(len(scores), bool)
    neg = np.zeros(len(scores), bool)
    if thresholds.positive is not None:
        pos = finite & (scores >= thresholds.positive)
    if thresholds.negative is not None:
        neg = finite & (scores <= thresholds.negative) & ~pos
    return pos, neg


def apply_thresholds(
    state: CascadeState, index: np.ndarray, scores: np.ndarray, thresholds: Thresholds, iteration: int
) -> tuple[int, int]:
    """Record ``scores`` of ``index`` rows and decide the unlabeled ones beyond the thresholds.

    Only images still unlabeled are decided; NaN scores (unreadable images) stay unlabeled.
    Returns (model positives, model negatives).
    """
    scores = np.asarray(scores, np.float32)
    state.score[index] = scores
    open_ = state.state[index] == UNLABELED
    pos, neg = beyond_thresholds(scores, thresholds)
    pos, neg = open_ & pos, open_ & neg
    for mask, code in ((pos, POSITIVE), (neg, NEGATIVE)):
        rows = index[mask]
        state.state[rows] = code
        state.decided_iteration[rows] = iteration
        state.decided_by[rows] = BY_MODEL
    return int(pos.sum()), int(neg.sum())


def stop_reason(
    *,
    unlabeled: int,
    pool: int,
    iteration: int,
    human_labeled: int,
    max_iterations: int,
    stop_unlabeled: int,
    stop_unlabeled_fraction: float,
    human_budget: int | None,
    next_sample: int | None = None,
    min_sample: int = 1,
) -> str | None:
    """Why the loop should stop after ``iteration``, or None to go on.

    ``next_sample``: what another iteration would send to people; when no more images than that are
    left, people finishing them costs less than another round. ``min_sample``: the fewest labels another
    iteration can use (a calibration sample that could certify a threshold); a budget with less left is spent.
    """
    if unlabeled == 0:
        return "every image is decided"
    if unlabeled <= max(stop_unlabeled, stop_unlabeled_fraction * pool):
        return f"{unlabeled} images left unlabeled (<= {max(stop_unlabeled, int(stop_unlabeled_fraction * pool))})"
    if next_sample is not None and unlabeled <= next_sample:
        return f"{unlabeled} images left unlabeled: fewer than another iteration would send to people ({next_sample})"
    if human_budget is not None and human_labeled >= human_budget:
        return f"human-label budget spent ({human_labeled} >= {human_budget})"
    if human_budget is not None and human_budget - human_labeled < min_sample:
        return (
            f"human-label budget nearly spent: {human_budget - human_labeled} labels left, fewer than the"
            f" {min_sample} calibration images another iteration needs to certify a threshold"
        )
    if iteration >= max_iterations:
        return f"iteration limit reached ({max_iterations})"
    return None


def stalled(funnels: list[Funnel]) -> int:
    """How many of the last iterations in a row each decided by model fewer images than people labeled for it."""
    count = 0
    for f in sorted(funnels, key=lambda f: f.iteration, reverse=True):
        if f.scored == 0:  # the remainder people finished is no iteration of the loop
            continue
        if f.model_positive + f.model_negative >= f.human_labeled:
            break
        count += 1
    return count


def train_size(train_sample: int, growth: float, cap: int, stalls: int) -> int:
    """New training labels an iteration asks for after ``stalls`` stalled iterations in a row.

    A model that stops deciding has learned what its labels can teach it about the images still open;
    more of them (``growth`` times more per stall, at most ``cap``) is what changes what it learns from.
    Calibration is untouched: it stays a uniform sample of the open images, so every bound still holds.
    """
    return int(min(max(cap, train_sample), round(train_sample * growth**stalls)))


def remainder_to_people(left: int, human_labeled: int, human_budget: int | None) -> bool:
    """Whether people label the ``left`` images no model decided, once the loop has stopped.

    Always without a budget; with one, only when they fit in what it leaves (``human_budget`` is a cap
    on the images people label, the remainder included): otherwise they stay unresolved.
    """
    return left > 0 and (human_budget is None or human_labeled + left <= human_budget)
