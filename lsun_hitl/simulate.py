"""Predict the human effort before people are paid: the cascade run against a simulated crowd and any truth.

For a pool and a truth table (``lsun_hitl.truth``) covering all of it or a labeled part, ``simulate`` runs the
real cascade (the Prefect flow, scoring on Dask) once per category and seed, with a simulated crowd that
answers from the truth, and reports what people would label (images, answers, share of the pool), the
coverage, and precision / false omission against the truth, with their ranges over the seeds.

Each seed gets its own storage root under ``base`` (``seed=<k>/``) that shares the pool's images, manifest,
truth and input cache with the data root by symbolic links, so the pool is decoded once for every run; when
the truth covers only part of the pool, the runs' pool is that part (``pool/images.parquet`` written in the
seed's root). A remainder the run would ask an operator about is counted as going to people, and said so.

Running the cascade is the caller's (``run``: ``flows.runner.run_with_crowd`` runs the Prefect flow while a
simulated crowd answers), so this module stays free of the orchestrator.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cascade import funnels
from .config import CascadeParams
from .crowd import CrowdParams
from .evaluation import evaluate
from .ingest import read_pool
from .storage import Storage, clear_category, dataset_key, report_key
from .truth import read_truth

# runs one cascade under a storage root with a simulated crowd answering: (storage, category, params, crowd,
# dask_address) -> the run's summary (``Summary.to_dict()``)
Runner = Callable[[Storage, str, CascadeParams, CrowdParams, "str | None"], dict]

# cache: the pool's model inputs, decoded once for every run; seed-positives: what the user knows of each category
SHARED = ("images", "pool", "groundtruth", "cache", "seed-positives")


def run_root(
    base: str | Path, data: Storage, seed: int, covered: Sequence[str] | None = None, category: str = ""
) -> Storage:
    """A local storage root for ``seed`` that shares the data root's images, pool, truth and cache.

    With ``covered`` (URIs), the root is ``seed=<k>-part=<category>`` and its pool is the data pool's rows with
    those URIs, written in place of the link.
    """
    if not data.is_local:
        raise ValueError(f"simulate needs a local data root (the runs link to it); {data.url} is not one")
    root = Path(base) / (f"seed={seed}" if covered is None else f"seed={seed}-part={category}")
    root.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = root / name
        if name == "pool" and covered is not None:
            continue
        if not link.exists() and os.path.exists(os.path.join(data.root, name)):
            os.symlink(Path(data.root) / name, link)
    storage = Storage(str(root))
    if covered is not None:
        pool = read_pool(data)
        part = pool.filter(pc.is_in(pool.column("uri"), value_set=pa.array(list(covered))))
        storage.write_table(storage.path("pool/images.parquet"), part)
    return storage


def run_one(
    storage: Storage,
    category: str,
    params: CascadeParams,
    crowd: CrowdParams,
    run: Runner,
    dask_address: str | None = None,
) -> dict:
    """Run the cascade for ``category`` under ``storage`` with a simulated crowd (``run``); its figures against
    the truth."""
    started = time.time()
    summary = run(storage, category, params, crowd, dask_address)
    ev = evaluate(storage, category)
    row = {
        "category": category,
        "seed": params.seed,
        "pool": summary["pool"],
        "cascade": {
            **summary,
            **{f"eval_{k}": v for k, v in ev.to_dict().items() if k != "category"},
            "answers_per_image": summary["human_answers"] / summary["pool"],
            "precision_held": ev.precision >= params.target_precision,
            "false_omission_held": ev.false_omission <= params.target_false_omission,
            "model_precision_held": ev.model_precision is None or ev.model_precision >= params.target_precision,
            "model_false_omission_held": ev.model_false_omission is None
            or ev.model_false_omission <= params.target_false_omission,
            "wall_s": time.time() - started,
        },
        "params": params.to_dict(),
        "iterations": [f.to_dict() for f in funnels(storage, category)],
    }
    audit_path = storage.path(dataset_key(category, "audit.json"))
    if storage.exists(audit_path):
        a = storage.read_json(audit_path)
        for side, truth in (("precision", ev.model_precision), ("false_omission", ev.model_false_omission)):
            a[f"{side}_covered"] = (
                None if truth is None or a[side] is None else a[f"{side}_low"] <= truth <= a[f"{side}_high"]
            )
        row["audit"] = a
    return row


def simulate(
    data: Storage,
    base: str | Path,
    categories: Sequence[str],
    seeds: Sequence[int],
    params: CascadeParams,
    crowd: CrowdParams,
    run: Runner,
    *,
    out: str | Path | None = None,
    on_row: Callable[[dict], None] | None = None,
    dask_address: str | None = None,
) -> list[dict]:
    """One run per category and seed (see the module's docstring); their rows, in order.

    ``out``: a folder for each run's funnel plot (``<category>-seed<k>-funnel.png``). ``on_row`` is called
    with each row as its run finishes (to print progress).
    """
    from .cascade import preflight

    if params.large_remainder == "ask":  # nobody answers in a simulation: count it as going to people
        params = dataclasses.replace(params, large_remainder="people")
    pool_uris = set(read_pool(data, columns=["uri"]).column("uri").to_pylist())
    rows = []
    for category in categories:
        truth = read_truth(data, category)
        covered = pool_uris & set(truth)
        if not covered:
            raise ValueError(
                f"the truth for {category!r} covers none of the pool's images under {data.url}; its URIs must be "
                "the pool's (`lsun-hitl truth` lists coverage)"
            )
        part = None if len(covered) == len(pool_uris) else sorted(covered)
        for seed in seeds:
            run_params = dataclasses.replace(params, seed=seed)
            storage = run_root(base, data, seed, part, category)
            clear_category(storage, category)  # a new simulation of it, not the continuation of an earlier one
            preflight(storage, category, run_params, dask_address)
            row = run_one(storage, category, run_params, dataclasses.replace(crowd, seed=seed), run, dask_address)
            row["truth_coverage"] = len(covered) / len(pool_uris)
            if out is not None:
                plot = storage.path(report_key(category, "funnel.png"))
                if storage.exists(plot):
                    plots = Storage(str(out))
                    plots.write_bytes(plots.path(f"{category}-seed{seed}-funnel.png"), storage.read_bytes(plot))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}–{format(hi, fmt)}"


def table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table, one line per category, each figure's range over the seeds."""
    lines = [
        "| category | seeds | people labeled (images) | share of the pool | answers | coverage | precision |"
        " false omission | iterations | targets held | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for category in dict.fromkeys(r["category"] for r in rows):
        rs = [r for r in rows if r["category"] == category]
        c = [r["cascade"] for r in rs]

        def span(key: str, fmt: str, c: list[dict] = c) -> str:
            return _span([x[key] for x in c], fmt)

        coverage = _span([1 - x["eval_unresolved"] / r["pool"] for x, r in zip(c, rs, strict=True)], ".3f")
        held = sum(x["precision_held"] and x["false_omission_held"] for x in c)
        cells = [
            category,
            str(len(rs)),
            span("human_labeled_images", ","),
            span("human_labeled_share", ".1%"),
            span("human_answers", ","),
            coverage,
            span("eval_precision", ".4f"),
            span("eval_false_omission", ".4f"),
            span("iterations", "d"),
            f"{held}/{len(rs)}",
            span("wall_s", ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    share = np.mean([r["cascade"]["human_labeled_share"] for r in rows]) if rows else 0.0
    lines.append("")
    lines.append(f"Mean share of the pool labeled by people: {share:.1%} over {len(rows)} runs.")
    return "\n".join(lines)
