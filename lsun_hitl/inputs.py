"""The model-input cache: every pool image decoded once, kept as uint8 tensors in shards on the storage root.

At scale, reading and decoding images costs far more than the model, and every category's every
iteration scores the images still unlabeled: a pool shared by ten category flows would be decoded in
full at least ten times. Whichever flow scores a shard of the pool first stores the shard's model
inputs (``load_for_model`` at the model's input size: RGB, shorter side resized, centre-cropped), and
every later scoring pass of any category reads the shard instead of the images.

Layout (under the storage root)::

    cache/inputs/pool=<fingerprint>/size=<s>/shard-<n>.npy      (rows, s, s, 3) uint8, pool rows
                                                                n * shard_rows ... (n + 1) * shard_rows - 1
    cache/inputs/pool=<fingerprint>/size=<s>/shard-<n>.parquet  image_id, ok, error of those rows

The fingerprint is a hash of the pool's image ids in order, so a rebuilt pool never reads another
pool's shards. The ``.npy`` is written first and the ``.parquet`` last, each atomically: a shard is
complete when its index exists, and two flows that fill the same shard write identical bytes. A shard
holds about 64 MiB of pixels (``shard_rows``); deleting ``cache/`` only costs the next pass a decode.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import POOL, Storage

CACHE_DIR = "cache/inputs"
SHARD_BYTES = 64 << 20
POOL_BATCH = 64 * 1024  # pool rows hashed at a time
INDEX_SCHEMA = pa.schema([("image_id", pa.string()), ("ok", pa.bool_()), ("error", pa.string())])


def pool_fingerprint(image_ids: pa.Array | pa.ChunkedArray) -> str:
    """16 hex digits of BLAKE2b over the pool's image ids in pool order (their lengths and their bytes)."""
    lengths, data = hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)
    _hash_ids(image_ids, lengths, data)
    return hashlib.blake2b(lengths.digest() + data.digest(), digest_size=8).hexdigest()


def stored_pool_fingerprint(storage: Storage) -> str:
    """``pool_fingerprint`` of the pool manifest under ``storage``, read one row group at a time (the same
    digest, in a process that never holds the pool's ids: 100M of them are gigabytes)."""
    lengths, data = hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)
    with storage.fs.open(storage.path(POOL), "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["image_id"], batch_size=POOL_BATCH):
            _hash_ids(batch.column(0), lengths, data)
    return hashlib.blake2b(lengths.digest() + data.digest(), digest_size=8).hexdigest()


def _hash_ids(image_ids: pa.Array | pa.ChunkedArray, lengths: hashlib.blake2b, data: hashlib.blake2b) -> None:
    """Feed the lengths and the bytes of ``image_ids`` to the two running hashes (any chunking, same digest)."""
    for chunk in image_ids.chunks if isinstance(image_ids, pa.ChunkedArray) else [image_ids]:
        if len(chunk) == 0:
            continue
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths.update(np.diff(offsets).astype(np.int64).tobytes())
        data.update(memoryview(chunk.buffers()[2])[int(offsets[0]) : int(offsets[-1])])


def shard_rows_for(image_size: int) -> int:
    """Rows per shard: the power of two nearest below ``SHARD_BYTES`` of pixels, within [512, 16384]."""
    rows = SHARD_BYTES // (image_size * image_size * 3)
    return int(min(16384, max(512, 1 << int(np.log2(max(1, rows))))))


@dataclass(frozen=True)
class InputCache:
    """The cached model inputs of one pool at one input size, in shards of ``shard_rows`` pool rows."""

    storage: Storage
    fingerprint: str
    image_size: int
    shard_rows: int

    @classmethod
    def of_pool(cls, storage: Storage, image_ids: pa.Array | pa.ChunkedArray, image_size: int) -> InputCache:
        """The cache of the pool whose ids are ``image_ids`` (in pool order), at ``image_size``."""
        return cls(storage, pool_fingerprint(image_ids), image_size, shard_rows_for(image_size))

    @classmethod
    def of_stored_pool(cls, storage: Storage, image_size: int) -> InputCache:
        """The cache of the pool manifest stored under ``storage``, at ``image_size`` (``of_pool`` of its ids,
        read a row group at a time)."""
        return cls(storage, stored_pool_fingerprint(storage), image_size, shard_rows_for(image_size))

    @property
    def key(self) -> str:
        return f"{CACHE_DIR}/pool={self.fingerprint}/size={self.image_size}"

    def _path(self, shard: int, ext: str) -> str:
        return self.storage.path(self.key, f"shard-{shard:06d}.{ext}")

    def complete(self) -> set[int]:
        """Shards whose index is stored (one listing, not one request per shard)."""
        paths = self.storage.glob(self.storage.path(self.key, "shard-*.parquet"))
        return {int(p.rsplit("shard-", 1)[1].split(".", 1)[0]) for p in paths}

    def read_index(self, shard: int) -> pa.Table | None:
        """The index (image_id, ok, error) of ``shard``, or None if it is not complete; no pixels are read."""
        index_path = self._path(shard, "parquet")
        return self.storage.read_table(index_path) if self.storage.exists(index_path) else None

    def read(self, shard: int) -> tuple[np.ndarray, pa.Table] | None:
        """``(images (rows, s, s, 3) uint8, index table)`` of ``shard``, or None if it is not complete."""
        index_path = self._path(shard, "parquet")
        if not self.storage.exists(index_path):
            return None
        index = self.storage.read_table(index_path)
        images = np.load(io.BytesIO(self.storage.read_bytes(self._path(shard, "npy"))), allow_pickle=False)
        if images.shape != (index.num_rows, self.image_size, self.image_size, 3):
            raise ValueError(
                f"cached shard {self._path(shard, 'npy')} holds {images.shape}, not {index.num_rows} images of "
                f"{self.image_size} px; delete {self.storage.url_of(self.key)} and score again"
            )
        return images, index

    def write(self, shard: int, images: np.ndarray, index: pa.Table) -> None:
        """Store ``shard``: the pixels first, then the index that marks it complete."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, np.uint8), allow_pickle=False)
        self.storage.write_bytes(self._path(shard, "npy"), buf.getvalue())
        self.storage.write_table(self._path(shard, "parquet"), index.cast(INDEX_SCHEMA))

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cached inputs of pool ``rows``: ``(images (N, s, s, 3) uint8, ok (N,), cached (N,))``.

        ``cached`` is False for rows whose shard is not complete (their images are zeros: decode them). A local
        shard is memory-mapped, so only the rows asked for are read; a remote one is read whole.
        """
        rows = np.asarray(rows, np.int64)
        s = self.image_size
        images = np.zeros((len(rows), s, s, 3), np.uint8)
        ok = np.zeros(len(rows), bool)
        cached = np.zeros(len(rows), bool)
        shards = rows // self.shard_rows
        for shard in np.unique(shards).tolist():
            index_path = self._path(shard, "parquet")
            if not self.storage.exists(index_path):
                continue
            at = np.flatnonzero(shards == shard)
            offsets = rows[at] - shard * self.shard_rows
            if self.storage.is_local:
                pixels = np.load(self._path(shard, "npy"), mmap_mode="r", allow_pickle=False)
            else:
                pixels = np.load(io.BytesIO(self.storage.read_bytes(self._path(shard, "npy"))), allow_pickle=False)
            images[at] = pixels[offsets]
            ok[at] = (
                self.storage.read_table(index_path, columns=["ok"]).column("ok").to_numpy(zero_copy_only=False)[offsets]
            )
            cached[at] = True
        return images, ok, cached
