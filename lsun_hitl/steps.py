"""Per-step figures of a cascade run: wall time, images decoded, peak memory of the flow process and workers.

At scale the cost is reading and decoding images, not the model, so each step records what it decoded
beside its time. ``record`` wraps one step of one iteration and writes
``reports/<category>/steps/iteration=<k>/<step>.json`` the first time the step runs (a step that finds
its output stored and returns at once does not overwrite the figures of the run that did the work).
The scoring step adds what its Dask workers decoded, read from the input cache, and their peak memory
(``scores/<c>/iteration=<k>/stats.json``). Peak memory is the process's high-water mark (``VmHWM``),
reset at the start of each step where Linux allows it.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from .storage import Storage, report_key, scores_dir

_lock = threading.Lock()
_decoded = 0
_extra: ContextVar[dict | None] = ContextVar("step_extra_figures", default=None)


def add_figures(**figures: float) -> None:
    """Add ``figures`` to the step ``record`` is timing in this context (none: nothing to add them to). The
    scoring step adds when it took and gave back its slot of the scoring concurrency limit."""
    extra = _extra.get()
    if extra is not None:
        extra.update(figures)


def count_decoded(n: int) -> None:
    """Count ``n`` images decoded in this process (``model.decode_many`` calls it)."""
    global _decoded
    with _lock:
        _decoded += n


def decoded() -> int:
    """Images decoded in this process so far."""
    return _decoded


def reset_peak_rss() -> None:
    """Reset this process's peak-memory mark (Linux: ``/proc/self/clear_refs``); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (or since it started), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


CURRENT_STEP = "current-step.json"  # reports/<category>/current-step.json: the step a run started last


# fault injection: seconds a run waits after marking each step, so a chaos driver watching the mark can kill
# the run inside steps that take milliseconds (``benchmarks/chaos.py``); unset in normal runs
STEP_PAUSE_ENV = "LSUN_HITL_STEP_PAUSE_S"


def mark_step(storage: Storage, category: str, iteration: int, step: str) -> None:
    """Record that a run started ``step`` of ``iteration`` now (what ``lsun-hitl status`` shows while it works)."""
    storage.write_json(
        storage.path(report_key(category, CURRENT_STEP)), {"iteration": iteration, "step": step, "since": time.time()}
    )
    pause = float(os.environ.get(STEP_PAUSE_ENV) or 0)
    if pause > 0:
        time.sleep(pause)


def step_key(category: str, iteration: int, step: str) -> str:
    return report_key(category, f"steps/iteration={iteration}/{step}.json")


@contextmanager
def record(storage: Storage, category: str, iteration: int, step: str) -> Iterator[None]:
    """Time ``step`` of ``iteration`` and store its figures (once: the first run of the step keeps them)."""
    path = storage.path(step_key(category, iteration, step))
    if storage.exists(path):
        yield
        return
    mark_step(storage, category, iteration, step)
    reset_peak_rss()
    before, started = decoded(), time.perf_counter()
    extra: dict = {}
    token = _extra.set(extra)
    try:
        yield
    finally:
        _extra.reset(token)
    figures: dict = {
        "iteration": iteration,
        "step": step,
        "started": round(time.time() - (time.perf_counter() - started), 3),  # epoch seconds
        "seconds": round(time.perf_counter() - started, 3),
        "flow_decoded": decoded() - before,
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "pid": os.getpid(),
        **extra,
    }
    stats = storage.path(scores_dir(category, iteration), "stats.json")
    if step == "score" and storage.exists(stats):
        figures["workers"] = {k: v for k, v in storage.read_json(stats).items() if k != "part_rows"}
    storage.write_json(path, figures)


def read_steps(storage: Storage, category: str) -> list[dict]:
    """Every recorded step of ``category``, by iteration and in the order the steps ran."""
    paths = storage.glob(storage.path(report_key(category, "steps/iteration=*/*.json")))
    rows = [storage.read_json(p) for p in paths]
    order = {s: i for i, s in enumerate(STEP_ORDER)}
    return sorted(rows, key=lambda r: (r["iteration"], order.get(r["step"], len(order))))


STEP_ORDER = ("sample", "publish", "train", "score", "recheck", "calibrate", "split", "remainder", "finish")


def steps_markdown(category: str, rows: list[dict]) -> str:
    """The steps as a Markdown table: seconds, images decoded (flow process and workers), peak memory."""
    lines = [
        f"### {category}: steps",
        "",
        "| iteration | step | seconds | decoded (flow) | decoded (workers) | from cache | flow peak MB |"
        " worker peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r.get("workers") or {}
        peaks = list((w.get("worker_peak_rss_mb") or {}).values())
        lines.append(
            f"| {r['iteration']} | {r['step']} | {r['seconds']:,.1f} | {r['flow_decoded']:,} | "
            f"{w.get('decoded', 0):,} | {w.get('from_cache', 0):,} | {r['flow_peak_rss_mb']:,.0f} | "
            + (f"{np.max(peaks):,.0f} ({len(peaks)} workers)" if peaks else "-")
            + " |"
        )
    return "\n".join(lines) + "\n"
