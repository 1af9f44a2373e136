"""``lsun-hitl``: import data, build the pool, run the cascade, deliver labels, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cluster import ClusterError
from .config import ARCHITECTURES, CascadeParams, ConfigError, ModelParams, validate_model
from .crowd import CrowdParams
from .labelers import LabelerError
from .labels import LabelError
from .options import add_flags, params_from_args
from .quality import QCParams, QualityError
from .storage import Storage, StorageError, clear_category, dataset_key, groundtruth_key, storage_options_from_env


def _storage(args: argparse.Namespace) -> Storage:
    options = storage_options_from_env()
    if getattr(args, "storage_options", None):
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--storage-options is not a JSON object ({exc})") from exc
    return Storage(args.root, options)


def _params(args: argparse.Namespace) -> CascadeParams:
    return params_from_args(args)


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="lsun-data", help="storage root: a folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--storage-options", help="fsspec storage options as JSON (else LSUN_HITL_STORAGE_OPTIONS)")


def _add_cascade(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The category (one, or several with ``many``), the Dask cluster, and every cascade setting's flag."""
    if many:
        p.add_argument("--category", "--categories", nargs="+", required=True, help="one or more categories")
    else:
        p.add_argument("--category", default="sneaker")
    p.add_argument("--dask-address", help="scheduler of an existing Dask cluster (default: a LocalCluster)")
    add_flags(p)


def _add_qc(p: argparse.ArgumentParser) -> None:
    q = QCParams()
    p.add_argument("--labels-per-image", type=int, default=q.labels_per_image)
    p.add_argument("--max-labels-per-image", type=int, default=q.max_labels_per_image)
    p.add_argument("--min-margin", type=int, default=q.min_margin, help="ask more while |yes - no| is below this")
    p.add_argument("--gold-rate", type=float, default=q.gold_rate, help="share of each batch that is gold")
    p.add_argument("--min-gold-accuracy", type=float, default=q.min_gold_accuracy)
    p.add_argument("--batch-size", type=int, default=q.batch_size)
    p.add_argument("--aggregation", choices=("dawid-skene", "majority"), default=q.aggregation)


def _qc(args: argparse.Namespace) -> QCParams:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsun-hitl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-fashion-mnist", help="write Fashion-MNIST as PNGs + ground truth under the root")
    _add_root(p)
    p.add_argument("--source-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--limit", type=int, help="import a seeded random subset of this many images")

    p = sub.add_parser("ingest", help="build the pool manifest from an image prefix or a list of URLs")
    _add_root(p)
    p.add_argument("--images", required=True, help="URL prefix holding the images, or @file with one URL a line")
    p.add_argument("--dask-address")

    p = sub.add_parser("pretrain", help="learn a backbone from the unlabeled pool (rotation prediction), once per pool")
    _add_root(p)
    m = ModelParams()
    p.add_argument("--arch", choices=ARCHITECTURES, default=m.arch)
    p.add_argument("--image-size", type=int, default=m.image_size)
    p.add_argument("--epochs", type=int, default=4, help="passes over the sample")
    p.add_argument("--sample", type=int, default=50_000, help="pool images to learn from (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("run", help="run the cascade flow for one category (waits for people's labels)")
    _add_root(p)
    _add_cascade(p)
    p.add_argument(
        "--expected-base-rate",
        type=float,
        help="your estimate of the category's share of the pool, for the plan printed before the run starts",
    )

    p = sub.add_parser("resume", help="store a label file for a request and resume the waiting run")
    _add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--request", required=True, help="request id, e.g. iteration-1")
    p.add_argument("--labels", help="CSV or JSONL with image_id, labeler, answer (yes/no/unsure)")

    p = sub.add_parser("handout", help="write a request for another labeling tool: CSV, or Label Studio tasks (.json)")
    _add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--request", required=True, help="request id, e.g. iteration-1 (or a follow-up, iteration-1-more-1)")
    p.add_argument("--out", required=True, help="a .csv (image_id, uri, labeler, answer) or .json (Label Studio) file")
    p.add_argument("--gold", type=int, default=20, help="gold images mixed in, unmarked (their answers rate labelers)")

    p = sub.add_parser("decide", help="answer a run that asks whether its large remainder goes to people")
    _add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--remainder", required=True, choices=("people", "unresolved"))

    p = sub.add_parser("serve", help="run the labeling service: the labeling page and its API")
    _add_root(p)
    _add_qc(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--no-resume", action="store_true", help="do not resume waiting runs when a request is done")
    p.add_argument("--cors-origin", action="append", help="allow this browser origin (default: none)")

    p = sub.add_parser("labelers", help="create labelers and their tokens, list them, show their figures")
    _add_root(p)
    p.add_argument("action", choices=("add", "list", "stats"))
    p.add_argument("name", nargs="?", help="labeler name (add)")
    p.add_argument("--admin", action="store_true", help="the new labeler may call admin endpoints")
    p.add_argument("--replace", action="store_true", help="issue a new token for an existing labeler")
    p.add_argument("--category", help="stats of one category only")

    p = sub.add_parser("gold", help="store the gold images (known answers) mixed into labelers' batches")
    _add_root(p)
    p.add_argument("--category", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help="CSV with image_id or uri, and answer (yes/no), given by an expert")
    g.add_argument(
        "--from-truth",
        "--from-fashion-mnist",
        dest="from_truth",
        type=int,
        metavar="N",
        help="N pool images with registered ground truth (lsun-hitl truth; Fashion-MNIST's), half positives",
    )

    p = sub.add_parser("truth", help="register a ground-truth table or class-folder tree (simulation tools only)")
    _add_root(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--table", help="CSV or Parquet: uri or image_id, and a class column or a yes/no column per category"
    )
    g.add_argument("--folder", help="an ImageFolder-style tree (one folder per class), local or any fsspec URL")
    p.add_argument("--name", help="the table's name under groundtruth/ (default: the file or folder's name)")

    p = sub.add_parser("crowd", help="serve label requests with a simulated crowd (registered truth)")
    _add_root(p)
    p.add_argument("--category", default="sneaker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--service", help="URL of the labeling service: answer through it, as people do")

    p = sub.add_parser("evaluate", help="compare a finished category with its registered ground truth")
    _add_root(p)
    p.add_argument("--category", default="sneaker")

    p = sub.add_parser("export", help="export finished categories: LSUN's LMDB, Parquet, ImageFolder, Label Studio")
    _add_root(p)
    p.add_argument("--category", nargs="+", required=True, help="one or more finished categories")
    p.add_argument("--format", required=True, choices=("lsun", "parquet", "imagefolder", "label-studio"))
    p.add_argument("--out", required=True, help="destination folder (parquet and label-studio: any fsspec URL)")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=("positive", "negative", "unresolved"),
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
        choices=("human-first", "drop"),
        default="human-first",
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
    _add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument(
        "--labels", required=True, help="Label Studio JSON export of the tasks of export --format label-studio"
    )

    p = sub.add_parser(
        "simulate",
        help="predict the human effort: the cascade per category and seed, a simulated crowd answering from the truth",
    )
    _add_root(p)
    _add_cascade(p, many=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per category and seed")
    c = CrowdParams()
    p.add_argument("--labelers", type=int, default=c.n_labelers, help="simulated labelers")
    p.add_argument("--accuracy", type=float, default=c.accuracy, help="their mean accuracy")
    p.add_argument("--accuracy-spread", type=float, default=c.accuracy_spread)
    p.add_argument("--spammer-share", type=float, default=c.spammer_share, help="share answering at random")
    p.add_argument("--answers-per-image", type=int, default=c.labels_per_image, help="first answers per image")
    p.add_argument("--work", help="folder for the runs and the report (default: <root>/simulations)")

    p = sub.add_parser("demo", help="import Fashion-MNIST, build the pool, run the cascade with a simulated crowd")
    _add_root(p)
    _add_cascade(p)
    p.add_argument("--limit", type=int, help="use a seeded random subset of this many images (default: all 70,000)")
    p.add_argument("--keep", action="store_true", help="continue the category's earlier run instead of starting over")
    p.add_argument("--service-port", type=int, default=0, help="port of the labeling service (default: any free)")
    return parser


def cmd_import(args: argparse.Namespace) -> None:
    from .fashion_mnist import import_fashion_mnist
    from .progress import Bar

    storage = _storage(args)
    storage.check_writable()
    prefix = import_fashion_mnist(storage, source_dir=args.source_dir, limit=args.limit, progress=Bar("import", "img"))
    print(f"images under {prefix}; ground truth in {storage.url_of(groundtruth_key('fashion-mnist'))}")


def ingest(storage: Storage, images: str, dask_address: str | None = None) -> None:
    from .cluster import dask_client
    from .ingest import build_pool, check_prefix
    from .progress import Bar

    sources: Any = images
    if images.startswith("@"):
        with open(images[1:]) as f:
            sources = [line.strip() for line in f if line.strip()]
    else:
        check_prefix(images, storage.options)  # before a cluster starts
    with dask_client(dask_address) as client:
        report = build_pool(storage, sources, client=client, progress=Bar("ingest", "chunk"))
    print(f"pool: {report}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .pretrain import pretrain_on_pool
    from .progress import Bar

    if args.epochs < 1 or args.sample < 2:
        raise ConfigError("--epochs must be at least 1 and --sample at least 2 images")
    params = ModelParams(arch=args.arch, image_size=args.image_size)
    validate_model(params)
    storage = _storage(args)
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
    storage = _storage(args)
    storage.check_writable()
    ingest(storage, args.images, args.dask_address)


def cmd_run(args: argparse.Namespace) -> None:
    from .cascade import preflight
    from .runner import run_cascade

    storage = _storage(args)
    first = preflight(storage, args.category, _params(args), args.dask_address, base_rate=args.expected_base_rate)
    if first is not None:
        print(first, flush=True)
    summary = run_cascade(
        args.category,
        storage.url,
        params=_params(args),
        dask_address=args.dask_address,
        storage_options=storage.options,
    )
    print(json.dumps(summary, indent=2))
    for warning in summary.get("warnings", ()):
        print(f"lsun-hitl run: warning: {args.category}: {warning}", file=sys.stderr)


def cmd_resume(args: argparse.Namespace) -> None:
    import hashlib

    import pyarrow as pa

    from .cascade import labels_complete
    from .handout import follow_up, gold_ids, root_request
    from .labelfile import read_label_file
    from .labels import read_request, submit_votes
    from .quality import read_gold
    from .runner import resume

    storage = _storage(args)
    _, request = read_request(storage, args.category, args.request)  # an unknown request: a clear error
    if args.labels:
        gold = read_gold(storage, args.category)
        mixed = set(gold_ids(storage, args.category, args.request))
        gold = gold.filter(pa.array([g in mixed for g in gold.column("image_id").to_pylist()], pa.bool_()))
        shown = pa.concat_tables([request.select(["image_id", "uri"]), gold.select(["image_id", "uri"])])
        frame = read_label_file(args.labels, shown, args.category)
        with open(args.labels, "rb") as f:
            submission = "file-" + hashlib.blake2b(f.read(), digest_size=8).hexdigest()
        stored = submit_votes(storage, args.category, args.request, frame, submission, gold_ids=sorted(mixed))
        print(f"{len(frame)} labels {'stored' if stored else 'were already stored'} for {args.request}")
    if not labels_complete(storage, args.category, args.request):
        raise LabelError(f"request {args.request!r} is not fully labeled yet; store every image's answer first")
    checked = follow_up(storage, args.category, args.request)
    print(checked)
    if checked.follow_up is None:
        print(resume(storage, args.category, root_request(args.request)))


def cmd_handout(args: argparse.Namespace) -> None:
    from .handout import handout, write_handout

    storage = _storage(args)
    table = handout(storage, args.category, args.request, gold=args.gold)
    write_handout(table, args.out, args.category)
    print(f"{table.num_rows} images of {args.request} (gold mixed in) written to {args.out}")


def cmd_decide(args: argparse.Namespace) -> None:
    from .runner import resume_decision

    run_id = resume_decision(_storage(args), args.category, args.remainder)
    print(
        f"remainder of {args.category}: {args.remainder}; "
        + (f"resumed flow run {run_id}" if run_id else "stored (no run waits now: the next run reads it)")
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from .service import serve

    storage = _storage(args)
    storage.check_writable()
    print(f"labeling service on http://{args.host}:{args.port}/ over {storage.url} (Ctrl-C to stop)")
    serve(
        storage,
        _qc(args),
        host=args.host,
        port=args.port,
        resume_runs=not args.no_resume,
        cors_origins=args.cors_origin,
    )


def cmd_labelers(args: argparse.Namespace) -> None:
    from .labelers import create_labeler, list_labelers
    from .quality import labeler_stats, read_gold, read_qc

    storage = _storage(args)
    if args.action == "add":
        if not args.name:
            raise ConfigError("labelers add needs a NAME")
        token = create_labeler(storage, args.name, role="admin" if args.admin else "labeler", replace=args.replace)
        print(f"labeler {args.name!r} created; its token (shown once, keep it secret):\n{token}")
        print(f"it opens the page at http://<service>/#token={token}")
    elif args.action == "list":
        for who in list_labelers(storage):
            print(f"{who.name}\t{who.role}")
    else:
        from .labels import read_votes

        qc = read_qc(storage)
        categories = (
            [args.category]
            if args.category
            else sorted({p.split("/")[-3] for p in storage.glob(storage.path("labels/*/requests/*.json"))})
        )
        for category in categories:
            stats = labeler_stats(read_votes(storage, category), read_gold(storage, category), qc)
            print(f"== {category}")
            print(stats.to_string(index=False, float_format=lambda x: f"{x:.3f}") if len(stats) else "(no answers)")


def cmd_gold(args: argparse.Namespace) -> None:
    import pandas as pd

    from .ingest import read_pool
    from .quality import write_gold

    storage = _storage(args)
    if args.from_truth:
        from .truth import gold_from_truth

        gold = gold_from_truth(storage, args.category, args.from_truth)
    else:
        try:
            frame = pd.read_csv(args.labels, dtype=str, skipinitialspace=True)
        except Exception as exc:  # noqa: BLE001 - pandas raises many kinds for malformed files
            raise ConfigError(
                f"cannot parse gold file {args.labels!r} ({exc}); give a CSV with image_id or uri, and answer"
            ) from exc
        key = "image_id" if "image_id" in frame.columns else "uri" if "uri" in frame.columns else None
        if key is None or "answer" not in frame.columns:
            raise ConfigError(
                f"gold file {args.labels!r} has columns {list(frame.columns)}; give image_id or uri, and answer"
            )
        pool = read_pool(storage, columns=["image_id", "uri"]).to_pandas()
        if key == "uri":
            from .truth import to_uri

            frame["uri"] = frame["uri"].map(to_uri)
        gold = frame.drop(columns=[c for c in ("image_id", "uri") if c != key and c in frame]).merge(
            pool, on=key, how="left"
        )
        missing = gold["uri" if key == "image_id" else "image_id"].isna()
        if missing.any():
            raise ConfigError(
                f"gold file {args.labels!r} names images that are not in the pool, e.g. "
                f"{list(gold.loc[missing, key][:3])}; use the pool's image ids or URIs (lsun-hitl ingest lists them)"
            )
    print(f"{write_gold(storage, args.category, gold)} gold images stored for {args.category!r}")


def cmd_truth(args: argparse.Namespace) -> None:
    from .ingest import read_pool
    from .truth import from_folder, info, normalize, register, registered

    storage = _storage(args)
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
        from .truth import read_table_file

        pool = (
            read_pool(storage, columns=["image_id", "uri"])
            if storage.exists(storage.path("pool/images.parquet"))
            else None
        )
        table = normalize(read_table_file(args.table), pool, args.table)
    print(register(storage, name, table))


def cmd_crowd(args: argparse.Namespace) -> None:
    storage = _storage(args)
    if args.service:
        from .crowd import http_crowd

        stop = threading.Event()
        workers = http_crowd(args.service, storage, args.category, stop, CrowdParams(seed=args.seed))
        print(f"{len(workers)} simulated labelers answering {args.service} for {args.category!r}; Ctrl-C to stop")
        try:
            while any(w.is_alive() for w in workers):
                time.sleep(1.0)
        except KeyboardInterrupt:
            stop.set()
        return
    from .crowd import SimulatedCrowd
    from .runner import simulated_crowd
    from .truth import read_truth

    crowd = SimulatedCrowd(read_truth(storage, args.category), CrowdParams(seed=args.seed))
    with simulated_crowd(storage, args.category, crowd, poll_s=1.0) as thread:
        print(f"simulated crowd serving label requests for {args.category!r} under {storage.url}; Ctrl-C to stop")
        try:
            while thread.is_alive():
                thread.join(1.0)
        except KeyboardInterrupt:
            pass


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate

    print(evaluate(_storage(args), args.category))


def cmd_export(args: argparse.Namespace) -> None:
    from . import export
    from .progress import Bar

    storage = _storage(args)
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
    try:
        options = json.loads(args.out_options)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--out-options is not valid JSON ({exc}); give a JSON object such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from exc
    if not isinstance(options, dict):
        raise ConfigError("--out-options must be a JSON object")
    return options


def cmd_review(args: argparse.Namespace) -> None:
    from .export import import_review

    print(import_review(_storage(args), args.category, args.labels))


def cmd_simulate(args: argparse.Namespace) -> None:
    import dataclasses

    from .simulate import simulate, table

    storage = _storage(args)
    if not storage.is_local:
        raise ConfigError(f"simulate needs a local --root (its runs link to the pool); {storage.url} is not one")
    work = Path(args.work or storage.path("simulations"))
    crowd = CrowdParams(
        n_labelers=args.labelers,
        accuracy=args.accuracy,
        accuracy_spread=args.accuracy_spread,
        spammer_share=args.spammer_share,
        labels_per_image=args.answers_per_image,
    )
    if crowd.labels_per_image > crowd.n_labelers:
        raise ConfigError(f"--answers-per-image {crowd.labels_per_image} exceeds --labelers {crowd.n_labelers}")
    params = dataclasses.replace(_params(args), seed=args.seeds[0])

    def report(row: dict) -> None:
        c = row["cascade"]
        print(
            f"== {row['category']} seed {row['seed']}: people labeled {c['human_labeled_images']:,} images "
            f"({c['human_labeled_share']:.1%}), {c['human_answers']:,} answers; precision {c['eval_precision']:.4f}, "
            f"false omission {c['eval_false_omission']:.4f}; {c['iterations']} iterations, {c['wall_s']:.0f} s",
            flush=True,
        )
        for warning in c.get("warnings", ()):
            print(f"   warning: {warning}", flush=True)

    rows = simulate(
        storage,
        work,
        args.category,
        args.seeds,
        params,
        crowd,
        out=work / "report",
        on_row=report,
        dask_address=args.dask_address,
    )
    text = table(rows)
    report_dir = Storage(str(work / "report"))
    report_dir.write_bytes(report_dir.path("results.json"), json.dumps(rows, indent=1, default=float).encode())
    report_dir.write_bytes(report_dir.path("results.md"), (text + "\n").encode())
    print(text)
    print(f"funnel plots and results in {work / 'report'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .evaluation import evaluate
    from .fashion_mnist import check_category, import_fashion_mnist
    from .progress import Bar
    from .runner import run_cascade

    started = time.time()
    check_category(args.category)
    params = _params(args)
    from .cascade import preflight

    storage = _storage(args)
    preflight(storage, args.category, params, args.dask_address, need_pool=False)
    if not storage.exists(storage.path(groundtruth_key("fashion-mnist"))) or not storage.exists(
        storage.path("pool/images.parquet")
    ):
        print("== importing Fashion-MNIST and building the pool")
        prefix = import_fashion_mnist(storage, limit=args.limit, progress=Bar("import", "img"))
        ingest(storage, prefix, args.dask_address)
    if not args.keep:
        clear_category(storage, args.category)
    from contextlib import ExitStack

    from .crowd import http_crowd
    from .quality import read_gold, write_gold
    from .service import ServiceThread, create_app, resume_waiting_run
    from .truth import gold_from_truth

    if read_gold(storage, args.category).num_rows == 0:
        write_gold(storage, args.category, gold_from_truth(storage, args.category, 100, seed=args.seed))
    if (first := preflight(storage, args.category, params, args.dask_address)) is not None:
        print(first, flush=True)
    stop = threading.Event()
    with ExitStack() as stack:
        app = create_app(storage, QCParams(), on_complete=resume_waiting_run(storage))
        url = stack.enter_context(ServiceThread(app, port=args.service_port))
        print(f"== labeling service on {url}/ (lsun-hitl labelers add NAME --root {storage.url} gives a token)")
        workers = http_crowd(url, storage, args.category, stop, CrowdParams(seed=args.seed))
        stack.callback(lambda: [w.join(10) for w in workers])
        stack.callback(stop.set)
        print(f"== cascade for {args.category!r}: {len(workers)} simulated labelers answer through the service")
        summary = run_cascade(
            args.category, storage.url, params=params, dask_address=args.dask_address, storage_options=storage.options
        )
        figures = app.state.desk.labeler_figures(args.category)
    flagged = sorted(figures.loc[figures["flagged"], "labeler"]) if len(figures) else []
    evaluation = evaluate(storage, args.category)
    wall = time.time() - started
    from .cascade import Summary

    print("\n== final summary")
    print(Summary(**summary))
    print(evaluation)
    print(f"  labelers flagged on gold: {len(flagged)} {flagged}")
    print(f"  wall time: {wall:.0f} s")
    storage.write_json(
        storage.path(dataset_key(args.category, "demo.json")),
        {"summary": summary, "evaluation": evaluation.to_dict(), "flagged": flagged, "wall_s": wall},
    )


COMMANDS = {
    "import-fashion-mnist": cmd_import,
    "ingest": cmd_ingest,
    "pretrain": cmd_pretrain,
    "run": cmd_run,
    "resume": cmd_resume,
    "decide": cmd_decide,
    "handout": cmd_handout,
    "crowd": cmd_crowd,
    "serve": cmd_serve,
    "labelers": cmd_labelers,
    "gold": cmd_gold,
    "truth": cmd_truth,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "review": cmd_review,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    import os

    # No telemetry from the embedded Prefect server (machines may have no internet).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default; a busy 2-core machine can need more
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", logging.getLevelName(level).lower())
    logging.basicConfig(level=level)
    try:
        COMMANDS[args.command](args)
    except (
        ConfigError,
        StorageError,
        ClusterError,
        LabelError,
        LabelerError,
        QualityError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"lsun-hitl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
