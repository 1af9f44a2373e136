"""Sampling: the images people label at each iteration, for training and for calibration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import labels as labels_lib
from ..cluster import run_on_dask
from ..config import CascadeParams
from ..ingest import take_pool
from ..manifest import manifest_counts, rows_held, stored_parts
from ..manifest_parts import merge_train_draws, sample_part, stored_next_sample, stored_next_train, train_part
from ..partitions import Partitioning, merge_bottom_k
from ..sampling import SCORE_SHARE, Sample, compose_sample, sample_sizes
from ..seed_positives import seed_rows
from ..split import stalled, train_size
from ..storage import Storage, calibration_key, calibration_set_key, sample_key
from .common import funnels, request_id_for, stored_or, thresholds_from_dict
from .people import publish


def sample(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> Sample:
    """The images people label at ``iteration`` (drawn once, on the cluster at ``dask_address`` when the manifest
    has several parts; the stored draw is reused after)."""
    table = sample_table(storage, category, params, iteration, dask_address)
    idx = table.column("row").to_numpy()
    role = table.column("role").to_numpy(zero_copy_only=False)
    return Sample(train=idx[role == "train"], calibration=idx[role == "calibration"])


def sample_table(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> pa.Table:
    """``iteration``'s sample as stored: row, image_id, role (train, then calibration), drawn if not stored."""
    return stored_or(
        storage,
        storage.path(sample_key(category, iteration)),
        storage.read_table,
        lambda: _draw(storage, category, params, iteration, dask_address),
        storage.write_table,
    )


def sample_ids(storage: Storage, category: str, params: CascadeParams, iteration: int, role: str) -> pa.Array:
    """The image ids of ``iteration``'s ``role`` ("train" or "calibration") images, in ``sample``'s order."""
    table = sample_table(storage, category, params, iteration)
    return table.filter(pc.equal(table.column("role"), role)).column("image_id").combine_chunks()


def _draw(storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None) -> pa.Table:
    """Draw the sample of ``iteration`` from what is unlabeled after ``iteration - 1``: row, image_id, role.

    Bottom-k of keyed row hashes (``partitions``): each manifest part gives its ``k`` smallest-keyed unlabeled
    rows (a map, on the cluster when there are several parts) and the ``k`` smallest of those are the
    calibration stream's order, the same for any partition count. With ``train_draw="active"`` (from the second
    iteration), or seed positives (the first), the training sample comes from two more draws, by the last
    model's score and uniform (``manifest_parts.train_draws``), and the calibration sample is the calibration
    stream's first rows that training left (``sampling.compose_sample``); otherwise the stream's first rows
    calibrate and the next train. The split that wrote the manifest before drew all of them already, while each
    part was in memory (``manifest_parts.store_next_sample``, ``store_next_train``): then only those small files
    are read. The sizes come from the previous commit's counts; this process holds the parts' candidates and
    the sample, never the pool's state."""
    from .candidates import executor  # here: candidates imports the scoring step, which imports this module

    counts = manifest_counts(storage, category, iteration - 1)
    budget_left = None if params.human_budget is None else params.human_budget - counts["human"]
    n_train, n_calibration = sample_sizes(
        counts["unlabeled"],
        n_train=train_sample_size(storage, category, params, iteration),
        n_calibration=new_calibration_size(
            params, carried_calibration(storage, category, params, iteration).num_rows, iteration
        ),
        max_fraction=params.max_sample_fraction,
        budget_left=budget_left,
    )
    k = n_train + n_calibration
    seeds = seed_rows(storage, category) if iteration == 1 else np.zeros(0, np.int64)
    # the first iteration has no model's scores: its training sample takes the seed positives, if any
    active = (params.train_draw == "active" and iteration > 1) or len(seeds) > 0
    drawn = stored_next_sample(storage, category, iteration, seed=params.seed, k=k)  # drawn by the last split
    trains = stored_next_train(storage, category, iteration, seed=params.seed, k=n_train) if active else None
    if drawn is None or (active and trains is None):  # not stored with the manifest before, or other settings
        partitioning = Partitioning(rows_held(counts), stored_parts(storage, category, iteration - 1))
        kw = dict(storage=storage, category=category, iteration=iteration, partitioning=partitioning, seed=params.seed)
        with executor(dask_address, params, partitioning) as client:
            parts = list(range(partitioning.n_partitions))
            if drawn is None:
                drawn, _ = merge_bottom_k(run_on_dask(client, _sample_map, parts, k=k, **kw), k)
            if active and trains is None:
                trains = merge_train_draws(run_on_dask(client, _train_map, parts, k=n_train, **kw), n_train)
    uniform, by_score = trains if trains is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    share = SCORE_SHARE
    if len(seeds):  # every seed (at most the whole training sample), then the uniform training draw
        by_score, share = seeds, min(1.0, len(seeds) / max(1, n_train))
    drawn = compose_sample(drawn, uniform, by_score, n_train=n_train, n_calibration=n_calibration, score_share=share)
    rows = np.concatenate([drawn.train, drawn.calibration])
    return pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "image_id": take_pool(storage, rows, columns=["image_id"]).column("image_id"),
            "role": ["train"] * len(drawn.train) + ["calibration"] * len(drawn.calibration),
        }
    )


def largest_train(params: CascadeParams) -> int:
    """The most training images any iteration's sample can hold: how many rows of each training draw a split
    stores with its manifest."""
    return max(params.train_sample, params.train_sample_max)


def largest_sample(params: CascadeParams) -> int:
    """The most images any iteration's sample can hold under ``params`` (grown training sample, largest
    calibration top-up): how many rows of the next draw a split stores with its manifest."""
    return largest_train(params) + max(
        params.first_calibration_sample, params.calibration_sample, params.calibration_min_new
    )


def _sample_map(p: int, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    return sample_part(p=p, **kwargs)


def _train_map(p: int, **kwargs: Any) -> tuple:
    return train_part(p=p, **kwargs)


def train_sample_size(storage: Storage, category: str, params: CascadeParams, iteration: int) -> int:
    """New training labels ``iteration`` asks for: more after iterations that stalled (``split.train_size``)."""
    stalls = stalled([f for f in funnels(storage, category) if f.iteration < iteration])
    return train_size(params.train_sample, params.train_growth, params.train_sample_max, stalls)


def new_calibration_size(params: CascadeParams, carried: int, iteration: int) -> int:
    """New calibration images ``iteration`` asks for, given ``carried`` ones still usable."""
    wanted = params.first_calibration_sample if iteration == 1 else params.calibration_sample
    if not params.carry_calibration:
        return wanted
    return max(params.calibration_min_new, wanted - carried)


def carried_calibration(storage: Storage, category: str, params: CascadeParams, iteration: int) -> pa.Table:
    """Calibration images of earlier iterations still in the undecided band after ``iteration - 1``.

    Each was drawn uniformly from what was unlabeled when it was drawn, and kept only while every
    later model left it between the thresholds, exactly as the images still unlabeled were; so they
    are a uniform sample of the undecided region and can calibrate the next model (which never
    trains on them). Columns: row, image_id, p_positive, from_iteration.
    """
    key = storage.path(calibration_set_key(category, iteration - 1))
    if not params.carry_calibration or iteration <= 1 or not storage.exists(key):
        return pa.table(
            {
                "row": pa.array([], pa.int64()),
                "image_id": pa.array([], pa.string()),
                "p_positive": pa.array([], pa.float32()),
                "from_iteration": pa.array([], pa.int32()),
            }
        )
    table = storage.read_table(key)
    th = thresholds_from_dict(storage.read_json(storage.path(calibration_key(category, iteration - 1))))
    s = table.column("score").to_numpy(zero_copy_only=False)
    keep = np.isfinite(s)
    if th.positive is not None:
        keep &= s < th.positive
    if th.negative is not None:
        keep &= s > th.negative
    return table.filter(pa.array(keep)).drop_columns(["score"])


def publish_iteration(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None = None
) -> labels_lib.LabelRequest:
    """Ask people to label the iteration's sample (train and calibration images, mixed)."""
    drawn = sample(storage, category, params, iteration)
    rows = np.concatenate([drawn.train, drawn.calibration])
    return publish(storage, category, request_id_for(iteration), iteration, rows, flow_run_id)
