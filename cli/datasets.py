"""Commands over finished datasets: evaluate against a truth, export, and import reviews."""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import add_root, storage_from
from lsun_hitl import export
from lsun_hitl.config import ConfigError
from lsun_hitl.storage import Storage, options_from_json


def add_commands(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("evaluate", help="compare a finished category with its registered ground truth")
    add_root(p)
    p.add_argument("--category", default="sneaker")

    p = sub.add_parser("export", help="export finished categories: LSUN's LMDB, Parquet, ImageFolder, Label Studio")
    add_root(p)
    p.add_argument("--category", nargs="+", required=True, help="one or more finished categories")
    p.add_argument("--format", required=True, choices=export.FORMATS)
    p.add_argument("--out", required=True, help="destination folder (parquet and label-studio: any fsspec URL)")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=export.SPLITS,
        help="which decisions to export (default: lsun positive; imagefolder positive negative; others all)",
    )
    p.add_argument("--with-images", action="store_true", help="parquet: add each image's bytes (column image)")
    p.add_argument(
        "--combined",
        action="store_true",
        help="imagefolder: one class folder per category, conflicts resolved by --rule",
    )
    p.add_argument(
        "--rule",
        choices=export.RULES,
        default=export.RULES[0],
        help="combined: an image positive for several categories goes to the one people decided, then the "
        "most confident, then the first listed (human-first), or to none (drop)",
    )
    p.add_argument("--short-side", type=int, help="resize so the shorter side is this (lsun: 256; imagefolder: keep)")
    p.add_argument("--quality", type=int, default=75, help="lsun: JPEG quality (LSUN released 75)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="lsun: share of images in <name>_val_lmdb")
    p.add_argument("--name", help="lsun: the LMDB name prefix (default: the category)")
    p.add_argument(
        "--image-url", default="{uri}", help="label-studio: task image URL template with {uri}, {path} or {image_id}"
    )
    p.add_argument("--threads", type=int, default=4, help="images read and encoded at once")
    p.add_argument(
        "--out-options",
        help="fsspec storage options of --out as JSON (default: those of --root when it "
        "is remote, else LSUN_HITL_STORAGE_OPTIONS or the AWS environment)",
    )

    p = sub.add_parser("review", help="store Label Studio's annotation export of review tasks as people's labels")
    add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument(
        "--labels", required=True, help="Label Studio JSON export of the tasks of export --format label-studio"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lsun_hitl.evaluation import evaluate

    print(evaluate(storage_from(args), args.category))


def cmd_export(args: argparse.Namespace) -> None:
    from lsun_hitl.progress import Bar

    storage = storage_from(args)
    categories, fmt = args.category, args.format
    bar = Bar(f"export {fmt}", "img")
    if fmt != "imagefolder" and args.combined:
        raise ConfigError("--combined applies to --format imagefolder only")
    if fmt == "lsun" and args.splits and len(args.splits) > 1:
        raise ConfigError("--format lsun exports one split per LMDB (LSUN released positives); give one --splits")
    if args.name and len(categories) > 1:
        raise ConfigError("--name renames the LMDB of one category; export categories one at a time to rename them")
    if fmt in ("lsun", "label-studio") and len(categories) > 1:
        reports = []
        for c in categories:  # one LMDB per category side by side (as LSUN released them); tasks in <out>/<c>
            out = args.out if fmt == "lsun" else f"{args.out.rstrip('/')}/{c}"
            one = argparse.Namespace(**{**vars(args), "category": [c], "out": out})
            reports.append(_export_one(export, storage, one, Bar(f"export {fmt} {c}", "img")))
    else:
        reports = [_export_one(export, storage, args, bar)]
    for report in reports:
        print(report)
        if report.skipped:
            print(f"  the images left out are listed in {report.out}/{report.skipped_file}")


def _export_one(export: Any, storage: Storage, args: argparse.Namespace, bar: Any) -> Any:
    fmt, categories = args.format, args.category
    if fmt == "lsun":
        return export.export_lsun(
            storage,
            categories[0],
            args.out,
            name=args.name,
            split=(args.splits or ["positive"])[0],
            short_side=args.short_side or 256,
            quality=args.quality,
            val_fraction=args.val_fraction,
            threads=args.threads,
            progress=bar,
        )
    if fmt == "parquet":
        return export.export_parquet(
            storage,
            categories,
            args.out,
            with_images=args.with_images,
            splits=args.splits or export.SPLITS,
            threads=args.threads,
            out_options=_out_options(args),
            progress=bar,
        )
    if fmt == "imagefolder":
        return export.export_imagefolder(
            storage,
            categories,
            args.out,
            splits=args.splits or ("positive", "negative"),
            combined=args.combined,
            rule=args.rule,
            short_side=args.short_side,
            threads=args.threads,
            progress=bar,
        )
    return export.export_label_studio(
        storage,
        categories[0],
        args.out,
        splits=args.splits or export.SPLITS,
        image_url=args.image_url,
        out_options=_out_options(args),
        progress=bar,
    )


def _out_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.out_options:
        return None
    return options_from_json(args.out_options, "--out-options")


def cmd_review(args: argparse.Namespace) -> None:
    from lsun_hitl.export import import_review

    print(import_review(storage_from(args), args.category, args.labels))
