"""Finishing: the dataset manifest (every pool image, its final label and provenance) and its summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .. import labels as labels_lib
from .. import report
from ..config import CascadeParams
from ..ingest import read_pool
from ..manifest import (
    BY_HUMAN,
    BY_MODEL,
    NEGATIVE,
    POSITIVE,
    UNLABELED,
    CascadeState,
    manifest_iterations,
    read_manifest,
)
from ..partitions import sweep
from ..split import Funnel
from ..storage import Storage, dataset_key, manifest_dir, report_key
from .common import funnels


@dataclass(frozen=True)
class Summary:
    category: str
    pool: int
    positive: int
    negative: int
    unresolved: int
    decided_by_model: int
    human_labeled_images: int
    human_labeled_share: float
    human_answers: int
    estimated_precision: float | None
    estimated_precision_low: float | None
    amplification: float
    iterations: int
    stop_reason: str | None
    # the negative set's estimated false omission: people's negatives by their posterior, the model's by each
    # iteration's calibration estimate (and its upper bound)
    estimated_false_omission: float | None = None
    estimated_false_omission_high: float | None = None
    # what the estimates miss of the run's targets, each with what would fix it (empty: both met)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        est = (
            "-"
            if self.estimated_precision is None
            else (f"{self.estimated_precision:.3f} (lower bound {self.estimated_precision_low:.3f})")
        )
        fo = (
            "-"
            if self.estimated_false_omission is None
            else f"{self.estimated_false_omission:.4f} (upper bound {self.estimated_false_omission_high:.4f})"
        )
        return (
            f"{self.category}: pool {self.pool:,}; positive {self.positive:,}, negative {self.negative:,}, "
            f"unresolved {self.unresolved:,}\n"
            f"  decided by the model: {self.decided_by_model:,}; labeled by people: {self.human_labeled_images:,} "
            f"images ({self.human_labeled_share:.1%} of the pool), {self.human_answers:,} answers\n"
            f"  estimated precision of the positive set: {est}; false omission of the negative set: {fo}\n"
            f"  amplification: {self.amplification:.1f} images decided per image people labeled; "
            f"{self.iterations} iteration(s); stopped: {self.stop_reason}"
            + "".join(f"\n  WARNING: {w}" for w in self.warnings)
        )


def positive_share(
    p_human: np.ndarray, model_parts: list[tuple[int, float, float]]
) -> tuple[float | None, float | None]:
    """Estimated share of true positives in a set, and its bound; (None, None) for an empty set.

    People's images count by their aggregated posterior ``p_human``; each iteration's model-decided part
    ``(count, estimate, bound)`` by its calibration estimate and bound, weighted by its count.
    """
    n = len(p_human) + sum(count for count, _, _ in model_parts)
    if not n:
        return None, None
    est = bound = float(np.nansum(p_human))
    for count, rate, rate_bound in model_parts:
        est, bound = est + count * rate, bound + count * rate_bound
    return est / n, bound / n


def target_warnings(
    precision: float | None, false_omission: float | None, human_share: float, params: CascadeParams
) -> tuple[str, ...]:
    """What the dataset's estimates miss of ``params``' targets, each with what would fix it."""
    out = []
    fix = (
        f"people's labels are the weak part when they decide much of it ({human_share:.0%} here): ask more answers "
        "per image (lsun-hitl serve --labels-per-image / --min-margin), give gold so poor labelers are flagged "
        "(lsun-hitl gold; handouts mix it in), and measure it with --audit-sample"
    )
    if precision is not None and precision < params.target_precision:
        out.append(f"estimated precision {precision:.3f} is below the target {params.target_precision}: {fix}")
    if false_omission is not None and false_omission > params.target_false_omission:
        out.append(
            f"estimated false omission {false_omission:.4f} is above the target {params.target_false_omission}: {fix}"
        )
    return tuple(out)


def finish(storage: Storage, category: str, stop: str | None = None, params: CascadeParams | None = None) -> Summary:
    """Write the dataset manifest (every pool image, final label, provenance) and the summary.

    With ``params``, the summary warns where the estimated precision or false omission misses its target. The
    run is over, so no writer is active: manifest parts no commit names are removed (``partitions.sweep``)."""
    done = manifest_iterations(storage, category)
    last = done[-1]
    for k in done:  # parts of split attempts that died before their commit (a retried step) go
        sweep(storage, manifest_dir(category, k))
    state = read_manifest(storage, category, last)
    pool = read_pool(storage, columns=["image_id", "uri"])
    storage.write_table(storage.path(dataset_key(category)), _dataset_table(state, pool))
    fs = funnels(storage, category)
    est, low, fo, fo_high = _estimates(state, fs)
    human = state.human_labeled()
    share = human / max(1, len(state))
    summary = Summary(
        category=category,
        pool=len(state),
        positive=int(np.sum(state.state == POSITIVE)),
        negative=int(np.sum(state.state == NEGATIVE)),
        unresolved=int(np.sum(state.state == UNLABELED)),
        decided_by_model=int(np.sum(state.decided_by == BY_MODEL)),
        human_labeled_images=human,
        human_labeled_share=share,
        human_answers=labels_lib.human_votes_spent(storage, category),
        estimated_precision=est,
        estimated_precision_low=low,
        amplification=int(np.sum(state.state != UNLABELED)) / max(1, human),
        iterations=last,
        stop_reason=stop,
        estimated_false_omission=fo,
        estimated_false_omission_high=fo_high,
        warnings=() if params is None else target_warnings(est, fo, share, params),
    )
    storage.write_json(storage.path(dataset_key(category, "summary.json")), summary.to_dict())
    if fs:
        storage.write_bytes(
            storage.path(report_key(category, "funnel.png")), report.funnel_plot(category, fs, len(state))
        )
        storage.write_bytes(
            storage.path(report_key(category, "funnel.md")), report.funnel_markdown(category, fs).encode()
        )
    return summary


def _dataset_table(state: CascadeState, pool: pa.Table) -> pa.Table:
    """Every pool image with its final label, who decided it and when, its last score and people's posterior."""
    # dictionary-encoded straight from the state codes: no per-image strings, even for 100M images
    label = pa.DictionaryArray.from_arrays(
        pa.array(state.state, pa.int8()), pa.array(["unresolved", "positive", "negative"])
    )
    return (
        pa.table(
            {
                "image_id": state.image_id,
                "uri": pool.column("uri"),
                "label": label,
            }
        )
        .append_column("decided_by", state.to_table().column("decided_by"))
        .append_column("decided_iteration", state.to_table().column("decided_iteration"))
        .append_column("score", pa.array(state.score, from_pandas=True))
        .append_column("p_positive", pa.array(state.p_positive, from_pandas=True))
    )


def _estimates(state: CascadeState, fs: list[Funnel]) -> tuple[float | None, float | None, float | None, float | None]:
    """The share of true positives in each final set: the positive set's precision (and its lower bound),
    the negative set's false omission (and its upper bound)."""
    pos, neg, by_human = state.state == POSITIVE, state.state == NEGATIVE, state.decided_by == BY_HUMAN
    est, low = positive_share(
        state.p_positive[pos & by_human],
        [(f.model_positive, f.precision, f.precision_low or 0.0) for f in fs if f.precision is not None],
    )
    fo, fo_high = positive_share(
        state.p_positive[neg & by_human],
        [
            (f.model_negative, f.false_omission, f.false_omission_high or 1.0)
            for f in fs
            if f.false_omission is not None
        ],
    )
    return est, low, fo, fo_high
