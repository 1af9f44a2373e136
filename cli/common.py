"""What every command shares: the storage root, the cascade settings' flags, quality control's flags."""

from __future__ import annotations

import argparse

from lsun_hitl.config import ConfigError
from lsun_hitl.options import add_flags
from lsun_hitl.quality import AGGREGATIONS, QCParams, QualityError
from lsun_hitl.storage import Storage, options_from_json, storage_options_from_env


def storage_from(args: argparse.Namespace) -> Storage:
    given = getattr(args, "storage_options", None)
    options = options_from_json(given, "--storage-options") if given else storage_options_from_env()
    return Storage(args.root, options)


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="lsun-data", help="storage root: a folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--storage-options", help="fsspec storage options as JSON (else LSUN_HITL_STORAGE_OPTIONS)")


def add_cascade(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The category (one, or several with ``many``), the Dask cluster, and every cascade setting's flag."""
    if many:
        p.add_argument("--category", "--categories", nargs="+", required=True, help="one or more categories")
    else:
        p.add_argument("--category", default="sneaker")
    p.add_argument("--dask-address", help="scheduler of an existing Dask cluster (default: a LocalCluster)")
    add_flags(p)


def add_qc(p: argparse.ArgumentParser) -> None:
    q = QCParams()
    p.add_argument("--labels-per-image", type=int, default=q.labels_per_image)
    p.add_argument("--max-labels-per-image", type=int, default=q.max_labels_per_image)
    p.add_argument("--min-margin", type=int, default=q.min_margin, help="ask more while |yes - no| is below this")
    p.add_argument("--gold-rate", type=float, default=q.gold_rate, help="share of each batch that is gold")
    p.add_argument("--min-gold-accuracy", type=float, default=q.min_gold_accuracy)
    p.add_argument("--batch-size", type=int, default=q.batch_size)
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=q.aggregation)


def qc_params(args: argparse.Namespace) -> QCParams:
    try:
        return QCParams(
            labels_per_image=args.labels_per_image,
            max_labels_per_image=args.max_labels_per_image,
            min_margin=args.min_margin,
            gold_rate=args.gold_rate,
            min_gold_accuracy=args.min_gold_accuracy,
            batch_size=args.batch_size,
            aggregation=args.aggregation,
        ).validate()
    except QualityError as exc:
        raise ConfigError(str(exc)) from exc
