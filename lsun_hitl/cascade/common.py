"""What the cascade's steps share: request ids, the records they store, and reusing a stored output."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from ..calibration import Interval, Thresholds
from ..manifest import committed_funnel
from ..partitions import COMMIT_FILE
from ..split import Funnel
from ..storage import Storage, manifest_dir, manifest_key, report_key

T = TypeVar("T")
R = TypeVar("R", bound="Record")

REMAINDER = "remainder"
AUDIT = "audit"


class Record(Protocol):
    """A step's output stored as JSON (a dataclass with ``to_dict``)."""

    def to_dict(self) -> dict: ...


def request_id_for(iteration: int) -> str:
    return f"iteration-{iteration}"


def recheck_id_for(request_id: str) -> str:
    """The request that asks people again about some images of ``request_id``."""
    return f"{request_id}-recheck"


def stored_or(
    storage: Storage,
    path: str,
    read: Callable[[str], T],
    compute: Callable[[], T],
    write: Callable[[str, T], object],
    *,
    needs: Iterable[str] = (),
) -> T:
    """A step's output: ``read(path)`` when it is stored already, else ``compute()``, written to ``path``.

    ``needs`` are paths that ``compute`` writes itself before ``path``: the output counts as stored only
    when they exist too. A restarted run so reuses every completed step instead of redoing it (and never
    asks people twice).
    """
    if storage.exists(path) and all(storage.exists(p) for p in needs):
        return read(path)
    value = compute()
    write(path, value)
    return value


def stored_record(
    storage: Storage, path: str, from_dict: Callable[[dict], R], compute: Callable[[], R], *, needs: Iterable[str] = ()
) -> R:
    """``stored_or`` for a record kept as JSON at ``path``."""
    return stored_or(
        storage,
        path,
        lambda p: from_dict(storage.read_json(p)),
        compute,
        lambda p, record: storage.write_json(p, record.to_dict()),
        needs=needs,
    )


def thresholds_from_dict(d: dict) -> Thresholds:
    return Thresholds(
        **{
            **d,
            "precision": Interval(**d["precision"]) if d.get("precision") else None,
            "false_omission": Interval(**d["false_omission"]) if d.get("false_omission") else None,
        }
    )


def stored_funnel(storage: Storage, category: str, iteration: int, compute: Callable[[], Funnel]) -> Funnel:
    """The funnel of ``iteration`` when it and the iteration's manifest are stored, else ``compute()``.

    ``compute`` writes the manifest; the funnel, written after it, marks the iteration complete. Its commit
    records the funnel too, so a run that died between the two writes gets it back (``restore_funnels``).
    """
    return stored_record(
        storage,
        storage.path(report_key(category, f"funnel/iteration={iteration}.json")),
        lambda d: Funnel(**d),
        compute,
        needs=[manifest_marker(storage, category, iteration)],
    )


def manifest_marker(storage: Storage, category: str, iteration: int) -> str:
    """The file whose presence says ``iteration``'s manifest is written: its commit record, or the one file of
    an older root."""
    one_file = storage.path(manifest_key(category, iteration))
    return one_file if storage.exists(one_file) else storage.path(manifest_dir(category, iteration), COMMIT_FILE)


def restore_funnels(storage: Storage, category: str, iterations: Iterable[int]) -> None:
    """Write the funnel of each of ``iterations`` whose manifest is committed but whose funnel file is missing
    (the run died between the two writes) from the one its commit recorded."""
    for k in iterations:
        path = storage.path(report_key(category, f"funnel/iteration={k}.json"))
        if not storage.exists(path) and (recorded := committed_funnel(storage, category, k)) is not None:
            storage.write_json(path, recorded)


def funnels(storage: Storage, category: str) -> list[Funnel]:
    """Every stored funnel of ``category``, in iteration order."""
    paths = storage.glob(storage.path(report_key(category, "funnel/iteration=*.json")))
    out = [Funnel(**storage.read_json(p)) for p in paths]
    return sorted(out, key=lambda f: f.iteration)
