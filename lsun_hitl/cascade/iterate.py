"""The end of an iteration: split the pool by people's labels and the thresholds, then stop or go on."""

from __future__ import annotations

import numpy as np

from ..calibration import Thresholds, zero_error_size
from ..config import CascadeParams
from ..manifest import (
    POSITIVE,
    ROLE_CALIBRATION,
    ROLE_TRAIN,
    UNLABELED,
    CascadeState,
    check_transition,
    read_manifest,
    write_manifest,
)
from ..split import Funnel, apply_human_labels, apply_thresholds, remainder_to_people, stop_reason
from ..storage import Storage
from .calibrate import calibrate
from .common import request_id_for, stored_funnel
from .people import checked_posteriors, posteriors
from .sample import carried_calibration, new_calibration_size, sample, train_sample_size
from .score import candidates, read_scores


def split(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Funnel:
    """Write the iteration's manifest: people's labels, then the model's decisions beyond the thresholds."""
    return stored_funnel(storage, category, iteration, lambda: _split(storage, category, params, iteration))


def _split(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Funnel:
    """Decide the iteration's images, write its manifest; return its funnel (the caller stores it)."""
    before = read_manifest(storage, category, iteration - 1)
    drawn = sample(storage, category, params, iteration)
    rows = candidates(before, drawn)
    scores = read_scores(storage, category, iteration, len(rows))
    thresholds = calibrate(storage, category, params, iteration)
    rid = request_id_for(iteration)
    after = before.copy()
    apply_human_labels(
        after, drawn.train, posteriors(storage, category, rid, before, drawn.train), ROLE_TRAIN, iteration
    )
    apply_human_labels(
        after,
        drawn.calibration,
        checked_posteriors(storage, category, rid, before, drawn.calibration),
        ROLE_CALIBRATION,
        iteration,
    )
    model_pos, model_neg = apply_thresholds(after, rows, scores, thresholds, iteration)
    check_transition(before, after)
    human_rows = np.concatenate([drawn.train, drawn.calibration])
    funnel = _funnel(iteration, before, after, human_rows, scores, model_pos, model_neg, thresholds)
    write_manifest(storage, category, iteration, after)
    return funnel


def _funnel(
    iteration: int,
    before: CascadeState,
    after: CascadeState,
    human_rows: np.ndarray,
    scores: np.ndarray,
    model_positive: int,
    model_negative: int,
    thresholds: Thresholds,
) -> Funnel:
    return Funnel(
        iteration=iteration,
        unlabeled_before=int(np.sum(before.state == UNLABELED)),
        human_labeled=len(human_rows),
        human_positive=int(np.sum(after.state[human_rows] == POSITIVE)),
        scored=int(np.isfinite(scores).sum()),
        model_positive=model_positive,
        model_negative=model_negative,
        unlabeled_after=int(np.sum(after.state == UNLABELED)),
        threshold_positive=thresholds.positive,
        threshold_negative=thresholds.negative,
        precision=thresholds.precision.estimate if thresholds.precision else None,
        precision_low=thresholds.precision.low if thresholds.precision else None,
        false_omission=thresholds.false_omission.estimate if thresholds.false_omission else None,
        false_omission_high=thresholds.false_omission.high if thresholds.false_omission else None,
    )


def should_stop(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str | None:
    """Why the cascade stops after ``iteration`` (``split.stop_reason``), or None when it goes on."""
    state = read_manifest(storage, category, iteration)
    unlabeled = int(np.sum(state.state == UNLABELED))
    spent = state.human_labeled()
    # "people finishing is cheaper than another round" holds only where people will finish
    people_finish = params.remainder == "people" and remainder_to_people(unlabeled, spent, params.human_budget)
    return stop_reason(
        unlabeled=unlabeled,
        pool=len(state),
        iteration=iteration,
        human_labeled=spent,
        max_iterations=params.max_iterations,
        stop_unlabeled=params.stop_unlabeled,
        stop_unlabeled_fraction=params.stop_unlabeled_fraction,
        human_budget=params.human_budget,
        next_sample=next_sample_size(storage, category, params, iteration)
        if params.stop_when_cheaper and people_finish
        else None,
        min_sample=zero_error_size(params.target_false_omission, params.threshold_confidence(iteration + 1)),
    )


def next_sample_size(storage: Storage, category: str, params: CascadeParams, iteration: int) -> int:
    """Images iteration ``iteration + 1`` would send to people (before the cap on its share)."""
    carried = carried_calibration(storage, category, params, iteration + 1).num_rows
    return train_sample_size(storage, category, params, iteration + 1) + new_calibration_size(
        params, carried, iteration + 1
    )
