"""Commands for the people in the loop: the labeling service, labelers, gold, handouts, a simulated crowd."""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from cli.common import add_qc, add_root, qc_params, storage_from
from lsun_hitl.config import ConfigError
from lsun_hitl.crowd import CrowdParams
from lsun_hitl.storage import Storage


def add_commands(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("handout", help="write a request for another labeling tool: CSV, or Label Studio tasks (.json)")
    add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--request", required=True, help="request id, e.g. iteration-1 (or a follow-up, iteration-1-more-1)")
    p.add_argument("--out", required=True, help="a .csv (image_id, uri, labeler, answer) or .json (Label Studio) file")
    p.add_argument("--gold", type=int, default=20, help="gold images mixed in, unmarked (their answers rate labelers)")

    p = sub.add_parser("serve", help="run the labeling service: the labeling page and its API")
    add_root(p)
    add_qc(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--no-resume", action="store_true", help="do not resume waiting runs when a request is done")
    p.add_argument("--cors-origin", action="append", help="allow this browser origin (default: none)")
    p.add_argument(
        "--public-url",
        help="the page's address as people reach it (behind a proxy); waiting runs show it on their resume form",
    )

    p = sub.add_parser("labelers", help="create labelers and their tokens, list them, show their figures")
    add_root(p)
    p.add_argument("action", choices=("add", "remove", "list", "stats"))
    p.add_argument("name", nargs="?", help="labeler name (add, remove)")
    p.add_argument("--admin", action="store_true", help="the new labeler may call admin endpoints")
    p.add_argument(
        "--replace", action="store_true", help="issue a new token for an existing labeler (the old one stops working)"
    )
    p.add_argument("--category", help="stats of one category only")

    p = sub.add_parser("seed-positives", help="store images known to be positives, for the first model to learn from")
    add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("file", help="CSV with a column image_id or uri: images of the category (people confirm them)")

    p = sub.add_parser("gold", help="store the gold images (known answers) mixed into labelers' batches")
    add_root(p)
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

    p = sub.add_parser("crowd", help="serve label requests with a simulated crowd (registered truth)")
    add_root(p)
    p.add_argument(
        "--category", nargs="+", default=["sneaker"], help="the categories it answers (several with --service)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--accuracy",
        type=float,
        default=CrowdParams.accuracy,
        help="labelers' mean accuracy (each draws its own around it; default: %(default)s)",
    )
    p.add_argument(
        "--spammer-share",
        type=float,
        default=CrowdParams.spammer_share,
        help="share of labelers answering at random (default: %(default)s)",
    )
    p.add_argument("--service", help="URL of the labeling service: answer through it, as people do")
    p.add_argument(
        "--accepted-log",
        metavar="PATH",
        help="with --service: append a JSON line per submission the service accepted (labeler, batch, answers)",
    )
    p.add_argument(
        "--replay-from",
        metavar="ROOT",
        help="answer each request with the answers this other root stored for it (a replay: same pool and settings)",
    )


def cmd_handout(args: argparse.Namespace) -> None:
    from lsun_hitl.handout import handout, write_handout

    storage = storage_from(args)
    table = handout(storage, args.category, args.request, gold=args.gold)
    write_handout(table, args.out, args.category)
    print(f"{table.num_rows} images of {args.request} (gold mixed in) written to {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from lsun_hitl.service import serve

    storage = storage_from(args)
    storage.check_writable()
    on_complete = None
    if not args.no_resume:  # the flow's modules (Prefect, the cascade) take ~20 s to import on 2 busy cores
        from flows.runner import resume_waiting_run

        on_complete = resume_waiting_run(storage)
    print(f"labeling service on http://{args.host}:{args.port}/ over {storage.url} (Ctrl-C to stop)")
    serve(
        storage,
        qc_params(args),
        host=args.host,
        port=args.port,
        on_complete=on_complete,
        cors_origins=args.cors_origin,
        public_url=args.public_url,
    )


def cmd_labelers(args: argparse.Namespace) -> None:
    from lsun_hitl.labelers import create_labeler, list_labelers
    from lsun_hitl.quality import labeler_stats, read_gold, read_qc

    storage = storage_from(args)
    if args.action == "add":
        if not args.name:
            raise ConfigError("labelers add needs a NAME")
        token = create_labeler(storage, args.name, role="admin" if args.admin else "labeler", replace=args.replace)
        print(f"labeler {args.name!r} created; its token (shown once, keep it secret):\n{token}")
        print(f"it opens the page at http://<service>/#token={token}")
    elif args.action == "remove":
        from lsun_hitl.labelers import remove_labeler

        if not args.name:
            raise ConfigError("labelers remove needs a NAME")
        remove_labeler(storage, args.name)
        print(f"labeler {args.name!r} removed; a running service refuses its token within seconds")
    elif args.action == "list":
        for who in list_labelers(storage):
            print(f"{who.name}\t{who.role}")
    else:
        from lsun_hitl.labels import read_votes

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


def cmd_seed_positives(args: argparse.Namespace) -> None:
    from lsun_hitl.seed_positives import read_seed_file, write_seed_positives

    storage = storage_from(args)
    n = write_seed_positives(storage, args.category, read_seed_file(args.file))
    print(f"{n} seed positives stored for {args.category!r}; the first iteration trains on them")


def cmd_gold(args: argparse.Namespace) -> None:
    import pandas as pd

    from lsun_hitl.ingest import read_pool
    from lsun_hitl.quality import write_gold

    storage = storage_from(args)
    if args.from_truth:
        from lsun_hitl.truth import gold_from_truth

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
            from lsun_hitl.truth import to_uri

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


def accepted_log(path: str) -> Any:
    """A thread-safe ``HttpLabeler.on_accepted`` appending one flushed JSON line per accepted submission."""
    import json

    lock = threading.Lock()

    def record(labeler: str, batch_id: str, response: dict) -> None:
        line = json.dumps({"labeler": labeler, "batch_id": batch_id, **response})
        with lock, open(path, "a") as f:
            f.write(line + "\n")

    return record


def crowd_params(args: argparse.Namespace) -> CrowdParams:
    for name in ("accuracy", "spammer_share"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value}: give a share between 0 and 1")
    return CrowdParams(seed=args.seed, accuracy=args.accuracy, spammer_share=args.spammer_share)


def cmd_crowd(args: argparse.Namespace) -> None:
    storage = storage_from(args)
    if args.service:
        from lsun_hitl.crowd import http_crowd

        stop = threading.Event()
        workers = http_crowd(
            args.service,
            storage,
            args.category,
            stop,
            crowd_params(args),
            on_accepted=accepted_log(args.accepted_log) if args.accepted_log else None,
        )
        print(
            f"{len(workers)} simulated labelers answering {args.service} for {', '.join(args.category)}; Ctrl-C to stop"
        )
        try:
            while any(w.is_alive() for w in workers):
                time.sleep(1.0)
        except KeyboardInterrupt:
            stop.set()
        return
    from flows.runner import simulated_crowd
    from lsun_hitl.crowd import SimulatedCrowd, StoredAnswers
    from lsun_hitl.truth import read_truth

    if len(args.category) != 1:
        raise ConfigError("without --service the crowd answers one category's requests: give one --category")
    (category,) = args.category
    if args.replay_from:
        source = Storage(args.replay_from, storage.options)
        if not source.exists(source.path("labels", category)):
            raise ConfigError(f"--replay-from {args.replay_from}: no answers for {category!r} stored there")
        crowd: SimulatedCrowd | StoredAnswers = StoredAnswers(source)
    else:
        crowd = SimulatedCrowd(read_truth(storage, category), crowd_params(args))
    with simulated_crowd(storage, category, crowd, poll_s=1.0) as thread:
        print(f"simulated crowd serving label requests for {category!r} under {storage.url}; Ctrl-C to stop")
        try:
            while thread.is_alive():
                thread.join(1.0)
        except KeyboardInterrupt:
            pass
