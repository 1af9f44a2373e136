"""Recheck: images whose human label the model disputes go back to people before they count as truth."""

from __future__ import annotations

import numpy as np

from .. import labels as labels_lib
from ..config import CascadeParams
from ..storage import Storage
from .candidates import candidate_scores
from .common import recheck_id_for, request_id_for
from .people import posteriors, publish
from .sample import sample, sample_ids


def disputed(p_positive: np.ndarray, model_positive: np.ndarray, *, unsure: float = 0.15) -> np.ndarray:
    """Images whose aggregated human label should be asked again before it is counted as truth.

    Parameters
    ----------
    p_positive : array of float, shape (n,)
        Aggregated human posterior that each image is a positive.
    model_positive : array of bool, shape (n,)
        The model's side for each image (score >= 0.5, or the split the model put it in).
    unsure : float
        Posteriors in ``(unsure, 1 - unsure)`` are disputed whatever the model says (split answers;
        one answer alone, 0.9 under the majority rule, is not).

    Returns
    -------
    array of bool, shape (n,)
        True where people and the model disagree, or people's answers leave the label unsure.

    Why: the errors that set thresholds (and that an audit counts) are exactly the images where people
    and the model disagree, and with crowd labels that are nearly always right most of those are the
    crowd's mistakes, not the model's. A second round of answers on them alone (a few percent of the
    calibration set) removes that noise floor; images where people and the model agree are not asked
    again, so no error can be hidden by the recheck that was not already hidden without it.
    """
    p = np.asarray(p_positive, np.float64)
    return ((p >= 0.5) != np.asarray(model_positive, bool)) | ((p > unsure) & (p < 1 - unsure))


def recheck_rows(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> np.ndarray:
    """Calibration images of ``iteration`` whose label the freshly scored model disputes (``disputed``)."""
    drawn = sample(storage, category, params, iteration)
    if not params.recheck or len(drawn.calibration) == 0:
        return np.zeros(0, np.int64)
    s, _ = candidate_scores(storage, category, params, iteration, drawn.train, drawn.calibration, dask_address)
    p = posteriors(
        storage, category, request_id_for(iteration), sample_ids(storage, category, params, iteration, "calibration")
    )
    return drawn.calibration[np.isfinite(s) & disputed(p, s >= 0.5)]


def publish_recheck(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    flow_run_id: str | None = None,
    dask_address: str | None = None,
) -> labels_lib.LabelRequest | None:
    """Ask people again about the disputed calibration images; None when there are none (or recheck is off)."""
    rows = recheck_rows(storage, category, params, iteration, dask_address)
    if len(rows) == 0:
        return None
    return publish(storage, category, recheck_id_for(request_id_for(iteration)), iteration, rows, flow_run_id)
