"""Ground truth for any pool: tables and folder trees registered once, read by the simulation tools only.

A truth table says, for some or all of the pool's images, what they are. It comes in one of two shapes:

- **a class per image**: a column ``uri`` (or ``image_id``) and a column ``class`` (or ``class_name``,
  ``label``); the image is a positive of the category its class names;
- **a yes/no per category**: ``uri`` (or ``image_id``) and one column per category holding yes/no
  (``yes``/``no``, ``true``/``false``, ``1``/``0``).

An ImageFolder-style tree (one sub-folder per class, as torchvision's ``ImageFolder`` reads it) is the first
shape: each file's class is the name of the folder right under the tree's root. Registering
(``lsun-hitl truth``) writes the table in the first or second shape to ``groundtruth/<name>.parquet`` with
full URIs, as ``lsun-hitl ingest`` lists them; Fashion-MNIST's importer writes its table the same way.

Only the simulated crowd, the gold helper and the evaluation read it (``read_truth``); the pipeline never does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .storage import Storage, groundtruth_key

CLASS_COLUMNS = ("class_name", "class", "label")
KEY_COLUMNS = ("uri", "image_id")
YES = {"yes", "true", "1", "y", "t", "positive"}
NO = {"no", "false", "0", "n", "f", "negative"}


class TruthError(ValueError):
    """A truth table or folder that cannot be used; the message names the input and the fix."""


@dataclass(frozen=True)
class TruthInfo:
    """What a registered truth table holds and how much of the pool it covers."""

    name: str
    images: int
    categories: tuple[str, ...]
    covered: int
    pool: int

    def __str__(self) -> str:
        cats = ", ".join(self.categories)
        return (
            f"truth {self.name!r}: {self.images:,} images, categories {cats}; covers {self.covered:,} of the "
            f"pool's {self.pool:,} images"
        )


def to_uri(value: str) -> str:
    """A full URL for ``value``: local paths become ``file://`` URLs, as ``lsun-hitl ingest`` lists them."""
    if "://" in value:
        return value
    return "file://" + os.path.abspath(value)


def read_table_file(path: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise TruthError(f"truth table {path!r} does not exist; pass a CSV or Parquet file")
    try:
        if path.endswith(".parquet"):
            return pq.read_table(path)
        convert = pacsv.ConvertOptions(strings_can_be_null=False, column_types={})
        table = pacsv.read_csv(path, convert_options=convert)
        return table.cast(pa.schema([pa.field(f.name, pa.string()) for f in table.schema]))
    except (pa.ArrowInvalid, OSError) as exc:
        raise TruthError(f"cannot read truth table {path!r} ({exc}); give a CSV or Parquet file") from exc


def normalize(table: pa.Table, pool: pa.Table | None, source: str) -> pa.Table:
    """The stored shape of a truth table: ``uri`` and ``class_name``, or ``uri`` and a bool column per category.

    ``pool`` (image_id, uri) resolves tables keyed by ``image_id``; ``source`` names the input in errors.
    """
    names = table.column_names
    key = next((k for k in KEY_COLUMNS if k in names), None)
    if key is None:
        raise TruthError(f"truth table {source!r} has no 'uri' or 'image_id' column (it has: {', '.join(names)})")
    uris = _uris(table, key, pool, source)
    if len(set(uris)) != len(uris):
        raise TruthError(f"truth table {source!r} names some images twice; keep one row per image")
    class_col = next((c for c in CLASS_COLUMNS if c in names), None)
    if class_col is not None:
        classes = [str(v).strip() for v in table.column(class_col).to_pylist()]
        return pa.table({"uri": uris, "class_name": classes})
    columns: dict[str, pa.Array | list] = {"uri": uris}
    for name in names:
        if name in KEY_COLUMNS:
            continue
        values = [str(v).strip().lower() for v in table.column(name).to_pylist()]
        bad = sorted({v for v in values if v not in YES | NO})
        if bad:
            raise TruthError(
                f"truth table {source!r}: column {name!r} holds {bad[:3]}, not yes/no; give a 'class' column "
                "(one class per image) or yes/no columns named by category"
            )
        columns[name] = pa.array([v in YES for v in values], pa.bool_())
    if len(columns) == 1:
        raise TruthError(
            f"truth table {source!r} has no class column ({', '.join(CLASS_COLUMNS)}) and no yes/no column per category"
        )
    return pa.table(columns)


def _uris(table: pa.Table, key: str, pool: pa.Table | None, source: str) -> list[str]:
    """Each row's image as a URI: the ``uri`` column's, or the pool's for an ``image_id``."""
    keys = [str(v) for v in table.column(key).to_pylist()]
    if key != "image_id":
        return [to_uri(k) for k in keys]
    if pool is None:
        raise TruthError(f"truth table {source!r} names images by image_id: ingest the pool first")
    by_id = dict(zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist(), strict=True))
    missing = [k for k in keys if k not in by_id]
    if missing:
        raise TruthError(
            f"truth table {source!r} names {len(missing)} image_id(s) not in the pool, e.g. {missing[:3]}; "
            "use the ids of `lsun-hitl ingest`'s pool, or name images by uri"
        )
    return [by_id[k] for k in keys]


def from_folder(folder: str, storage_options: dict | None = None) -> pa.Table:
    """An ImageFolder-style tree as a truth table: each file's class is the folder right under ``folder``."""
    from fsspec.core import url_to_fs

    from .ingest import list_prefix

    try:
        urls = list_prefix(folder, storage_options)
    except FileNotFoundError as exc:
        raise TruthError(str(exc)) from exc
    fs, path = url_to_fs(folder, **(storage_options or {}))
    root = fs.unstrip_protocol(path).rstrip("/") + "/"
    uris, classes = [], []
    for url in urls:
        rel = url.removeprefix(root)
        if "/" in rel:  # a file beside the class folders has no class
            uris.append(url)
            classes.append(rel.split("/", 1)[0])
    if not uris:
        raise TruthError(
            f"no images in class folders under {folder!r}; give a tree with one folder per class (<class>/<image>)"
        )
    return pa.table({"uri": uris, "class_name": classes})


def categories_of(table: pa.Table) -> tuple[str, ...]:
    """The categories a stored truth table can answer for."""
    if "class_name" in table.column_names:
        return tuple(sorted(set(table.column("class_name").to_pylist())))
    return tuple(c for c in table.column_names if c != "uri")


def register(storage: Storage, name: str, table: pa.Table) -> TruthInfo:
    """Store ``table`` (stored shape, see ``normalize``) as ``groundtruth/<name>.parquet``; say what it covers."""
    if not name or "/" in name or name.startswith("."):
        raise TruthError(f"truth name {name!r} cannot name a file; use letters, digits and dashes")
    storage.write_table(storage.path(groundtruth_key(name)), table)
    return info(storage, name)


def info(storage: Storage, name: str) -> TruthInfo:
    """What the registered table ``name`` holds and how much of the pool it covers."""
    table = storage.read_table(storage.path(groundtruth_key(name)))
    pool_path = storage.path("pool/images.parquet")
    pool_uris = storage.read_table(pool_path, columns=["uri"]).column("uri") if storage.exists(pool_path) else None
    covered = int(pc.sum(pc.is_in(pool_uris, table.column("uri"))).as_py() or 0) if pool_uris is not None else 0
    return TruthInfo(
        name=name,
        images=table.num_rows,
        categories=categories_of(table),
        covered=covered,
        pool=0 if pool_uris is None else len(pool_uris),
    )


def registered(storage: Storage) -> list[str]:
    """Names of the truth tables under the root (``groundtruth/<name>.parquet``), sorted."""
    paths = storage.glob(storage.path(groundtruth_key("*")))
    return sorted(p.rsplit("/", 1)[-1].removesuffix(".parquet") for p in paths)


def read_truth(storage: Storage, category: str) -> dict[str, bool]:
    """``{uri: image is a <category>}`` from every registered table that knows ``category``.

    Raises TruthError naming the registered tables and their categories when none does.
    """
    truth: dict[str, bool] = {}
    known: list[str] = []
    for name in registered(storage):
        table = storage.read_table(storage.path(groundtruth_key(name)))
        cats = categories_of(table)
        known += cats
        if category not in cats:
            continue
        uris = table.column("uri").to_pylist()
        if "class_name" in table.column_names:
            values = pc.equal(table.column("class_name"), category).to_pylist()
        else:
            values = table.column(category).to_pylist()
        truth.update(zip(uris, values, strict=True))
    if not truth:
        have = ", ".join(sorted(set(known))) or "none registered"
        raise TruthError(
            f"no ground truth for category {category!r} under {storage.url} (categories with truth: {have}); "
            "register a table or a class-folder tree with `lsun-hitl truth --table FILE` or `--folder DIR`"
        )
    return truth


def per_row(truth: dict[str, bool], uris: list[str]) -> np.ndarray:
    """``truth`` (``read_truth``'s) as a bool array over ``uris``; a URI it lacks counts as a negative."""
    return np.array([truth.get(u, False) for u in uris], bool)


def gold_from_truth(storage: Storage, category: str, n: int = 100, seed: int = 0) -> pa.Table:
    """Gold images for the simulated crowd's quality control: ``n`` pool images with truth, half positives.

    Stands in for the few answers an expert gives by hand before labeling starts; it reads the ground
    truth, as the simulated crowd does, and the pipeline only ever sees the gold answers.
    """
    import numpy as np

    from .ingest import read_pool

    truth = read_truth(storage, category)
    pool = read_pool(storage, columns=["image_id", "uri"])
    ids, uris = pool.column("image_id").to_pylist(), pool.column("uri").to_pylist()
    rng = np.random.default_rng(seed)
    pos = [k for k, u in enumerate(uris) if truth.get(u) is True]
    neg = [k for k, u in enumerate(uris) if truth.get(u) is False]
    if not pos or not neg:
        raise TruthError(
            f"the truth for {category!r} covers {len(pos)} positive and {len(neg)} negative pool images; gold "
            "needs both: register truth for more of the pool"
        )
    take = list(rng.choice(pos, min(len(pos), n // 2), replace=False)) + list(
        rng.choice(neg, min(len(neg), n - n // 2), replace=False)
    )
    return pa.table(
        {
            "image_id": [ids[k] for k in take],
            "uri": [uris[k] for k in take],
            "answer": ["yes" if truth[uris[k]] else "no" for k in take],
        }
    )
