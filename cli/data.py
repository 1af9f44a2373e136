"""Commands that bring data in: Fashion-MNIST, the pool of candidate images, a pretrained backbone, ground truth."""

from __future__ import annotations

import argparse
import os
from typing import Any

from cli.common import add_root, storage_from
from lsun_hitl.config import ARCHITECTURES, ConfigError, IngestParams, ModelParams, validate_model
from lsun_hitl.options import INGEST, add_flags, ingest_params_from_args
from lsun_hitl.storage import Storage, groundtruth_key


def add_commands(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("import-fashion-mnist", help="write Fashion-MNIST as PNGs + ground truth under the root")
    add_root(p)
    p.add_argument("--source-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--limit", type=int, help="import a seeded random subset of this many images")

    p = sub.add_parser("ingest", help="build the pool manifest from an image prefix or a list of URLs")
    add_root(p)
    p.add_argument("--images", required=True, help="URL prefix holding the images, or @file with one URL a line")
    p.add_argument("--dask-address")
    add_flags(p, owners=INGEST, title="ingest settings (lsun_hitl.config.IngestParams; the README's ingest table)")

    p = sub.add_parser("pretrain", help="learn a backbone from the unlabeled pool (rotation prediction), once per pool")
    add_root(p)
    m = ModelParams()
    p.add_argument("--arch", choices=ARCHITECTURES, default=m.arch)
    p.add_argument("--image-size", type=int, default=m.image_size)
    p.add_argument("--epochs", type=int, default=4, help="passes over the sample")
    p.add_argument("--sample", type=int, default=50_000, help="pool images to learn from (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("truth", help="register a ground-truth table or class-folder tree (simulation tools only)")
    add_root(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--table", help="CSV or Parquet: uri or image_id, and a class column or a yes/no column per category"
    )
    g.add_argument("--folder", help="an ImageFolder-style tree (one folder per class), local or any fsspec URL")
    p.add_argument("--name", help="the table's name under groundtruth/ (default: the file or folder's name)")


def cmd_import(args: argparse.Namespace) -> None:
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.progress import Bar

    storage = storage_from(args)
    storage.check_writable()
    prefix = import_fashion_mnist(storage, source_dir=args.source_dir, limit=args.limit, progress=Bar("import", "img"))
    print(f"images under {prefix}; ground truth in {storage.url_of(groundtruth_key('fashion-mnist'))}")


def ingest(storage: Storage, images: str, dask_address: str | None = None, params: IngestParams | None = None) -> None:
    from lsun_hitl.cluster import dask_client
    from lsun_hitl.ingest import allowed_schemes, build_pool, check_prefix, check_schemes
    from lsun_hitl.progress import Bar

    params = (params or IngestParams()).validate()  # before a cluster starts
    sources: Any = images
    if images.startswith("@"):
        with open(images[1:]) as f:
            sources = [line.strip() for line in f if line.strip()]
        check_schemes(sources, allowed_schemes(storage, params))  # before a cluster starts, before any fetch
    else:
        check_prefix(images, storage.options)  # before a cluster starts
    with dask_client(dask_address) as client:
        report = build_pool(storage, sources, client=client, progress=Bar("ingest", "chunk"), params=params)
    print(f"pool: {report}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lsun_hitl.pretrain import pretrain_on_pool
    from lsun_hitl.progress import Bar

    if args.epochs < 1 or args.sample < 2:
        raise ConfigError("--epochs must be at least 1 and --sample at least 2 images")
    params = ModelParams(arch=args.arch, image_size=args.image_size)
    validate_model(params)
    storage = storage_from(args)
    path = pretrain_on_pool(
        storage, params, sample=args.sample, epochs=args.epochs, seed=args.seed, progress=Bar("pretrain", "step")
    )
    info = storage.read_json(path.removesuffix(".pt") + ".json")
    print(
        f"pretrained {info['arch']} at {info['image_size']} px on {info['images']:,} pool images "
        f"({info['epochs']} passes, rotation accuracy {info['accuracy']:.3f}, {info['seconds']:.0f} s): {path}\n"
        "start every model from it with --weights pool"
    )


def cmd_ingest(args: argparse.Namespace) -> None:
    storage = storage_from(args)
    storage.check_writable()
    ingest(storage, args.images, args.dask_address, ingest_params_from_args(args))


def cmd_truth(args: argparse.Namespace) -> None:
    from lsun_hitl.ingest import read_pool
    from lsun_hitl.truth import from_folder, info, normalize, register, registered

    storage = storage_from(args)
    if not args.table and not args.folder:
        names = registered(storage)
        for name in names:
            print(info(storage, name))
        if not names:
            print(f"no ground truth registered under {storage.url}; add one with --table FILE or --folder DIR")
        return
    source = args.table or args.folder
    name = args.name or os.path.basename(source.rstrip("/")).split(".")[0]
    if args.folder:
        table = from_folder(args.folder)
    else:
        from lsun_hitl.truth import read_table_file

        pool = (
            read_pool(storage, columns=["image_id", "uri"])
            if storage.exists(storage.path("pool/images.parquet"))
            else None
        )
        table = normalize(read_table_file(args.table), pool, args.table)
    print(register(storage, name, table))
