"""Audit: people check random samples of the model's final positives and negatives."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .. import labels as labels_lib
from ..calibration import rate_interval
from ..cluster import run_on_dask
from ..config import CascadeParams
from ..dataset_parts import dataset_totals
from ..ingest import take_pool
from ..manifest import manifest_counts, manifest_iterations, rows_held, stored_parts
from ..manifest_parts import column_is, read_state_rows
from ..partitions import Partitioning, bottom_k, merge_bottom_k, sample_keys
from ..storage import Storage, dataset_key
from .common import AUDIT, recheck_id_for, stored_record
from .finish import positive_share
from .people import checked_posteriors, posteriors, publish, recheck_size
from .recheck import disputed

# the audit's draw is its own stream of ``partitions.sample_keys``: an "iteration" no run reaches
AUDIT_STREAM = 104729


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
    """Seeded random samples (``params.audit_sample`` each) of the model's final positives and negatives: their
    pool rows, ascending.

    Each is the bottom-k of ``partitions.sample_keys`` over the rows in its set (stream ``AUDIT_STREAM`` of
    ``params.seed`` and the category), so the sample is the same whatever the manifest's partitioning: a map
    over the last manifest's parts, one at a time in this process (each reads two one-byte columns of its part:
    memory is a part's, not the pool's), and a merge of their ``k`` smallest keys.
    """
    last = manifest_iterations(storage, category)[-1]
    n_rows = rows_held(manifest_counts(storage, category, last))
    partitioning = Partitioning(n_rows, stored_parts(storage, category, last))
    parts = run_on_dask(
        None,
        audit_part,
        list(range(partitioning.n_partitions)),
        storage=storage,
        category=category,
        iteration=last,
        partitioning=partitioning,
        k=params.audit_sample,
        seed=params.seed,
    )
    positives, _ = merge_bottom_k([pos for pos, _ in parts], params.audit_sample)
    negatives, _ = merge_bottom_k([neg for _, neg in parts], params.audit_sample)
    return np.sort(positives), np.sort(negatives)


def audit_part(
    p: int, *, storage: Storage, category: str, iteration: int, partitioning: Partitioning, k: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The map of ``audit_rows``: partition ``p``'s ``k`` model positives and ``k`` model negatives (global rows)
    with the smallest keys, each as ``partitions.bottom_k`` gives them ``(rows, keys)``."""
    start, stop = partitioning.rows(p)
    table = read_state_rows(
        storage, category, iteration, partitioning.n_rows, start, stop, columns=["state", "decided_by"]
    )
    model = column_is(table, "decided_by", "model")
    out = []
    for side in ("positive", "negative"):
        rows = np.flatnonzero(model & column_is(table, "state", side)).astype(np.int64) + start
        out.append(bottom_k(rows, sample_keys(rows, seed=seed, iteration=AUDIT_STREAM, category=category), k))
    return out[0], out[1]


def audit_ids(storage: Storage, rows: np.ndarray) -> pa.Array:
    """The image ids of pool ``rows`` (the pool's row groups that hold them, not the pool)."""
    return take_pool(storage, np.asarray(rows, np.int64), ["image_id"]).column("image_id").combine_chunks()


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
    if not params.recheck:
        return None
    last = manifest_iterations(storage, category)[-1]
    pos, neg = audit_rows(storage, category, params)
    rows = np.concatenate([pos, neg])
    if len(rows) == 0:
        return None
    p = posteriors(storage, category, AUDIT, audit_ids(storage, rows))
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
    pos, neg = audit_rows(storage, category, params)
    yes_pos = (
        int(np.sum(checked_posteriors(storage, category, AUDIT, audit_ids(storage, pos)) >= 0.5)) if len(pos) else 0
    )
    yes_neg = (
        int(np.sum(checked_posteriors(storage, category, AUDIT, audit_ids(storage, neg)) >= 0.5)) if len(neg) else 0
    )
    rechecked = recheck_size(storage, category, AUDIT)
    conf = params.confidence
    p_lo, p_hi = rate_interval(yes_pos, len(pos), conf) if len(pos) else (None, None)
    f_lo, f_hi = rate_interval(yes_neg, len(neg), conf) if len(neg) else (None, None)
    totals = dataset_totals(storage, category)  # the dataset's counts and sums, as finish committed them
    precision = yes_pos / len(pos) if len(pos) else None
    p = 0.0 if precision is None else precision
    dataset_precision, _ = positive_share(
        int(totals["human_positive"]), totals["p_sum_human_positive"], [(int(totals["model_positive"]), p, p)]
    )
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
