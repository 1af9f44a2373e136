"""Audit: people check random samples of the model's final positives and negatives."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import labels as labels_lib
from ..calibration import rate_interval
from ..config import CascadeParams
from ..manifest import BY_HUMAN, BY_MODEL, NEGATIVE, POSITIVE, manifest_iterations, read_manifest
from ..storage import Storage, dataset_key
from .common import AUDIT, recheck_id_for, stored_record
from .finish import positive_share
from .people import checked_posteriors, ids_at, posteriors, publish, recheck_size
from .recheck import disputed


@dataclass(frozen=True)
class Audit:
    """What people found in random samples of the model's final positive and negative sets.

    Intervals are two-sided Clopper-Pearson at ``confidence``, over the aggregated audit answers; the
    ``rechecked`` images people and the model disagreed on were asked again first (``disputed``), so
    the crowd's own mistakes do not read as the model's.
    ``dataset_precision`` estimates the whole positive set: people's positives by their posterior and
    the model's positives at the audited rate.
    """

    category: str
    confidence: float
    positives_audited: int
    positives_confirmed: int
    precision: float | None
    precision_low: float | None
    precision_high: float | None
    negatives_audited: int
    negatives_found_positive: int
    false_omission: float | None
    false_omission_low: float | None
    false_omission_high: float | None
    dataset_precision: float | None
    human_answers: int
    rechecked: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def rate(v: float | None, lo: float | None, hi: float | None) -> str:
            return "-" if v is None else f"{v:.4f} [{lo:.4f}, {hi:.4f}]"

        return (
            f"{self.category} audit ({self.confidence:.0%} intervals, {self.human_answers} answers): "
            f"model positives precision {rate(self.precision, self.precision_low, self.precision_high)} "
            f"({self.positives_confirmed}/{self.positives_audited} confirmed); model negatives false omission "
            f"{rate(self.false_omission, self.false_omission_low, self.false_omission_high)} "
            f"({self.negatives_found_positive}/{self.negatives_audited} positive; {self.rechecked} rechecked)"
        )


def audit_rows(storage: Storage, category: str, params: CascadeParams) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random samples (``params.audit_sample`` each) of the model's final positives and negatives."""
    state = read_manifest(storage, category, manifest_iterations(storage, category)[-1])
    rng = np.random.default_rng([params.seed, 104729])
    by_model = state.decided_by == BY_MODEL

    def pick(mask: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        return np.sort(rng.choice(rows, min(params.audit_sample, len(rows)), replace=False))

    return pick(by_model & (state.state == POSITIVE)), pick(by_model & (state.state == NEGATIVE))


def publish_audit(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Send the audit samples to people (request ``audit``); None when the model decided nothing."""
    pos, neg = audit_rows(storage, category, params)
    rows = np.concatenate([pos, neg])
    if len(rows) == 0:
        return None
    return publish(storage, category, AUDIT, manifest_iterations(storage, category)[-1] + 1, rows, flow_run_id)


def publish_audit_recheck(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Ask people again about audit images whose answer the model's split disputes; None if there are none."""
    last = manifest_iterations(storage, category)[-1]
    state = read_manifest(storage, category, last)
    pos, neg = audit_rows(storage, category, params)
    rows = np.concatenate([pos, neg])
    if not params.recheck or len(rows) == 0:
        return None
    p = posteriors(storage, category, AUDIT, ids_at(state, rows))
    rows = rows[disputed(p, np.arange(len(rows)) < len(pos))]
    if len(rows) == 0:
        return None
    return publish(storage, category, recheck_id_for(AUDIT), last + 1, rows, flow_run_id)


def audit(storage: Storage, category: str, params: CascadeParams) -> Audit:
    """Measure the delivered precision and false omission on the audit answers; write audit.json."""
    return stored_record(
        storage,
        storage.path(dataset_key(category, "audit.json")),
        lambda d: Audit(**d),
        lambda: _measure(storage, category, params),
    )


def _measure(storage: Storage, category: str, params: CascadeParams) -> Audit:
    """The audit from people's (rechecked) answers on the audit samples."""
    state = read_manifest(storage, category, manifest_iterations(storage, category)[-1])
    pos, neg = audit_rows(storage, category, params)
    yes_pos = int(np.sum(checked_posteriors(storage, category, AUDIT, ids_at(state, pos)) >= 0.5)) if len(pos) else 0
    yes_neg = int(np.sum(checked_posteriors(storage, category, AUDIT, ids_at(state, neg)) >= 0.5)) if len(neg) else 0
    rechecked = recheck_size(storage, category, AUDIT)
    conf = params.confidence
    p_lo, p_hi = rate_interval(yes_pos, len(pos), conf) if len(pos) else (None, None)
    f_lo, f_hi = rate_interval(yes_neg, len(neg), conf) if len(neg) else (None, None)
    human_pos = (state.state == POSITIVE) & (state.decided_by == BY_HUMAN)
    model_pos = int(np.sum((state.state == POSITIVE) & (state.decided_by == BY_MODEL)))
    precision = yes_pos / len(pos) if len(pos) else None
    p = 0.0 if precision is None else precision
    dataset_precision, _ = positive_share(state.p_positive[human_pos], [(model_pos, p, p)])
    return Audit(
        category=category,
        confidence=conf,
        positives_audited=len(pos),
        positives_confirmed=yes_pos,
        precision=precision,
        precision_low=p_lo,
        precision_high=p_hi,
        negatives_audited=len(neg),
        negatives_found_positive=yes_neg,
        false_omission=yes_neg / len(neg) if len(neg) else None,
        false_omission_low=f_lo,
        false_omission_high=f_hi,
        dataset_precision=dataset_precision,
        human_answers=labels_lib.read_votes(storage, category, AUDIT).num_rows
        + (labels_lib.read_votes(storage, category, recheck_id_for(AUDIT)).num_rows if rechecked else 0),
        rechecked=rechecked,
    )
