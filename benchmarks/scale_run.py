"""The whole cascade on a large pool, one category after another, as a user runs it; one report of every step.

    python benchmarks/scale_pool.py --root /data/scale-1m                              # 1,000,000 JPEGs
    lsun-hitl ingest --root /data/scale-1m --images /data/scale-1m/images/scale
    python benchmarks/scale_run.py --root /data/scale-1m --categories trouser shirt --out docs/benchmarks/scale-1m

Each category runs as ``lsun-hitl demo`` does (the embedded defaults: the local folder, a Dask LocalCluster,
Prefect's temporary server, the simulated crowd answering through the labeling service on loopback), in its
own process, with the options after ``--`` passed on (default: none, the project's defaults).
When a run stops with a remainder larger than its ``--large-remainder-share`` it asks an operator; this
script answers as one would, with ``lsun-hitl decide --remainder OPERATOR`` (``--operator``, default
``unresolved``).

Written to ``--out``: ``<category>.md`` (the funnel per iteration: human labels and decisions; the steps:
seconds, images decoded in the flow process and on the workers, read from the input cache, peak memory of
the flow process and of each worker), ``<category>-funnel.png``, and ``results.json``; the summary lines are
printed. Quality figures are against the pool's ground truth; on a pool derived from Fashion-MNIST every
image shares its source with ~14 others, so they flatter the model: the throughput figures are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lsun_hitl.cascade import funnels  # noqa: E402
from lsun_hitl.report import funnel_markdown  # noqa: E402
from lsun_hitl.steps import read_steps, steps_markdown  # noqa: E402
from lsun_hitl.storage import Storage, dataset_key, decision_key, report_key  # noqa: E402

DEFAULT_OPTIONS: list[str] = []  # the project's defaults: what a user runs


def operator(storage: Storage, root: str, category: str, answer: str, stop: threading.Event) -> None:
    """Answer the run's question about a large remainder with ``answer``, once it is asked."""
    path = storage.path(decision_key(category, "remainder"))
    while not stop.wait(2.0):
        if storage.exists(path) and storage.read_json(path).get("decision") is None:
            cmd = [sys.executable, "-m", "cli", "decide", "--root", root, "--category", category]
            subprocess.run([*cmd, "--remainder", answer], check=False)
            return


def run_category(root: str, category: str, options: list[str], answer: str) -> dict:
    """Run the demo for ``category`` in its own process; return its wall time and peak memory."""
    storage = Storage(root)
    stop = threading.Event()
    watcher = threading.Thread(target=operator, args=(storage, root, category, answer, stop), daemon=True)
    watcher.start()
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "cli", "demo", "--root", root, "--category", category, *options]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False)
    stop.set()
    watcher.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"the run of {category} failed (exit {proc.returncode})")
    return {
        "wall_s": time.perf_counter() - started,
        # the demo process and, the largest of them, its Dask workers (children reaped by it)
        "peak_rss_mb_any_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def report(storage: Storage, category: str, run: dict, out: Path) -> dict:
    demo = storage.read_json(storage.path(dataset_key(category, "demo.json")))
    summary, ev = demo["summary"], demo["evaluation"]
    fs = funnels(storage, category)
    steps = read_steps(storage, category)
    text = [
        f"# {category} on a pool of {summary['pool']:,} images",
        "",
        f"- wall time {run['wall_s']:,.0f} s; people labeled {summary['human_labeled_images']:,} images "
        f"({summary['human_labeled_share']:.2%} of the pool), {summary['human_answers']:,} answers; "
        f"stopped: {summary['stop_reason']}",
        f"- positive {summary['positive']:,}, negative {summary['negative']:,}, unresolved {summary['unresolved']:,}",
        f"- against the ground truth: precision {ev['precision']:.4f}, false omission {ev['false_omission']:.4f}, "
        f"recall {ev['recall']:.4f}; model-decided only: precision {ev['model_precision']}, false omission "
        f"{ev['model_false_omission']}",
        "",
        funnel_markdown(category, fs),
        "",
        steps_markdown(category, steps),
    ]
    (out / f"{category}.md").write_text("\n".join(text))
    png = storage.path(report_key(category, "funnel.png"))
    if storage.exists(png):
        (out / f"{category}-funnel.png").write_bytes(storage.read_bytes(png))
    return {"category": category, **run, "summary": summary, "evaluation": ev, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else list(DEFAULT_OPTIONS)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a storage root whose pool is ingested (scale_pool.py + ingest)")
    ap.add_argument("--categories", nargs="+", default=["trouser", "shirt"])
    ap.add_argument("--out", required=True, help="folder for the report")
    ap.add_argument("--operator", choices=("people", "unresolved"), default="unresolved")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    storage = Storage(args.root)
    if not storage.exists(storage.path("pool/images.parquet")):
        print(f"scale_run: error: no pool under {args.root}; run lsun-hitl ingest first", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    for category in args.categories:
        run = run_category(args.root, category, extra, args.operator)
        row = report(storage, category, run, out)
        results = [r for r in results if r["category"] != category] + [row]
        results_path.write_text(json.dumps(results, indent=1))
        s, ev = row["summary"], row["evaluation"]
        print(
            f"{category}: {s['pool']:,} images, {run['wall_s']:,.0f} s; people {s['human_labeled_share']:.2%}; "
            f"precision {ev['precision']:.4f}, false omission {ev['false_omission']:.4f}, unresolved "
            f"{s['unresolved']:,}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
