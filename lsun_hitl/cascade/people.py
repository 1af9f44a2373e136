"""Asking people to label images, and reading their aggregated answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import labels as labels_lib
from ..ingest import take_pool
from ..manifest import CascadeState
from ..storage import Storage, aggregated_key, request_key, taken_key
from .common import recheck_id_for


def publish(
    storage: Storage, category: str, request_id: str, iteration: int, rows: np.ndarray, flow_run_id: str | None
) -> labels_lib.LabelRequest:
    """Publish the images at pool ``rows`` to people as request ``request_id`` (shuffled order)."""
    order = np.random.default_rng([iteration, len(rows)]).permutation(len(rows))
    images = take_pool(storage, np.asarray(rows, np.int64)[order], columns=["image_id", "uri"])
    return labels_lib.publish_request(storage, category, request_id, iteration, images, flow_run_id)


def labels_complete(storage: Storage, category: str, request_id: str) -> bool:
    """True when every image of the request has at least one yes/no answer stored (or the run took its labels
    already: their aggregate is not fitted again)."""
    if storage.exists(storage.path(taken_key(category, request_id))):
        return True
    try:
        labels_lib.collect(storage, category, request_id)
        return True
    except labels_lib.LabelError:
        return False


def _aggregated(storage: Storage, category: str, request_id: str) -> dict[str, float]:
    """image_id -> people's aggregated posterior for request ``request_id`` (aggregated now if not stored)."""
    key = storage.path(aggregated_key(category, request_id))
    table = storage.read_table(key) if storage.exists(key) else labels_lib.collect(storage, category, request_id)
    return dict(zip(table.column("image_id").to_pylist(), table.column("p_positive").to_pylist(), strict=True))


def ids_at(state: CascadeState, rows: np.ndarray) -> pa.Array:
    """The image ids of pool ``rows``."""
    return pc.take(state.image_id, pa.array(rows, pa.int64()))


def posteriors(storage: Storage, category: str, request_id: str, image_ids: pa.Array) -> np.ndarray:
    """People's aggregated posterior that each of ``image_ids`` is positive, from ``request_id``."""
    agg = _aggregated(storage, category, request_id)
    return np.array([agg[i] for i in image_ids.to_pylist()], np.float32)


def recheck_size(storage: Storage, category: str, request_id: str) -> int:
    """Images people were asked about again for ``request_id`` (0 when nothing was rechecked)."""
    path = storage.path(request_key(category, recheck_id_for(request_id), "json"))
    return int(storage.read_json(path)["n_images"]) if storage.exists(path) else 0


def checked_posteriors(storage: Storage, category: str, request_id: str, image_ids: pa.Array) -> np.ndarray:
    """``posteriors``, with those of rechecked images (every answer to them, both requests) in place."""
    p = posteriors(storage, category, request_id, image_ids)
    if len(image_ids) and recheck_size(storage, category, request_id):
        agg = _aggregated(storage, category, recheck_id_for(request_id))
        p = np.array([agg.get(i, v) for i, v in zip(image_ids.to_pylist(), p.tolist(), strict=True)], np.float32)
    return p
