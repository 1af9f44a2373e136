"""Sampling: which still-unlabeled images go to people at each iteration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """Pool row indices sent to people: ``train`` for the model, ``calibration`` held out."""

    train: np.ndarray
    calibration: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.calibration)


def draw_sample(
    unlabeled: np.ndarray,
    *,
    n_train: int,
    n_calibration: int,
    max_fraction: float,
    seed: int,
    iteration: int,
    budget_left: int | None = None,
    category: str = "",
) -> Sample:
    """Draw disjoint uniform random train and calibration samples from ``unlabeled``: the flow's draw
    (``draw_sample_partitioned`` of one part) with the caps of ``sample_sizes``.

    Parameters
    ----------
    unlabeled : array of int, shape (n,)
        Pool row indices still unlabeled at the start of the iteration.
    n_train, n_calibration
        Wanted sizes; each is capped at ``max_fraction * n``, and both together at ``budget_left``
        (calibration is kept whole first: thresholds without it are worthless).
    seed, iteration, category
        The draw is a pure function of (seed, iteration, category, unlabeled): each category of a pool gets
        its own draw, so runs of different categories are independent samples (of the calibration bounds too).
    """
    n_tr, n_cal = sample_sizes(
        len(unlabeled), n_train=n_train, n_calibration=n_calibration, max_fraction=max_fraction, budget_left=budget_left
    )
    return draw_sample_partitioned(
        [np.asarray(unlabeled, np.int64)],
        n_train=n_tr,
        n_calibration=n_cal,
        seed=seed,
        iteration=iteration,
        category=category,
    )


def sample_sizes(
    n_unlabeled: int, *, n_train: int, n_calibration: int, max_fraction: float, budget_left: int | None = None
) -> tuple[int, int]:
    """``(n_train, n_calibration)`` drawn from ``n_unlabeled`` images: each capped at ``max_fraction`` of them,
    both together at ``n_unlabeled`` and at ``budget_left`` (calibration kept whole first: thresholds without
    it are worthless)."""
    cap = int(max_fraction * n_unlabeled)
    n_cal = min(n_calibration, cap)
    n_tr = min(n_train, cap, n_unlabeled - n_cal)  # both together never more than there are
    if budget_left is not None:
        n_cal = min(n_cal, max(budget_left, 0))
        n_tr = min(n_tr, max(budget_left - n_cal, 0))
    return n_tr, n_cal


def draw_sample_partitioned(
    parts: Sequence[np.ndarray], *, n_train: int, n_calibration: int, seed: int, iteration: int, category: str = ""
) -> Sample:
    """A sample of exactly these sizes drawn by bottom-k over partitions (``lsun_hitl.partitions``).

    Parameters
    ----------
    parts : sequence of arrays of int
        Each partition's still-unlabeled global pool rows. Any grouping of the same rows gives the same
        sample, so results do not depend on the partition count.
    n_train, n_calibration
        Final sizes: ``sample_sizes`` of the open count (the coordinator knows it from the parts' counts).

    The ``n_calibration`` rows with the smallest keys are the calibration sample, the next ``n_train`` the
    training sample: both uniform without replacement and disjoint.
    """
    from .partitions import draw_bottom_k

    rows, _ = draw_bottom_k(parts, n_calibration + n_train, seed=seed, iteration=iteration, category=category)
    return Sample(train=np.sort(rows[n_calibration:]), calibration=np.sort(rows[:n_calibration]))


# The share of an active training sample drawn in proportion to the last model's score; the rest is uniform
# over what is open (docs/tuning.md says why).
SCORE_SHARE = 0.5


def compose_sample(
    calibration_order: np.ndarray,
    uniform_order: np.ndarray,
    score_order: np.ndarray,
    *,
    n_train: int,
    n_calibration: int,
    score_share: float = SCORE_SHARE,
) -> Sample:
    """An iteration's sample from three independent draws over the open images: training chosen for learning,
    calibration a uniform draw over what training leaves open.

    Parameters
    ----------
    calibration_order : array of int, shape (>= n_train + n_calibration,) or every open row
        Open rows in the order of the calibration stream's uniform keys (``partitions.sample_keys``).
    uniform_order : array of int
        Open rows in the order of a second, independent uniform stream (the training sample's uniform part).
    score_order : array of int
        Open rows in the draw order of a weighted sample without replacement, each row weighted by the last
        model's score (``partitions.score_keys``); empty where no model has scored the open rows yet.
    n_train, n_calibration
        The sample's sizes (``sample_sizes``).
    score_share
        Share of the training sample taken from ``score_order``; the rest comes from ``uniform_order``.

    Returns
    -------
    Sample
        ``train``: the first ``round(score_share * n_train)`` rows of ``score_order``, then the first rows of
        ``uniform_order`` not already taken up to ``n_train``. ``calibration``: the first ``n_calibration``
        rows of ``calibration_order`` not in ``train``. The training rows depend on the scores and two streams
        the calibration stream is independent of, so given the training sample the calibration sample is a
        uniform draw from the open rows it leaves: exactly the rows the model then decides, which is what the
        bounds need (docs/active-sampling.md). Where ``score_order`` is empty or ``score_share`` is 0, the
        sample is the uniform one: calibration the first ``n_calibration`` rows of ``calibration_order``,
        training the next ``n_train`` (``draw_sample_partitioned``).
    """
    calibration_order = np.asarray(calibration_order, np.int64)
    n_score = min(int(round(score_share * n_train)), len(score_order))
    if n_score == 0:
        return Sample(
            train=np.sort(calibration_order[n_calibration : n_calibration + n_train]),
            calibration=np.sort(calibration_order[:n_calibration]),
        )
    by_score = np.asarray(score_order, np.int64)[:n_score]
    uniform = np.asarray(uniform_order, np.int64)
    uniform = uniform[~np.isin(uniform, by_score)][: n_train - n_score]
    train = np.concatenate([by_score, uniform])
    calibration = calibration_order[~np.isin(calibration_order, train)][:n_calibration]
    return Sample(train=np.sort(train), calibration=np.sort(calibration))
