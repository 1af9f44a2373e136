"""One storage root (any fsspec URL) holding everything, in one documented layout.

Layout under the root (see README, "Storage layout")::

    pool/images.parquet                          pool manifest: image_id, uri, bytes, width, height, format
    pool/rejects.parquet                         files that are not usable images, with the reason
    pool/listing.parquet                         the files ingest listed (uri), one row group per Dask task
    groundtruth/<dataset>.parquet                evaluation only: never read by the pipeline
    samples/<category>/iteration=<k>.parquet     which images were sent to people, and in which role
    labels/<category>/requests/<request>.parquet label requests published to people (image_id, uri)
    labels/<category>/requests/<request>.json    request metadata (flow run waiting for it, counts)
    labels/<category>/votes/request=<request>/<submission>.parquet   append-only raw human answers
    labels/<category>/aggregated/<request>.parquet  aggregated answers (p_positive per image)
    models/<category>/iteration=<k>/model.pt     the classifier trained at iteration k
    scores/<category>/iteration=<k>/part-<i>.parquet  model scores of the candidates
    calibration/<category>/iteration=<k>.json    thresholds with confidence intervals
    calibration/<category>/set-iteration=<k>.parquet  the calibration set (labels, scores) behind them
    manifests/<category>/iteration=<k>/_committed.json, attempt=<a>/part-<p>.parquet  every pool image's state
                                                 after iteration k, in committed parts (``manifest``); an older
                                                 root's one ``manifest.parquet`` there still opens
    reports/<category>/...                       funnel tables and plots
    datasets/<category>/dataset/_committed.json, attempt=<a>/part-<p>.parquet  the final labeled dataset, in
                                                 committed parts (``dataset_parts``); an older root's one
                                                 ``datasets/<category>/dataset.parquet`` still reads
    datasets/<category>/summary.json             the dataset's summary
    datasets/<category>/audit.json               people's audit of the model's final splits

Every write is atomic: a reader sees the old object or the new one, never a torn one. Local files are
written to a temporary name in the same directory and renamed; object stores get one PUT per object,
which they apply atomically. Reads and writes that fail for a transient reason (a dropped connection,
a throttled or failing storage server) are retried with exponential back-off (``retries`` attempts,
``backoff_s`` doubling); then a StorageError names the object. A missing object, a permission error
or bad data is not retried, nor is a write that does not fit (a full disk, a used-up quota, a file over the
filesystem's or the process's size limit): its StorageError names the object and says so; the temporary file
is removed, the object keeps its previous content, and the step can run again once there is room.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
# failures that a retry cannot mend (pyarrow's ArrowInvalid is a ValueError)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
# writes that fail for lack of room, what that means and what makes room: retrying cannot
NO_SPACE = {
    errno.ENOSPC: ("the disk is full", "free space on it"),
    errno.EDQUOT: ("the disk quota is used up", "free space or raise the quota"),
    errno.EFBIG: (
        "the file is larger than the filesystem or this process's file-size limit (ulimit -f) allows",
        "raise the limit or use a filesystem that holds larger files",
    ),
}


class StorageError(RuntimeError):
    """A storage root that cannot be used, or an object that cannot be read or written."""


def storage_options_from_env() -> dict[str, Any]:
    """Storage options from ``LSUN_HITL_STORAGE_OPTIONS`` (a JSON object), else ``{}``.

    S3 credentials and endpoint otherwise come from the standard AWS environment and config files
    (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``), which s3fs reads itself.
    """
    raw = os.environ.get("LSUN_HITL_STORAGE_OPTIONS", "").strip()
    return options_from_json(raw, "LSUN_HITL_STORAGE_OPTIONS") if raw else {}


def options_from_json(raw: str, name: str) -> dict[str, Any]:
    """fsspec storage options given as JSON text; StorageError naming ``name`` (a flag, a variable) and the fix."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(
            f"{name} is not valid JSON ({exc}); give a JSON object such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from exc
    if not isinstance(value, dict):
        raise StorageError(f'{name} must be a JSON object, such as \'{{"endpoint_url": "http://127.0.0.1:9000"}}\'')
    return value


@dataclass(frozen=True)
class Storage:
    """A storage root: an fsspec URL (local path, ``file://``, ``s3://bucket/prefix``, ...).

    Instances are small and picklable; the filesystem object is looked up (and cached by fsspec)
    in whichever process uses it, so Dask tasks never ship an s3fs instance.
    """

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    retries: int = 5
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        url = self.url
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        object.__setattr__(self, "url", url.rstrip("/"))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.url, **self.options)[0]

    @property
    def root(self) -> str:
        return url_to_fs(self.url, **self.options)[1].rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of a key under the root."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url_of(self, *parts: str) -> str:
        """The full URL (with protocol, ``file://`` for local files) of a key, usable by any process."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def _retry(self, what: str, path: str, op: Callable[[], Any]) -> Any:
        """Run ``op``; retry transient failures with back-off, then raise StorageError naming ``path``."""
        delay = self.backoff_s
        for attempt in range(1, max(1, self.retries) + 1):
            try:
                return op()
            except PERMANENT:
                raise
            except Exception as exc:  # noqa: BLE001 - connection, throttling and server errors vary by backend
                if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                    reason, fix = NO_SPACE[exc.errno]
                    raise StorageError(
                        f"cannot {what} {path!r} under {self.url!r}: {reason} ({exc.strerror}). Nothing was "
                        f"half-written and what was stored there before is unchanged; {fix} and run the step again."
                    ) from exc
                if attempt >= self.retries:
                    raise StorageError(
                        f"cannot {what} {path!r} under {self.url!r}: {attempt} attempts failed, the last with "
                        f"{type(exc).__name__}: {exc}. Nothing was half-written; check that the storage is "
                        "reachable and run the step again."
                    ) from exc
                log.warning(
                    "storage: %s %s failed (%s: %s); retry %d in %.1f s",
                    what,
                    path,
                    type(exc).__name__,
                    exc,
                    attempt,
                    delay,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # -- checks ---------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail early, naming the root, if it cannot be created or written."""
        probe = self.path("_write_probe")
        try:
            self.write_bytes(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
            raise StorageError(
                f"storage root {self.url!r} cannot be written ({type(exc).__name__}: {exc}). "
                "Pass a writable local folder or an s3:// URL whose bucket exists and whose "
                "credentials allow writes (AWS_* environment or LSUN_HITL_STORAGE_OPTIONS)."
            ) from exc

    # -- reads ----------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self._retry("check", path, lambda: self.fs.exists(path))

    def read_bytes(self, path: str) -> bytes:
        return self._retry("read", path, lambda: self.fs.cat_file(path))

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns)

        return self._retry("read", path, read)

    def num_row_groups(self, path: str) -> int:
        """How many row groups the Parquet file at ``path`` has (its footer only is read)."""

        def count() -> int:
            with self.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_row_groups

        return self._retry("read", path, count)

    def read_row_group(self, path: str, index: int, columns: list[str] | None = None) -> pa.Table:
        """Row group ``index`` of the Parquet file at ``path``: only its footer and that group are read."""

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read_row_group(index, columns=columns)

        return self._retry("read", path, read)

    def read_rows(self, path: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows ``[start, stop)`` of the Parquet file at ``path``: only its footer and the row groups holding
        them are read, so a slice of a large table (the pool at 100M images) costs its row groups, not the file.
        Raises ``ValueError`` if the file has fewer rows than ``stop``."""

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                bounds = _group_bounds(pf)
                if stop > bounds[-1]:
                    raise ValueError(f"{path} has {int(bounds[-1]):,} rows; rows up to {stop:,} were asked for")
                groups = np.flatnonzero((bounds[:-1] < stop) & (bounds[1:] > start)).tolist()
                if stop <= start or not groups:
                    return pf.schema_arrow.empty_table().select(columns or pf.schema_arrow.names)
                table = pf.read_row_groups(groups, columns=columns)
                return table.slice(start - int(bounds[groups[0]]), stop - start)

        return self._retry("read", path, read)

    def take_rows(self, path: str, rows: Any, columns: list[str] | None = None) -> pa.Table:
        """The rows at positions ``rows`` (any order, repeats allowed) of the Parquet file at ``path``, in that
        order. Only the row groups holding them are read, one at a time, so memory is one row group and the
        result, whatever the file's size. Raises ``ValueError`` for a row past the file's end."""
        rows = np.asarray(rows, np.int64)

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                bounds = _group_bounds(pf)
                if len(rows) and (rows.min() < 0 or rows.max() >= bounds[-1]):
                    raise ValueError(f"{path} has {int(bounds[-1]):,} rows; row {int(rows.max()):,} was asked for")
                group_of = np.searchsorted(bounds, rows, side="right") - 1
                order = np.argsort(group_of, kind="stable")
                pieces = [pf.schema_arrow.empty_table().select(columns or pf.schema_arrow.names)]
                for g in np.unique(group_of).tolist():
                    mine = order[group_of[order] == g]
                    pieces.append(pf.read_row_group(g, columns=columns).take(pa.array(rows[mine] - bounds[g])))
                table = pa.concat_tables(pieces)  # in group order: put back in the order asked
                return table.take(pa.array(np.argsort(order, kind="stable"), pa.int64()))

        return self._retry("read", path, read)

    def glob(self, pattern: str) -> list[str]:
        return self._retry("list", pattern, lambda: sorted(self.fs.glob(pattern)))

    # -- atomic writes --------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (old or new content is visible, never a torn file)."""
        self._retry("write", path, lambda: self._write_once(path, data))

    def _write_once(self, path: str, data: bytes | Callable[[Any], None]) -> None:
        """One atomic write of ``data`` (bytes, or a function writing to a binary file object)."""
        fs = self.fs
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data) if isinstance(data, bytes) else data(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            # Object stores apply a single PUT (or a completed multipart upload) atomically: a stream
            # is uploaded in parts that become visible together on close, and aborted on failure.
            if isinstance(data, bytes):
                fs.pipe_file(path, data)
                return
            f = fs.open(path, "wb")
            try:
                data(f)
            except BaseException:
                discard = getattr(f, "discard", None)
                if discard is not None:
                    discard()
                f.closed = True  # never let close() (or the garbage collector) publish a partial object
                raise
            f.close()

    def write_json(self, path: str, value: Any) -> None:
        self.write_bytes(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_table(
        self,
        path: str,
        table: pa.Table,
        row_group_size: int = 1 << 20,
        dictionary: bool | list[str] = True,
    ) -> None:
        """Write ``table`` as Parquet (zstd) atomically; local files are streamed, not buffered.

        ``dictionary``: the columns to dictionary-encode (Parquet's ``use_dictionary``; default all).
        """

        def write(f: Any) -> None:
            pq.write_table(table, f, row_group_size=row_group_size, compression="zstd", use_dictionary=dictionary)

        self._retry("write", path, lambda: self._write_once(path, write))

    def write_stream(self, path: str, write: Callable[[Any], None]) -> None:
        """Write ``path`` atomically from ``write(file)``, in bounded memory (streamed to a temporary
        file locally, a multipart upload on object stores); ``write`` runs again if a try fails."""
        self._retry("write", path, lambda: self._write_once(path, write))

    def write_if_absent(self, path: str, data: bytes) -> bool:
        """Write once: return False (and change nothing) if ``path`` already exists."""
        if self.exists(path):
            return False
        self.write_bytes(path, data)
        return True


def _group_bounds(pf: pq.ParquetFile) -> np.ndarray:
    """The first row of each row group of ``pf``, and its row count at the end."""
    meta = pf.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


# ---- the layout, in one place -------------------------------------------------------------------
POOL = "pool/images.parquet"
REJECTS = "pool/rejects.parquet"
LISTING = "pool/listing.parquet"


# the folders that hold one category's run, each with a sub-folder per category: removing them starts it over
CATEGORY_DIRS = ("samples", "labels", "models", "scores", "calibration", "manifests", "reports", "datasets")


def clear_category(storage: Storage, category: str) -> None:
    """Remove everything of ``category``'s run under ``storage`` (its next run starts from iteration 1)."""
    for d in CATEGORY_DIRS:
        path = storage.path(d, category)
        if storage.exists(path):
            storage.fs.rm(path, recursive=True)


def groundtruth_key(dataset: str) -> str:
    return f"groundtruth/{dataset}.parquet"


def gold_key(category: str) -> str:
    return f"gold/{category}.parquet"


QC_KEY = "labels/qc.json"
SERVICE_KEY = "labels/service.json"  # where the last labeling service over this root said its page is
LABELERS_KEY = "labelers/labelers.json"


def batch_key(category: str, batch_id: str) -> str:
    return f"labels/{category}/batches/{batch_id}.json"


def sample_key(category: str, iteration: int) -> str:
    return f"samples/{category}/iteration={iteration}.parquet"


def request_key(category: str, request_id: str, suffix: str = "parquet") -> str:
    return f"labels/{category}/requests/{request_id}.{suffix}"


def decision_key(category: str, name: str) -> str:
    """An operator's decision the run waits for (``remainder``: whether a large remainder goes to people)."""
    return f"labels/{category}/decisions/{name}.json"


def votes_dir(category: str, request_id: str) -> str:
    return f"labels/{category}/votes/request={request_id}"


def taken_key(category: str, request_id: str) -> str:
    """Written by the run when it took a request's labels and went on (what ``resume`` looks for first)."""
    return f"labels/{category}/taken/{request_id}.json"


def aggregated_key(category: str, request_id: str) -> str:
    return f"labels/{category}/aggregated/{request_id}.parquet"


def model_key(category: str, iteration: int) -> str:
    return f"models/{category}/iteration={iteration}/model.pt"


def pretrained_key(arch: str, image_size: int) -> str:
    return f"models/pretrained/rotation-{arch}-{image_size}px.pt"


def scores_dir(category: str, iteration: int) -> str:
    return f"scores/{category}/iteration={iteration}"


def calibration_key(category: str, iteration: int) -> str:
    return f"calibration/{category}/iteration={iteration}.json"


def calibration_set_key(category: str, iteration: int) -> str:
    return f"calibration/{category}/set-iteration={iteration}.parquet"


def manifest_dir(category: str, iteration: int) -> str:
    """The folder of an iteration's manifest: committed parts (``partitions``), or an older root's one file."""
    return f"manifests/{category}/iteration={iteration}"


def manifest_key(category: str, iteration: int) -> str:
    """The one-file manifest of a root written before manifests were partitioned (read, never written)."""
    return f"{manifest_dir(category, iteration)}/manifest.parquet"


def report_key(category: str, name: str) -> str:
    return f"reports/{category}/{name}"


def dataset_key(category: str, name: str = "dataset.parquet") -> str:
    return f"datasets/{category}/{name}"


def dataset_dir(category: str) -> str:
    """The folder of a category's final dataset: committed parts (``dataset_parts``). Roots finished before
    datasets were partitioned hold ``dataset_key(category)``, one file, instead."""
    return f"datasets/{category}/dataset"
