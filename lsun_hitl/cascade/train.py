"""Training: one model per iteration, on every human label so far but the calibration images."""

from __future__ import annotations

import numpy as np

from .. import model as model_lib
from ..config import CascadeParams
from ..inputs import InputCache
from ..manifest_parts import human_labels
from ..pretrain import pretrained_weights
from ..progress import Progress
from ..scoring import read_pool_images
from ..storage import Storage, model_key
from .common import request_id_for
from .people import posteriors
from .sample import sample, sample_ids


def model_key_path(storage: Storage, category: str, iteration: int) -> str:
    return storage.path(model_key(category, iteration))


def train(
    storage: Storage, category: str, params: CascadeParams, iteration: int, progress: Progress | None = None
) -> str:
    """Train on every human label so far except this iteration's calibration sample; return the model path."""
    path = model_key_path(storage, category, iteration)
    if storage.exists(path):  # the stored model is the output; nothing to read back
        return path
    # calibration images stay held out for good when they are carried to later iterations
    earlier, earlier_p = human_labels(storage, category, iteration - 1, without_calibration=params.carry_calibration)
    drawn = sample(storage, category, params, iteration)
    rows = np.concatenate([earlier, drawn.train])
    train_ids = sample_ids(storage, category, params, iteration, "train")
    targets = np.concatenate([earlier_p, posteriors(storage, category, request_id_for(iteration), train_ids)])
    model_params = params.model_for(iteration)
    images, ok = read_pool_images(storage, rows, model_params.image_size, input_cache(storage, params, iteration))
    net = model_lib.train(
        images[ok],
        targets[ok],
        model_params,
        seed=params.seed + iteration,
        progress=progress,
        pretrained=pretrained_weights(storage, model_params),
    )
    storage.write_bytes(path, model_lib.save(net))
    return path


def input_cache(storage: Storage, params: CascadeParams, iteration: int) -> InputCache | None:
    """The pool's model-input cache at ``iteration``'s input size, or None when ``params.input_cache`` is off."""
    if not params.input_cache:
        return None
    return InputCache.of_stored_pool(storage, params.model_for(iteration).image_size)
