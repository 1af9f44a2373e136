"""Evaluation harness: the cascade against ground truth and against two baselines, per category and seed.

    python benchmarks/evaluate.py --root /tmp/lsun-eval --categories all --seeds 0 1 2 --out docs/evaluation

For each category x seed it runs the real cascade flow (Prefect, Dask) over the Fashion-MNIST pool with
a simulated crowd (``--accuracy``, ``--spammer-share``, ``--labels-per-image``), then

- baseline (a): every pool image labeled by the same crowd;
- baseline (b): one round of threshold auto-labeling with the cascade's human budget (same images
  count), thresholds from point estimates on a validation split;

and writes ``results.json`` (every figure), ``results.md`` (the table) and PNG plots to ``--out``.
``--limit`` runs on a seeded subset of the pool (what fits a laptop); the README of docs/evaluation
records the command that produced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from flows.runner import run_with_crowd
from lsun_hitl.baselines import all_by_crowd, single_round
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import CrowdParams
from lsun_hitl.fashion_mnist import CLASSES, import_fashion_mnist
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.options import add_flags, params_from_args
from lsun_hitl.simulate import run_one, run_root
from lsun_hitl.storage import Storage, clear_category, report_key
from lsun_hitl.truth import read_truth


def prepare(base: Path, limit: int | None) -> Storage:
    storage = Storage(str(base / "data"))
    if not storage.exists(storage.path("pool/images.parquet")):
        print(f"== importing Fashion-MNIST ({limit or 'all'} images) and building the pool", flush=True)
        build_pool(storage, import_fashion_mnist(storage, limit=limit))
    return storage


def copy_plots(storage: Storage, category: str, seed: int, plots: Path) -> None:
    """The run's funnel and first/last score histograms, as docs/evaluation/plots/<category>-seed<k>-*.png."""
    plots.mkdir(parents=True, exist_ok=True)
    hist = sorted(
        storage.glob(storage.path(report_key(category, "scores-iteration=*.png"))),
        key=lambda p: int(p.rsplit("=", 1)[1].split(".")[0]),
    )
    wanted = {"funnel": storage.path(report_key(category, "funnel.png"))}
    if hist:
        wanted |= {"scores-first": hist[0], "scores-last": hist[-1]}
    for name, path in wanted.items():
        if storage.exists(path):
            (plots / f"{category}-seed{seed}-{name}.png").write_bytes(storage.read_bytes(path))


def crowd_params(args: argparse.Namespace, seed: int) -> CrowdParams:
    """The simulated crowd of one seed's runs (and their baselines)."""
    return CrowdParams(
        accuracy=args.accuracy, spammer_share=args.spammer_share, labels_per_image=args.labels_per_image, seed=seed
    )


def add_baselines(
    row: dict,
    storage: Storage,
    data: Storage,
    ids: list[str],
    uris: list[str],
    images: np.ndarray | None,
    crowd: CrowdParams,
    model: ModelParams,
    args: argparse.Namespace,
) -> np.ndarray:
    """Baselines (a) and (b) into ``row``, (b) at the run's human budget; returns the decoded pool (reused)."""
    truth = read_truth(storage, row["category"])
    row["all_by_crowd"] = all_by_crowd(ids, uris, truth, crowd).to_dict()
    if images is None:
        from lsun_hitl.model import decode_many

        print("   decoding the pool for baseline (b)", flush=True)
        images, _ = decode_many([data.fs.cat_file(data.fs._strip_protocol(u)) for u in uris], model.image_size)
    row["single_round"] = single_round(
        images,
        ids,
        uris,
        truth,
        budget=row["cascade"]["human_labeled_images"],
        crowd_params=crowd,
        model_params=model,
        target_precision=args.target_precision,
        target_false_omission=args.target_false_omission,
        seed=row["seed"],
    ).to_dict()
    return images


PARAMS_KEY = "reports/{category}/evaluate-params.json"  # the settings a run was started with (--resume checks them)


def run_settings(params: CascadeParams, crowd: CrowdParams, data: Storage) -> dict:
    """What a run's results depend on besides the code: its cascade settings, its simulated crowd and its pool."""
    return json.loads(json.dumps({"params": params.to_dict(), "crowd": dataclasses.asdict(crowd), "data": data.url}))


def resumable(storage: Storage, category: str, settings: dict) -> bool:
    """Whether ``category``'s stored run under ``storage`` can go on: it was started with ``settings``.

    No stored run: False (a new one starts). A stored run with no recorded settings: False, saying so. A stored
    run with other settings: an error naming them (``--resume`` never discards a run it was asked to continue).
    A record of the cascade settings only (this script's first format) is compared on those.
    """
    path = storage.path(PARAMS_KEY.format(category=category))
    if not storage.exists(path):
        if storage.exists(storage.path("manifests", category)):
            print(f"   no settings are recorded for the stored {category} run: starting it over", flush=True)
        return False
    stored = storage.read_json(path)
    if "params" not in stored:  # first format: the cascade settings alone
        stored = {**settings, "params": stored}
    if stored != settings:
        changed = [
            f"{group}.{k}"
            for group in ("params", "crowd")
            for k in sorted(set(stored[group]) | set(settings[group]))
            if stored[group].get(k) != settings[group].get(k)
        ] + (["data"] if stored["data"] != settings["data"] else [])
        raise SystemExit(
            f"evaluate: error: the stored {category} run under {storage.url} was started with other settings"
            f" ({', '.join(changed)}); pass the same flags to go on with it, or drop --resume to start it over"
        )
    print(f"   going on with the stored {category} run", flush=True)
    return True


def step_seconds(storage: Storage, category: str) -> float:
    """Seconds of the recorded steps of ``category``'s run (``reports/<c>/steps/``), where ``wall_s`` is the last
    process's: each step's first completed run, whichever process ran it. A lower bound on the run's compute (a
    step interrupted partway records nothing) and no measure of waiting for people."""
    root = storage.path("reports", category, "steps")
    if not storage.exists(root):
        return 0.0
    return float(sum(storage.read_json(f).get("seconds", 0.0) for f in storage.glob(f"{root}/*/*.json")))


# The harness's own defaults, where they differ from the product's (docs/evaluation/README.md says why):
# a small convnet at 32 px suits Fashion-MNIST's 28 px images; nobody is there to answer the cascade's
# question about a large remainder, so it goes to people; --limit pools are small on purpose.
HARNESS = {
    "arch": "small_convnet",
    "image_size": 32,
    "epochs": 30,
    "audit_sample": 200,
    "large_remainder": "people",
    "allow_small_pool": True,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lsun-eval")
    ap.add_argument("--out", default="docs/evaluation")
    ap.add_argument("--categories", nargs="+", default=["all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--limit", type=int, help="a seeded subset of the 70,000 images")
    ap.add_argument("--accuracy", type=float, default=0.9)
    ap.add_argument("--spammer-share", type=float, default=0.1)
    ap.add_argument("--labels-per-image", type=int, default=3)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument(
        "--baselines-only",
        action="store_true",
        help="add baselines (a) and (b) to --out's finished runs of --categories and --seeds that lack them"
        " (the run's own budget and model settings); runs no cascade",
    )
    add_flags(ap, defaults=HARNESS, exclude=("seed", "human_budget", "weights"))
    ap.add_argument(
        "--human-budget-share",
        type=float,
        help="cap on the images people label per run, as a share of the pool (CascadeParams.human_budget);"
        " with --remainder unresolved what is left undecided then stays out of the dataset",
    )
    ap.add_argument(
        "--data",
        help="an existing storage root with the pool (pool/, images, groundtruth/), e.g. one made by"
        " benchmarks/scale_pool.py and lsun-hitl ingest, instead of importing Fashion-MNIST",
    )
    ap.add_argument(
        "--pretrain",
        action="store_true",
        help="start every model (the cascade's and baseline (b)'s) from a backbone learned once from the unlabeled"
        " pool by rotation prediction (lsun_hitl.pretrain; the product's --weights pool)",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--pretrain-sample", type=int, default=50_000, help="pool images pretraining learns from")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite results.md and the plot from --out's results.json"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on with a category's stored run under --root (one an interrupted session left) instead of"
        " starting it over, when it was started with the same settings; its steps skip what is stored",
    )
    args = ap.parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        write_report(
            json.loads((out / "results.json").read_text()), out, args.target_precision, args.target_false_omission
        )
        return 0
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    categories = list(CLASSES) if args.categories == ["all"] else args.categories
    base = Path(args.root)
    data = Storage(args.data) if args.data else prepare(base, args.limit)
    if not data.exists(data.path("pool/images.parquet")):
        print(f"evaluate: error: no pool under {data.url}; build it with lsun-hitl ingest", file=sys.stderr)
        return 2
    os.makedirs(data.path("cache"), exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["category"], r["seed"]) for r in results}
    pool = read_pool(data, columns=["image_id", "uri"])
    ids, uris = pool.column("image_id").to_pylist(), pool.column("uri").to_pylist()
    images = None
    weights = None
    if args.pretrain:
        from lsun_hitl.pretrain import pretrain_on_pool
        from lsun_hitl.progress import Bar

        print("== pretraining a backbone on the unlabeled pool (rotation prediction)", flush=True)
        weights = pretrain_on_pool(
            data,
            ModelParams(arch=args.arch, image_size=args.image_size),
            sample=args.pretrain_sample,
            epochs=args.pretrain_epochs,
            progress=Bar("pretrain", "step"),
        )
        print(f"   {data.read_json(weights.removesuffix('.pt') + '.json')}", flush=True)
    if args.baselines_only:
        for row in results:
            if row["category"] not in categories or row["seed"] not in args.seeds or "single_round" in row:
                continue
            print(f"== baselines for {row['category']} seed {row['seed']}", flush=True)
            crowd = crowd_params(args, row["seed"])
            model = CascadeParams.from_dict(row["params"]).model
            storage = run_root(base, data, row["seed"])
            images = add_baselines(row, storage, data, ids, uris, images, crowd, model, args)
            results_path.write_text(json.dumps(results, indent=1, default=float))
            b = row["single_round"]
            print(f"   (b) precision {b['precision']:.4f}, false omission {b['false_omission']:.4f}", flush=True)
        write_report(results, out, args.target_precision, args.target_false_omission)
        return 0
    for seed in args.seeds:
        storage = run_root(base, data, seed)
        crowd = crowd_params(args, seed)
        budget = None if args.human_budget_share is None else int(args.human_budget_share * len(ids))
        params = params_from_args(args, seed=seed, human_budget=budget, weights=weights)
        for category in categories:
            if (category, seed) in done:
                continue
            print(f"== {category} seed {seed}", flush=True)
            settings = run_settings(params, crowd, data)
            if not (args.resume and resumable(storage, category, settings)):
                # a new run, not the continuation of one a different --out (or an interrupted session) left behind
                clear_category(storage, category)
                storage.write_json(storage.path(PARAMS_KEY.format(category=category)), settings)
            row = run_one(storage, category, params, crowd, run_with_crowd)
            row["cascade"]["step_seconds"] = step_seconds(storage, category)
            copy_plots(storage, category, seed, out / "plots")
            if not args.no_baselines:
                images = add_baselines(row, storage, data, ids, uris, images, crowd, params.model, args)
            results.append(row)
            results_path.write_text(json.dumps(results, indent=1, default=float))
            c = row["cascade"]
            print(
                f"   cascade: precision {c['eval_precision']:.4f}, false omission {c['eval_false_omission']:.4f}, "
                f"people labeled {c['human_labeled_share']:.1%} ({c['answers_per_image']:.2f} answers/image), "
                f"{c['wall_s']:.0f} s",
                flush=True,
            )
    write_report(results, out, args.target_precision, args.target_false_omission)
    return 0


def audit_cell(a: dict | None) -> str:
    if not a:
        return "-"

    def one(v: float | None, lo: float | None, hi: float | None, covered: bool | None) -> str:
        mark = "" if covered is None else (" ✓" if covered else " ✗")
        return "-" if v is None else f"{v:.3f} [{lo:.3f}, {hi:.3f}]{mark}"

    fo = one(a["false_omission"], a["false_omission_low"], a["false_omission_high"], a.get("false_omission_covered"))
    return f"{one(a['precision'], a['precision_low'], a['precision_high'], a.get('precision_covered'))} / {fo}"


def coverage(row: dict) -> float:
    """Share of the pool the run's dataset labels positive or negative (the rest stays unresolved)."""
    return 1 - row["cascade"]["eval_unresolved"] / row["pool"]


def write_report(results: list[dict], out: Path, target_precision: float, target_fo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "| category | seed | precision | false omission | coverage | recall | people labeled | answers / image |"
        " amplification | iterations | audit: model precision [95% CI] / FO [95% CI] |"
        " (a) all-crowd precision / FO / answers per image |"
        " (b) single-round precision / FO / coverage / recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["category"], r["seed"])):
        c = r["cascade"]
        a, b, au = r.get("all_by_crowd"), r.get("single_round"), r.get("audit")
        fa = f"{a['precision']:.4f} / {a['false_omission']:.4f} / {a['human_answers'] / a['pool']:.2f}" if a else "-"
        b_recall = "-" if not b or b.get("recall") is None else f"{b['recall']:.3f}"  # not kept before session 13
        fb = f"{b['precision']:.4f} / {b['false_omission']:.4f} / {b['coverage']:.2f} / {b_recall}" if b else "-"
        lines.append(
            f"| {r['category']} | {r['seed']} | {c['eval_precision']:.4f} | {c['eval_false_omission']:.4f} | "
            f"{coverage(r):.2f} | {c['eval_recall']:.3f} | "
            f"{c['human_labeled_share']:.1%} | {c['answers_per_image']:.2f} | {c['amplification']:.1f} | "
            f"{c['iterations']} | {audit_cell(au)} | {fa} | {fb} |"
        )
    n = len(results)

    def share(key: str, part: str = "cascade") -> str:
        values = [r[part][key] for r in results if r.get(part) and r[part].get(key) is not None]
        return f"{sum(map(bool, values))}/{len(values)}"

    mean_share = np.mean([r["cascade"]["human_labeled_share"] for r in results]) if results else float("nan")
    mean_coverage = np.mean([coverage(r) for r in results]) if results else float("nan")
    budgets = sorted({r["params"].get("human_budget") for r in results}, key=lambda v: (v is not None, v))
    budget_note = ", ".join("none" if v is None else f"{v:,} images" for v in budgets)
    scans = sorted(
        {
            f"{r['params'].get('threshold_scan', 'nested')}, {r['params'].get('confidence', 0.95):.0%} per "
            + {"run": "run (spent over the iterations)", "threshold": "threshold"}[
                r["params"].get("confidence_scope", "threshold")
            ]
            for r in results
        }
    )
    versus_b = [
        r["cascade"]["eval_precision"] > r["single_round"]["precision"] for r in results if r.get("single_round")
    ]
    lines += [
        "",
        f"Runs: {n}. Against ground truth: positive-set precision >= {target_precision} in {share('precision_held')}; "
        f"negative-set false omission <= {target_fo} in {share('false_omission_held')}.",
        f"The stated guarantee (on what the model decided, one-sided bounds; threshold scan: {'; '.join(scans)}):"
        f" precision held in "
        f"{share('model_precision_held')}, false omission in {share('model_false_omission_held')}.",
        f"Audit intervals covered the true model-decided rate: precision {share('precision_covered', 'audit')}, "
        f"false omission {share('false_omission_covered', 'audit')}.",
        f"Mean share of the pool labeled by people: {mean_share:.1%}"
        f" (audit answers not included; human budget per run: {budget_note}); mean coverage {mean_coverage:.3f}."
        f" Cascade precision above baseline (b) at equal budget: {sum(versus_b)}/{len(versus_b)}.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        c = r["cascade"]
        ax.scatter(c["answers_per_image"], c["eval_precision"], color="C0")
        ax.annotate(r["category"], (c["answers_per_image"], c["eval_precision"]), fontsize=7)
        if r.get("single_round"):
            b = r["single_round"]
            ax.scatter(b["human_answers"] / b["pool"], b["precision"], color="C1", marker="x")
        if r.get("all_by_crowd"):
            a = r["all_by_crowd"]
            ax.scatter(a["human_answers"] / a["pool"], a["precision"], color="C2", marker="s")
    ax.axhline(target_precision, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("human answers per pool image")
    ax.set_ylabel("positive-set precision (ground truth)")
    ax.set_title("cascade (o) vs single round (x) vs all by crowd (s)")
    fig.tight_layout()
    fig.savefig(out / "precision-vs-effort.png", dpi=120)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
