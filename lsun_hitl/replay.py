"""Replay a run's threshold choices under other settings, from what the run stored: seconds, not a new run.

A run stores, per iteration, its sample, the calibration set (pool rows, people's posteriors, the model's
scores), every candidate's score and the manifest after the split. ``replay`` chooses the thresholds again from
those calibration labels and scores with the settings given, applies them to the same candidates, and reports
what the model would have decided, beside what the run decided (and, where a truth table is registered, the
precision and false omission of the replayed decisions against it).

Faithful only for the settings that act after scoring (``config.THRESHOLD_SETTINGS``: the targets, the
confidence and its scope, the scan and its starts, the smallest region): a setting that changes what is
sampled or trained needs a new run (``lsun-hitl simulate``). Exact at iteration 1; at a later iteration it
replays that iteration's model over the candidates the run had, which other thresholds earlier would have
changed. Replaying the run's own settings gives the run's own thresholds and decisions
(``tests/test_simulate.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import Thresholds
from .cascade.calibrate import thresholds_for
from .cascade.common import thresholds_from_dict
from .cascade.sample import sample
from .cascade.score import candidates, read_scores
from .config import CascadeParams
from .ingest import read_pool
from .manifest import BY_HUMAN, manifest_iterations, read_manifest
from .split import beyond_thresholds
from .storage import Storage, calibration_key, calibration_set_key
from .truth import per_row


@dataclass(frozen=True)
class Replayed:
    """One iteration: the run's thresholds and decisions, and those the replayed settings give."""

    iteration: int
    open: int  # candidates the model could decide (scored, not labeled by people at this iteration)
    run: Thresholds
    run_positive: int
    run_negative: int
    new: Thresholds
    positive: int
    negative: int
    precision: float | None  # of the replayed model positives, against the truth (None: no truth or none)
    false_omission: float | None  # of the replayed model negatives, against the truth


def replay_iteration(
    storage: Storage, category: str, iteration: int, params: CascadeParams, truth: np.ndarray | None = None
) -> Replayed:
    """Replay ``iteration`` of a stored run with ``params``' threshold settings.

    ``truth`` (bool per pool row, optional) scores the replayed decisions. Raises FileNotFoundError when the
    iteration's calibration was not stored (the run has not calibrated it yet).
    """
    calibration = storage.path(calibration_key(category, iteration))
    if not storage.exists(calibration):
        raise FileNotFoundError(f"iteration {iteration} of {category!r} under {storage.url} has no thresholds yet")
    after = read_manifest(storage, category, iteration)
    # the iteration's stored draw (calibrated, so it exists): sample() reads it back, it does not draw again
    rows = candidates(read_manifest(storage, category, iteration - 1), sample(storage, category, params, iteration))
    scores = read_scores(storage, category, iteration, len(rows))
    people_now = (after.decided_by[rows] == BY_HUMAN) & (after.decided_iteration[rows] == iteration)
    rows, scores = rows[~people_now], scores[~people_now]
    cal = storage.read_table(storage.path(calibration_set_key(category, iteration)))
    new = thresholds_for(
        params,
        iteration,
        cal.column("score").to_numpy(zero_copy_only=False),
        cal.column("p_positive").to_numpy(zero_copy_only=False),
        n_carried=int((cal.column("from_iteration").to_numpy() != iteration).sum()),
    )
    run = thresholds_from_dict(storage.read_json(calibration))
    run_pos, run_neg = beyond_thresholds(scores, run)
    pos, neg = beyond_thresholds(scores, new)
    precision = false_omission = None
    if truth is not None:
        precision = float(truth[rows[pos]].mean()) if pos.any() else None
        false_omission = float(truth[rows[neg]].mean()) if neg.any() else None
    return Replayed(
        iteration, len(rows), run, int(run_pos.sum()), int(run_neg.sum()), new, int(pos.sum()), int(neg.sum()),
        precision, false_omission,
    )  # fmt: skip


def replay(
    storage: Storage, category: str, params: CascadeParams, truth: dict[str, bool] | None = None
) -> list[Replayed]:
    """Every calibrated iteration of ``category``'s stored run, replayed with ``params`` (see the module doc).

    ``truth`` is ``{uri: is a <category>}`` (``truth.read_truth``); images it lacks count as negatives.
    """
    done = [k for k in manifest_iterations(storage, category) if k >= 1]
    done = [k for k in done if storage.exists(storage.path(calibration_key(category, k)))]
    if not done:
        raise FileNotFoundError(
            f"no calibrated iteration of {category!r} under {storage.url}: replay reads a run's stored thresholds;"
            " run the cascade first (lsun-hitl run or simulate)"
        )
    by_row = None if truth is None else per_row(truth, read_pool(storage, columns=["uri"]).column("uri").to_pylist())
    return [replay_iteration(storage, category, k, params, by_row) for k in done]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(rows: Sequence[Replayed]) -> str:
    """A Markdown table of the replayed iterations, the run's figures beside the replayed ones."""
    lines = [
        "| iteration | open | run: t+ / t- | run: model + / - | replay: t+ / t- | replay: model + / - |"
        " replay precision (truth) | replay false omission (truth) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.iteration} | {r.open:,} | {_cell(r.run.positive)} / {_cell(r.run.negative)} |"
            f" {r.run_positive:,} / {r.run_negative:,} | {_cell(r.new.positive)} / {_cell(r.new.negative)} |"
            f" {r.positive:,} / {r.negative:,} | {_cell(r.precision)} | {_cell(r.false_omission)} |"
        )
    return "\n".join(lines)
