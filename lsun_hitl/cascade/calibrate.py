"""Calibration: thresholds from held-out human labels, and the calibration set carried to the next model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from .. import model as model_lib
from .. import report
from ..calibration import Thresholds, choose_thresholds
from ..config import CascadeParams
from ..sampling import Sample
from ..scoring import read_pool_images
from ..storage import Storage, calibration_key, calibration_set_key, report_key
from .candidates import candidate_scores
from .common import request_id_for, stored_record, thresholds_from_dict
from .people import checked_posteriors, recheck_size
from .sample import carried_calibration, sample, sample_ids
from .train import model_key_path


@dataclass(frozen=True)
class _CalibrationSet:
    """The images that calibrate an iteration's model: its new calibration sample, then the carried ones."""

    rows: np.ndarray
    image_id: pa.Array
    p_positive: np.ndarray  # people's posteriors (rechecked ones in place)
    scores: np.ndarray  # by this iteration's model
    from_iteration: np.ndarray  # the iteration that drew each image
    n_carried: int

    def table(self) -> pa.Table:
        return pa.table(
            {
                "row": pa.array(self.rows, pa.int64()),
                "image_id": self.image_id,
                "p_positive": pa.array(self.p_positive, pa.float32()),
                "from_iteration": pa.array(self.from_iteration, pa.int32()),
                "score": pa.array(self.scores, pa.float32()),
            }
        )


def calibrate(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> Thresholds:
    """Thresholds from the calibration sample's human labels (never trained on) and its scores."""
    return stored_record(
        storage,
        storage.path(calibration_key(category, iteration)),
        thresholds_from_dict,
        lambda: _calibrate(storage, category, params, iteration, dask_address),
    )


def _calibrate(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None
) -> Thresholds:
    """Choose the thresholds; write the calibration set and the score histogram (the caller writes the JSON)."""
    drawn = sample(storage, category, params, iteration)
    new_scores, histogram = candidate_scores(
        storage, category, params, iteration, drawn.train, drawn.calibration, dask_address
    )
    cal = _calibration_set(storage, category, params, iteration, drawn, new_scores)
    storage.write_table(storage.path(calibration_set_key(category, iteration)), cal.table())
    thresholds = thresholds_for(params, iteration, cal.scores, cal.p_positive, cal.n_carried)
    thresholds = replace(thresholds, n_rechecked=recheck_size(storage, category, request_id_for(iteration)))
    png = report.score_histogram(category, iteration, histogram, cal.scores, cal.p_positive, thresholds)
    storage.write_bytes(storage.path(report_key(category, f"scores-iteration={iteration}.png")), png)
    return thresholds


def thresholds_for(
    params: CascadeParams, iteration: int, scores: np.ndarray, p_positive: np.ndarray, n_carried: int = 0
) -> Thresholds:
    """``iteration``'s thresholds from calibration ``scores`` and people's ``p_positive`` under ``params``'
    threshold settings (``config.THRESHOLD_SETTINGS``)."""
    return choose_thresholds(
        scores,
        p_positive,
        target_precision=params.target_precision,
        target_false_omission=params.target_false_omission,
        confidence=params.threshold_confidence(iteration),
        min_region=params.min_region,
        n_carried=n_carried,
        scan=params.threshold_scan,
        start_share=params.start_share,
        positive_start_errors=params.positive_start_errors,
    )


def _calibration_set(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    drawn: Sample,
    new_scores: np.ndarray,
) -> _CalibrationSet:
    """The iteration's new calibration images (scored by the Dask pass: ``new_scores``) and the carried ones."""
    new_ids = sample_ids(storage, category, params, iteration, "calibration")
    new_p = checked_posteriors(storage, category, request_id_for(iteration), new_ids)
    carried = carried_calibration(storage, category, params, iteration)
    carried_rows = carried.column("row").to_numpy()
    return _CalibrationSet(
        rows=np.concatenate([drawn.calibration, carried_rows]),
        image_id=pa.concat_arrays(
            [new_ids.cast(pa.string()), carried.column("image_id").combine_chunks().cast(pa.string())]
        ),
        p_positive=np.concatenate([new_p, carried.column("p_positive").to_numpy(zero_copy_only=False)]).astype(
            np.float32
        ),
        scores=np.concatenate([new_scores, _score_rows(storage, category, iteration, carried_rows)]),
        from_iteration=np.concatenate(
            [np.full(len(drawn.calibration), iteration), carried.column("from_iteration").to_numpy()]
        ),
        n_carried=len(carried_rows),
    )


def _score_rows(storage: Storage, category: str, iteration: int, rows: np.ndarray) -> np.ndarray:
    """Scores of pool ``rows`` by the iteration's model, in this process (a few thousand at most)."""
    out = np.full(len(rows), np.nan, np.float32)
    if len(rows) == 0:
        return out
    net = model_lib.load(storage.read_bytes(model_key_path(storage, category, iteration)))
    images, ok = read_pool_images(storage, rows, net.image_size)
    out[ok] = model_lib.predict(net, images[ok])
    return out
