"""Benchmark: orchestration overhead of one cascade iteration (everything but people, training, scoring).

    python benchmarks/orchestration.py                # 3,000 Fashion-MNIST images, one iteration
    python benchmarks/orchestration.py --images 20000

Runs the real flow (Prefect's local server, a Dask LocalCluster, a local storage root) for one
iteration with a simulated crowd that answers at once, then reads the run back from the Prefect API:

    overhead = flow run time - time paused for people - train task - score task

What is left is Prefect (task runs, states, result persistence, artifacts), storage reads and writes,
sampling, aggregation, calibration, the split and the plots. The Prefect server's start is excluded
(once per process, not per iteration); the Dask cluster's start is inside the score task.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.runner import run_cascade, simulated_crowd  # noqa: E402
from lsun_hitl.config import CascadeParams, ModelParams  # noqa: E402
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd  # noqa: E402
from lsun_hitl.fashion_mnist import import_fashion_mnist  # noqa: E402
from lsun_hitl.ingest import build_pool  # noqa: E402
from lsun_hitl.labels import list_requests  # noqa: E402
from lsun_hitl.storage import Storage  # noqa: E402
from lsun_hitl.truth import read_truth  # noqa: E402

CATEGORY = "trouser"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    args = ap.parse_args(argv)
    storage = Storage(tempfile.mkdtemp(prefix="bench-orchestration-"))
    build_pool(storage, import_fashion_mnist(storage, limit=args.images, seed=0))
    params = CascadeParams(
        train_sample=500,
        calibration_sample=600,
        max_sample_fraction=0.3,
        max_iterations=1,
        remainder="unresolved",
        allow_small_pool=True,
        label_poll_s=1,
        score_partition=1000,
        model=ModelParams(image_size=32, epochs=1, batch_size=64),
    )
    crowd = SimulatedCrowd(read_truth(storage, CATEGORY), CrowdParams(seed=0))
    with simulated_crowd(storage, CATEGORY, crowd, poll_s=0.2):
        wall = time.perf_counter()
        run_cascade(CATEGORY, storage.url, params=params)
        wall = time.perf_counter() - wall

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    run_id = list_requests(storage, CATEGORY)[0].flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        states = sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            limit=200,
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    paused = 0.0
    for state, nxt in zip(states, states[1:], strict=False):
        if state.is_paused():
            paused += (nxt.timestamp - state.timestamp).total_seconds()
    by_task: dict[str, float] = defaultdict(float)
    for t in tasks:
        if t.start_time and t.end_time:
            by_task[t.name.rsplit("-", 1)[0]] += (t.end_time - t.start_time).total_seconds()
    run_s = (run.end_time - run.start_time).total_seconds()
    heavy = by_task.get("train_model", 0.0) + by_task.get("score_pool", 0.0)
    overhead = run_s - paused - heavy
    print(f"\none iteration over {args.images:,} images (flow run {run_id})")
    print("| part | seconds |\n|---|---|")
    print(f"| flow run (start to end) | {run_s:.1f} |\n| paused for people | {paused:.1f} |")
    for name, s in sorted(by_task.items(), key=lambda kv: -kv[1]):
        print(f"| task {name} | {s:.2f} |")
    print(f"| **overhead** (run - paused - train - score) | **{overhead:.1f}** |")
    print(f"process wall time incl. Prefect server start: {wall:.1f} s; goal: overhead <= 10 s per iteration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
