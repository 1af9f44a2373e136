"""Self-supervised pretraining on the pool: a backbone for every category before anyone labels an image.

The cascade's first model learns from a few thousand labels, and every image it cannot decide goes to
people. The pool itself holds far more images, unlabeled; rotation prediction (Gidaris et al., "Unsupervised
Representation Learning by Predicting Image Rotations", ICLR 2018) learns from them alone: each image is
turned by 0, 90, 180 or 270 degrees and the network learns which. To tell, it has to find the object's
parts and their orientation (collars, soles, straps), which is what telling categories apart needs too.

The result is a state dict whose tensor names match ``ModelParams.arch``, stored once per pool at
``models/pretrained/rotation-<arch>-<size>px.pt`` (with a ``.json`` beside it) and loaded like a
torchvision checkpoint: every tensor but the head, which each category trains from scratch. Set
``ModelParams.weights = "pool"`` (``--weights pool``) to start every iteration's model from it.

Measured on Fashion-MNIST (docs/evaluation/README.md, "A backbone from the pool itself"): the first model's
AUC rose on three of four hard categories, but one seed did not show fewer human labels.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from . import model as model_lib
from .config import ModelParams
from .ingest import pool_size
from .progress import Progress
from .scoring import read_pool_images
from .storage import Storage, pretrained_key

POOL_WEIGHTS = "pool"  # ModelParams.weights value meaning "the pool's own pretrained backbone"
ROTATIONS = 4


@dataclass(frozen=True)
class Pretraining:
    """What one pretraining run did; ``accuracy`` is the rotation accuracy of its last pass (chance: 0.25)."""

    arch: str
    image_size: int
    images: int
    epochs: int
    accuracy: float
    seconds: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def rotate(batch: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Turn each square NHWC image of ``batch`` by ``turns[i]`` quarter turns (counter-clockwise)."""
    out = torch.empty_like(batch)
    for k in range(ROTATIONS):
        mask = turns == k
        if mask.any():
            out[mask] = torch.rot90(batch[mask], k, dims=(1, 2))
    return out


def rotation_pretrain(
    images: np.ndarray,
    params: ModelParams,
    *,
    epochs: int = 4,
    batch_size: int = 256,
    learning_rate: float = 0.004,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[bytes, Pretraining]:
    """Train ``params.arch`` to predict the rotation of ``images`` (N, S, S, 3) uint8, S = ``params.image_size``.

    Returns the network's state dict (torch-saved bytes: tensor names as in ``Classifier.net``, with a
    four-way head that ``model_lib.load_pretrained`` leaves out) and what the run did. Each pass turns every
    image once, by a random multiple of 90 degrees, after the classifier's own augmentation (flip, shifted
    crop); AdamW with a one-cycle schedule, as ``model_lib.train``.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise ValueError(f"need square RGB images (N, S, S, 3), got shape {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to pretrain on, got {len(images)}")
    started = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, params.threads))
    generator = torch.Generator().manual_seed(seed)
    dev = model_lib.device()
    model = model_lib.Classifier(params.arch, params.image_size)
    model_lib.replace_head(model.net, ROTATIONS)
    model = model.to(dev).train()
    x = torch.from_numpy(images)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=total, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    step, accuracy = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        right = seen = 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            turns = torch.randint(0, ROTATIONS, (len(idx),), generator=generator)
            batch = rotate(model_lib.augment(x[idx], generator), turns)
            with model_lib.autocast(dev):
                logits = model.net((batch.permute(0, 3, 1, 2).to(dev) - model.mean) / model.std)
            loss = loss_fn(logits.float(), turns.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            right += int((logits.argmax(1).cpu() == turns).sum())
            seen += len(idx)
            step += 1
            if progress:
                progress(step, total)
        accuracy = right / max(1, seen)
    model_lib.refresh_batchnorm(model, x, batch_size)
    buf = io.BytesIO()
    torch.save(model.net.cpu().state_dict(), buf)
    info = Pretraining(params.arch, params.image_size, len(x), epochs, round(accuracy, 4), time.time() - started, seed)
    return buf.getvalue(), info


def pretrain_on_pool(
    storage: Storage,
    params: ModelParams,
    *,
    sample: int = 50_000,
    epochs: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> str:
    """Pretrain ``params.arch`` at ``params.image_size`` on (a random ``sample`` of) the pool; return the path.

    Stored once per pool, architecture and size (``storage.pretrained_key``): a second call returns the
    stored weights without training, so every category's flow may call it. The write is atomic.
    """
    path = storage.path(pretrained_key(params.arch, params.image_size))
    if storage.exists(path):
        return path
    n = pool_size(storage)
    if n < 2:
        raise ValueError(f"the pool at {storage.url} has {n} images; ingest images before pretraining")
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    images, ok = read_pool_images(storage, rows, params.image_size)
    weights, info = rotation_pretrain(images[ok], params, epochs=epochs, seed=seed, progress=progress)
    storage.write_bytes(path.removesuffix(".pt") + ".json", json.dumps(info.to_dict(), indent=1).encode())
    storage.write_bytes(path, weights)  # last: its presence means the run finished
    return path


def pool_weights(storage: Storage, params: ModelParams) -> bytes | None:
    """The pool's pretrained backbone when ``params.weights`` is ``"pool"``, else None (``params.weights``
    is then a file ``model_lib`` opens itself). Raises FileNotFoundError naming the fix when it is missing."""
    if params.weights != POOL_WEIGHTS:
        return None
    path = storage.path(pretrained_key(params.arch, params.image_size))
    if not storage.exists(path):
        raise FileNotFoundError(
            f"model.weights is 'pool' but {path} does not exist: run `lsun-hitl pretrain --root {storage.url} "
            f"--arch {params.arch} --image-size {params.image_size}` first"
        )
    return storage.read_bytes(path)


def pretrained_weights(storage: Storage, params: ModelParams) -> bytes | None:
    """The bytes of the backbone ``params.weights`` names, or None when it names none.

    ``"pool"`` is the pool's own backbone (``pool_weights``). A URL on the storage root's filesystem
    (``s3://...`` when the root is on S3) is read with the root's storage options (endpoint, credentials),
    any other path or URL as fsspec opens it by default. Raises FileNotFoundError naming the weights.
    """
    import fsspec

    if not params.weights:
        return None
    if params.weights == POOL_WEIGHTS:
        return pool_weights(storage, params)
    protocol = fsspec.core.split_protocol(params.weights)[0] or "file"
    own = storage.fs.protocol
    options = storage.options if protocol in ((own,) if isinstance(own, str) else own) else {}
    return model_lib.read_weights(params.weights, **options)
