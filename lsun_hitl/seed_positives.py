"""Seed positives: images of a category the user already knows, given to its first model.

A category that is a few percent of the pool gives the first model a few dozen positives in a uniform sample of
a few hundred; a user who knows some positives (a search result, a list someone curated) can hand them in once
per category, like gold: ``lsun-hitl seed-positives --category C FILE`` stores them at
``seed-positives/<category>.parquet`` (image_id, uri, row: the image's position in the pool). The first
iteration's training sample then holds every seed still open (``cascade.sample``), next to a uniform draw, so
its model starts from them. People label the seeds with the rest of the sample, so a wrong seed is corrected,
not learnt; and the calibration sample stays a uniform draw from the images the training sample leaves open
(``sampling.compose_sample``), so no bound depends on them.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .config import ConfigError
from .ingest import read_pool
from .storage import Storage

SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("row", pa.int64())])


def seed_positives_key(category: str) -> str:
    return f"seed-positives/{category}.parquet"


def read_seed_file(path: str) -> pd.DataFrame:
    """The seeds a CSV names: a column ``image_id`` or ``uri`` (more columns are ignored)."""
    try:
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"seed file {path!r} not found; give a CSV with a column image_id or uri") from exc
    except Exception as exc:  # noqa: BLE001 - pandas raises many kinds for malformed files
        raise ConfigError(f"cannot parse seed file {path!r} ({exc}); give a CSV with a column image_id or uri") from exc
    key = "image_id" if "image_id" in frame.columns else "uri" if "uri" in frame.columns else None
    if key is None:
        raise ConfigError(f"seed file {path!r} has columns {list(frame.columns)}; give a column image_id or uri")
    frame = frame[[key]].dropna().drop_duplicates()
    if frame.empty:
        raise ConfigError(f"seed file {path!r} names no image; give one image_id or uri a line")
    return frame


def write_seed_positives(storage: Storage, category: str, frame: pd.DataFrame) -> int:
    """Store ``frame``'s images (a column ``image_id`` or ``uri``) as ``category``'s seed positives, replacing
    any stored before; return how many. Raises ``ConfigError`` naming images that are not in the pool."""
    key = "image_id" if "image_id" in frame.columns else "uri"
    pool = read_pool(storage, columns=["image_id", "uri"])
    pool = pool.append_column("row", pa.array(np.arange(pool.num_rows, dtype=np.int64)))
    # local paths as ingest lists them: file:// URLs
    wanted = (
        frame[key].map(lambda v: v if "://" in v else "file://" + os.path.abspath(v)) if key == "uri" else frame[key]
    )
    found = pool.filter(pc.is_in(pool.column(key), pa.array(list(wanted), pa.string())))
    missing = sorted(set(wanted) - set(found.column(key).to_pylist()))
    if missing:
        raise ConfigError(
            f"{len(missing)} seed positive(s) are not in the pool, e.g. {missing[:3]}; use the pool's image ids or"
            " URIs (lsun-hitl ingest lists them)"
        )
    storage.write_table(storage.path(seed_positives_key(category)), found.select(SCHEMA.names).cast(SCHEMA))
    return found.num_rows


def seed_rows(storage: Storage, category: str) -> np.ndarray:
    """The pool rows of ``category``'s seed positives, ascending (empty when none are stored)."""
    path = storage.path(seed_positives_key(category))
    if not storage.exists(path):
        return np.zeros(0, np.int64)
    return np.sort(storage.read_table(path, columns=["row"]).column("row").to_numpy().astype(np.int64))
