"""The feature cache: each pool image's frozen-backbone features, computed once and kept in shards.

A model with a frozen backbone (``ModelParams.freeze_backbone``) is a fixed function, the backbone, followed
by a head fit per category and iteration (``model.train_head``). Whichever scoring pass first meets a shard of
the pool with such a model stores the backbone's output for every image of the shard; every later pass with a
model on the same backbone (any category, any iteration) scores the shard from those features, a matrix
product, without reading an image or running the backbone. Ten categories over one pool then cost about one
pass of the backbone.

Layout (under the storage root, beside the model-input cache whose shards these follow row for row)::

    cache/features/pool=<fingerprint>/backbone=<id>/precision=<p>/shard-<n>.npy
        (rows, D) float32, pool rows n * shard_rows ... (n + 1) * shard_rows - 1

``<fingerprint>`` is the pool's (``inputs.pool_fingerprint``), ``<id>`` the backbone's (``model.backbone_id``:
its architecture, input size and tensors) and ``<p>`` how they were computed (``model.precision_of``: fp32 on
a CPU, bf16 under CUDA's autocast), so another pool, backbone or precision never reads these. Like the input
cache, the key does not cover code: a new torchvision forward pass or decoder needs ``cache/`` deleted.
Which images were usable is the input cache's index (``shard-<n>.parquet`` there); a row that was not holds
zeros here. A shard is written whole and atomically; it is complete when it exists.
Float32 keeps scores from features equal to scores from the images on the same device; at D = 1,024
(mobilenet_v3_small) that is 4 KB an image, a third of the 64-px input cache.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .inputs import InputCache
from .storage import Storage

FEATURES_DIR = "cache/features"


@dataclass(frozen=True)
class FeatureCache:
    """One backbone's features of one pool, in the shards of that pool's input cache."""

    storage: Storage
    fingerprint: str
    backbone: str
    precision: str
    shard_rows: int

    @classmethod
    def beside(cls, inputs: InputCache, backbone: str, precision: str) -> FeatureCache:
        """The features of ``backbone`` computed in ``precision`` for the pool of ``inputs``, shard for shard."""
        return cls(inputs.storage, inputs.fingerprint, backbone, precision, inputs.shard_rows)

    @property
    def key(self) -> str:
        return f"{FEATURES_DIR}/pool={self.fingerprint}/backbone={self.backbone}/precision={self.precision}"

    def _path(self, shard: int) -> str:
        return self.storage.path(self.key, f"shard-{shard:06d}.npy")

    def has(self, shard: int) -> bool:
        return self.storage.exists(self._path(shard))

    def take(self, shard: int, offsets: np.ndarray, rows: int) -> np.ndarray:
        """The features of rows ``offsets`` of ``shard`` (which must be complete and hold ``rows`` rows, as its
        input-cache index does): ``(N, D)`` float32. A local shard is memory-mapped, so only those rows are
        read; a remote one is read whole."""
        path = self._path(shard)
        if self.storage.is_local:
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            features = np.load(io.BytesIO(self.storage.read_bytes(path)), allow_pickle=False)
        if features.ndim != 2 or features.dtype != np.float32 or features.shape[0] != rows:
            raise ValueError(
                f"cached features {path} hold {features.dtype} {features.shape}, not ({rows}, D) float32; delete "
                f"{self.storage.url_of(self.key)} and score again"
            )
        return np.asarray(features[np.asarray(offsets, np.int64)])

    def write(self, shard: int, features: np.ndarray) -> None:
        """Store ``shard``'s features (every row of the shard, in pool order)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(features, np.float32), allow_pickle=False)
        self.storage.write_bytes(self._path(shard), buf.getvalue())
