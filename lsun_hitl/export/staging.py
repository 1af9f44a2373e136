"""Where exports are written, and the run every export shares.

Folder and LMDB exports go to local directories built beside their destination and moved into place
when complete (``Staging``), so an interrupted export leaves the previous one whole. Parquet and JSON
exports go to any fsspec URL (``export_target``), written atomically through the storage's own rules.
``timed_export`` is the skeleton of every export: the clock, committing or removing the staged
directories, and the list of images left out.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..storage import Storage, storage_options_from_env
from .report import ExportError, ExportReport


def local_dir(out: str, what: str) -> str:
    """The absolute local directory ``out`` names (a path or a ``file://`` URL).

    Parameters
    ----------
    out
        The destination the user gave.
    what
        The format's name, for the error message.

    Raises
    ------
    ExportError
        ``out`` is a remote URL: the format's readers open files on disk.
    """
    if "://" in out and not out.startswith("file://"):
        raise ExportError(
            f"the {what} export is written to a local directory (its readers open files on disk), not {out!r}; "
            "give --out a local path and copy the result to object storage afterwards if needed"
        )
    return os.path.abspath(out.removeprefix("file://"))


class Staging:
    """A temporary directory beside ``final``; ``commit`` replaces ``final`` with it in one rename
    (the old content is removed only after the new one is in place), ``abort`` removes it."""

    def __init__(self, final: str) -> None:
        self.final = final
        parent = os.path.dirname(final) or "."
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)

    def commit(self) -> None:
        old = None
        if os.path.exists(self.final):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(self.final)}-", dir=os.path.dirname(self.final))
            os.replace(self.final, os.path.join(old, "x"))
        os.replace(self.path, self.final)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_skipped(directory: str, skipped: list[tuple[str, str]], name: str = "skipped.csv") -> None:
    """The images left out and why, as CSV (removed when nothing was: a re-export leaves no stale list)."""
    path = os.path.join(directory, name)
    if not skipped:
        if os.path.exists(path):
            os.unlink(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "reason"])
        w.writerows(skipped)
    os.replace(tmp, path)


def export_target(storage: Storage, out: str, options: dict[str, Any] | None) -> Storage:
    """Where a Parquet or Label Studio export goes: a local folder, or a URL with its own storage options
    (default: those of ``storage``, so an export beside a remote root needs none; else the
    environment's, ``LSUN_HITL_STORAGE_OPTIONS`` or the standard AWS settings)."""
    if "://" not in out:
        return Storage(os.path.abspath(out))
    if options is None:
        options = storage.options if not storage.is_local else storage_options_from_env()
    return Storage(out, options)


@contextmanager
def timed_export(
    report: ExportReport, staged: Sequence[Staging] = (), skipped_dir: str | None = None
) -> Iterator[ExportReport]:
    """Run an export's body (the ``with`` block), which fills ``report``.

    When the body succeeds, the staged directories are moved into place, the images left out are
    listed in ``skipped_dir`` (if given) and ``report.seconds`` is set; when it fails, they are removed
    and the error propagates.

    Parameters
    ----------
    report
        The export's report; the body adds what it writes and leaves out.
    staged
        Directories the body builds, committed together at the end.
    skipped_dir
        Directory that receives ``report.skipped_file`` once the staged directories are in place;
        ``None`` when the export writes no such list, or writes it inside its staged tree itself.
    """
    started = time.time()
    try:
        yield report
        for stage in staged:
            stage.commit()
    except BaseException:
        for stage in staged:
            stage.abort()
        raise
    if skipped_dir is not None:
        write_skipped(skipped_dir, report.skipped, report.skipped_file)
    report.seconds = time.time() - started
