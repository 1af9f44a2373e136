"""Commands that run the cascade: start a run, resume it with labels or a decision, simulate it, the demo."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, get_args

from cli.common import add_cascade, add_root, storage_from
from cli.data import ingest
from lsun_hitl.config import THRESHOLD_SETTINGS, ConfigError, Remainder
from lsun_hitl.crowd import CrowdParams
from lsun_hitl.labels import LabelError
from lsun_hitl.options import add_flags, options, params_from_args
from lsun_hitl.quality import QCParams
from lsun_hitl.storage import Storage, clear_category, dataset_key, groundtruth_key


def add_commands(sub: Any) -> None:
    """Add this module's subcommands to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("run", help="run the cascade flow for one category (waits for people's labels)")
    add_root(p)
    add_cascade(p)
    p.add_argument(
        "--expected-base-rate",
        type=float,
        help="your estimate of the category's share of the pool, for the plan printed before the run starts",
    )

    p = sub.add_parser("resume", help="store a label file for a request and resume the waiting run")
    add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--request", required=True, help="request id, e.g. iteration-1")
    p.add_argument("--labels", help="CSV or JSONL with image_id, labeler, answer (yes/no/unsure)")

    p = sub.add_parser("decide", help="answer a run that asks whether its large remainder goes to people")
    add_root(p)
    p.add_argument("--category", required=True)
    p.add_argument("--remainder", required=True, choices=get_args(Remainder))

    p = sub.add_parser("status", help="where every category stands: iteration, what it waits for, labels spent")
    add_root(p)
    p.add_argument("--category", nargs="+", help="only these categories")

    p = sub.add_parser(
        "simulate",
        help="predict the human effort: the cascade per category and seed, a simulated crowd answering from the truth",
    )
    add_root(p)
    add_cascade(p, many=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per category and seed")
    c = CrowdParams()
    p.add_argument("--labelers", type=int, default=c.n_labelers, help="simulated labelers")
    p.add_argument("--accuracy", type=float, default=c.accuracy, help="their mean accuracy")
    p.add_argument("--accuracy-spread", type=float, default=c.accuracy_spread)
    p.add_argument("--spammer-share", type=float, default=c.spammer_share, help="share answering at random")
    p.add_argument("--answers-per-image", type=int, default=c.labels_per_image, help="first answers per image")
    p.add_argument("--work", help="folder for the runs and the report (default: <root>/simulations)")

    p = sub.add_parser(
        "replay",
        help="choose a stored run's thresholds again with other targets, confidence or scan (seconds, no new run)",
    )
    add_root(p)
    p.add_argument("--category", "--categories", nargs="+", required=True, help="one or more categories")
    add_flags(p, exclude=[o.name for o in options() if o.name not in THRESHOLD_SETTINGS])

    p = sub.add_parser("demo", help="import Fashion-MNIST, build the pool, run the cascade with a simulated crowd")
    add_root(p)
    add_cascade(p)
    p.add_argument("--limit", type=int, help="use a seeded random subset of this many images (default: all 70,000)")
    p.add_argument("--keep", action="store_true", help="continue the category's earlier run instead of starting over")
    p.add_argument("--service-port", type=int, default=0, help="port of the labeling service (default: any free)")


def cmd_run(args: argparse.Namespace) -> None:
    from flows.runner import run_cascade
    from lsun_hitl.cascade import preflight

    storage = storage_from(args)
    params = params_from_args(args)
    first = preflight(storage, args.category, params, args.dask_address, base_rate=args.expected_base_rate)
    if first is not None:
        print(first, flush=True)
    summary = run_cascade(
        args.category,
        storage.url,
        params=params,
        dask_address=args.dask_address,
        storage_options=storage.options,
    )
    print(json.dumps(summary, indent=2))
    for warning in summary.get("warnings", ()):
        print(f"lsun-hitl run: warning: {args.category}: {warning}", file=sys.stderr)


def cmd_resume(args: argparse.Namespace) -> None:
    import hashlib

    import pyarrow as pa

    from flows.runner import resume
    from lsun_hitl.cascade import labels_complete
    from lsun_hitl.handout import follow_up, gold_ids, root_request
    from lsun_hitl.labelfile import read_label_file
    from lsun_hitl.labels import read_request, submit_votes
    from lsun_hitl.quality import read_gold

    storage = storage_from(args)
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


def cmd_status(args: argparse.Namespace) -> None:
    from lsun_hitl.status import category_status, status, status_text

    storage = storage_from(args)
    rows = [category_status(storage, c) for c in args.category] if args.category else status(storage)
    print(status_text(rows) if rows else f"no category has a run under {storage.url}")


def cmd_decide(args: argparse.Namespace) -> None:
    from flows.runner import resume_decision

    run_id = resume_decision(storage_from(args), args.category, args.remainder)
    print(
        f"remainder of {args.category}: {args.remainder}; "
        + (f"resumed flow run {run_id}" if run_id else "stored (no run waits now: the next run reads it)")
    )


def cmd_simulate(args: argparse.Namespace) -> None:
    import dataclasses

    from flows.runner import run_with_crowd
    from lsun_hitl.simulate import simulate, table

    storage = storage_from(args)
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
    params = dataclasses.replace(params_from_args(args), seed=args.seeds[0])

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
        run_with_crowd,
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


def cmd_replay(args: argparse.Namespace) -> None:
    from lsun_hitl.replay import replay, table
    from lsun_hitl.truth import TruthError, read_truth

    storage = storage_from(args)
    params = params_from_args(args)
    for category in args.category:
        try:
            truth = read_truth(storage, category)
        except TruthError:
            truth = None  # a real run: no truth to score the replayed decisions against
        rows = replay(storage, category, params, truth)
        given = ", ".join(f"{n}={getattr(params, n)}" for n in THRESHOLD_SETTINGS)
        print(f"== {category}: {storage.url} replayed with {given}")
        print(table(rows))
        print(
            f"model-decided: the run {sum(r.run_positive + r.run_negative for r in rows):,}, the replay "
            f"{sum(r.positive + r.negative for r in rows):,} (exact at iteration 1; later iterations replay each"
            " model over the candidates the run had)"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from flows.runner import run_cascade
    from lsun_hitl.evaluation import evaluate
    from lsun_hitl.fashion_mnist import check_category, import_fashion_mnist
    from lsun_hitl.progress import Bar

    started = time.time()
    check_category(args.category)
    params = params_from_args(args)
    from lsun_hitl.cascade import preflight

    storage = storage_from(args)
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

    from flows.runner import resume_waiting_run
    from lsun_hitl.crowd import http_crowd
    from lsun_hitl.quality import read_gold, write_gold
    from lsun_hitl.service import ServiceThread, create_app
    from lsun_hitl.truth import gold_from_truth

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
        from flows.runner import simulated_operator

        stack.enter_context(simulated_operator(storage, args.category, "people"))
        summary = run_cascade(
            args.category, storage.url, params=params, dask_address=args.dask_address, storage_options=storage.options
        )
        figures = app.state.desk.labeler_figures(args.category)
    flagged = sorted(figures.loc[figures["flagged"], "labeler"]) if len(figures) else []
    evaluation = evaluate(storage, args.category)
    wall = time.time() - started
    from lsun_hitl.cascade import Summary

    print("\n== final summary")
    print(Summary(**summary))
    print(evaluation)
    print(f"  labelers flagged on gold: {len(flagged)} {flagged}")
    print(f"  wall time: {wall:.0f} s")
    storage.write_json(
        storage.path(dataset_key(args.category, "demo.json")),
        {"summary": summary, "evaluation": evaluation.to_dict(), "flagged": flagged, "wall_s": wall},
    )
