"""Many categories at once on the production path: a soak of the deployed cascade.

Starts, each as its own process as in production: a ``prefect server`` (SQLite, or PostgreSQL from Debian's
packages with ``--database postgres``), a Dask scheduler and workers from the ``dask`` CLI, one labeling service
(``lsun-hitl serve``, which resumes runs when their labels are complete) and the simulated crowd answering
through it (``lsun-hitl crowd --service``). The categories of ``deployments/categories.toml`` are applied to a
process work pool (``python -m deployments apply --pool``; their own settings kept, the shared defaults made
small enough for one machine) and run by ``prefect worker start``; every run starts at once. A Prefect global
concurrency limit (``score_limit``) bounds how many categories score at once on the shared cluster.

While they run it records each run's states, how many flow-run processes the worker holds while every open
run is suspended (none, when waiting holds no process), how many categories score at once, the peak memory of
each part, and Prefect API errors (HTTP 5xx or errors in the server's and worker's logs). With ``--screenshots``
Chromium (Playwright) photographs the Prefect UI: the runs list, a suspended run's resume form, the
``lsun-status`` artifact. At the end each category's dataset is compared with the ground truth.

    python benchmarks/soak.py                                  # 5 categories, SQLite, 10,000 images
    python benchmarks/soak.py --database postgres --screenshots docs/soak

Prints a table and writes ``<work>/soak.json``. Not a CI test (minutes of CPU per category); the CI-sized
version is ``tests/test_deployments.py::test_categories_on_a_process_work_pool_suspend_resume_and_take_turns_scoring``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
SOAK_PARAMS: dict[str, Any] = {  # small enough for five categories on two cores; the targets stay the defaults'
    "train_sample": 500,
    "calibration_sample": 800,
    "first_calibration_sample": 1200,
    "allow_small_pool": True,
    "stop_unlabeled": 500,
    "max_iterations": 3,
    "large_remainder": "people",
    "audit_sample": 0,
    "label_poll_s": 2,
    "score_partition": 2500,
    "model": {"image_size": 32, "epochs": 4, "batch_size": 64, "threads": 1},
}
API_ERROR = re.compile(r'" 5\d\d|\| ERROR |Traceback|database is locked')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Processes:
    """The soak's long-lived processes, each in its own session (stopped as a group), logs under ``logs``."""

    logs: Path
    running: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.running[name] = proc
        return proc

    def stop(self) -> None:
        for proc in self.running.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def rss(self) -> dict[str, int]:
        """Resident memory of each process with its children (the worker's flow runs count as the worker's)."""
        out = {}
        for name, proc in self.running.items():
            try:
                p = psutil.Process(proc.pid)
                out[name] = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
            except psutil.NoSuchProcess:
                out[name] = 0
        return out


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    """Run a set-up command; on failure stop the soak with its output (not a traceback of this script)."""
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"soak: {' '.join(argv[:4])} ... failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def wait_http(url: str, timeout: float, what: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"soak: {what} did not answer at {url} within {timeout:.0f} s (see its log)")


def start_postgres(work: Path, procs: Processes, env: dict[str, str]) -> str:
    """A PostgreSQL cluster of Debian's packages under ``work`` (run as user postgres); its database URL."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        raise SystemExit("soak: --database postgres needs Debian's postgresql package (apt-get install postgresql)")
    pg, data, port = bins[-1], work / "pg", free_port()
    data.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(data, "postgres")
        shutil.chown(work, "postgres")
    run([*as_postgres, str(pg / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"], env)
    procs.start(
        "postgres",
        [*as_postgres, str(pg / "postgres"), "-D", str(data), "-p", str(port), "-k", "/tmp", "-h", "127.0.0.1"],
        env,
    )
    deadline = time.monotonic() + 60
    while subprocess.run([str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("soak: PostgreSQL did not start (see logs/postgres.log)")
        time.sleep(0.5)
    run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"], env)
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def soak_config(source: Path, categories: list[str] | None, root: str, dask: str, limit: str) -> tuple[str, list[str]]:
    """``source`` (deployments/categories.toml) with the shared defaults pointed at the soak's root, cluster and
    concurrency limit and made small (each category's own table kept); the TOML text and its categories."""
    config = tomllib.loads(source.read_text())
    chosen = categories or list(config["categories"])
    unknown = set(chosen) - set(config["categories"])
    if unknown:
        raise SystemExit(f"soak: {sorted(unknown)} not in {source}; add a [categories.<name>] table or drop them")
    defaults = dict(config.get("defaults", {}))
    defaults.update(root=root, dask_address=dask)
    defaults.pop("cron", None)  # started by the soak, not by a schedule
    params = {**defaults.pop("params", {}), **SOAK_PARAMS, "score_limit": limit}
    lines = ["[defaults]", *(f"{k} = {toml_value(v)}" for k, v in defaults.items()), "[defaults.params]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in params.items()]
    for c in chosen:
        lines.append(f"[categories.{c}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in config["categories"][c].items() if k != "cron"]
    return "\n".join(lines) + "\n", chosen


def screenshot(ui: str, path: Path, *, click: str | None = None) -> None:
    """Photograph a Prefect UI page in Debian's Chromium (headless); ``click`` a button first."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(ui, wait_until="networkidle", timeout=60_000)
        if click:
            page.get_by_role("button", name=click).first.click()
            page.wait_for_timeout(2_000)
        page.wait_for_timeout(1_000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/lsun-soak", help="folder for everything (emptied first)")
    ap.add_argument("--config", default=str(REPO / "deployments" / "categories.toml"))
    ap.add_argument("--categories", nargs="+", help="a subset of the config's categories (default: all of them)")
    ap.add_argument("--limit", type=int, default=10_000, help="Fashion-MNIST images in the pool")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--dask-workers", type=int, default=2)
    ap.add_argument("--score-limit", type=int, default=2, help="slots of the scoring concurrency limit")
    ap.add_argument("--timeout-s", type=int, default=3600)
    ap.add_argument("--screenshots", help="folder for the Prefect UI's screenshots (none: no browser)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    procs = Processes(work / "logs")
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still stop every process
    try:
        return soak(args, work, procs, env, started)
    finally:
        procs.stop()


def soak(args: argparse.Namespace, work: Path, procs: Processes, env: dict[str, str], started: float) -> int:
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.storage import Storage

    # -- Prefect server, its database
    if args.database == "postgres":
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = start_postgres(work, procs, env)
    else:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{work / 'prefect.db'}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env["PREFECT_UI_API_URL"] = api  # the UI's own calls (its default is port 4200)
    procs.start(
        "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env
    )
    env["PREFECT_API_URL"] = api
    os.environ.update(PREFECT_API_URL=api)
    wait_http(f"{api}/health", 120, "the Prefect server")
    # -- Dask from its CLI
    sched = free_port()
    procs.start(
        "dask-scheduler",
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sched), "--no-dashboard"],
        env,
    )
    dask = f"tcp://127.0.0.1:{sched}"
    for w in range(args.dask_workers):
        procs.start(
            f"dask-worker-{w}",
            [str(BIN / "dask"), "worker", dask, "--nthreads", "1", "--memory-limit", "4GiB", "--no-dashboard"],
            env,
        )
    # -- the pool
    root = work / "root"
    storage = Storage(str(root))
    t0 = time.time()
    prefix = import_fashion_mnist(storage, limit=args.limit, seed=0)
    run([str(BIN / "lsun-hitl"), "ingest", "--root", str(root), "--images", prefix, "--dask-address", dask], env)
    pool_s = time.time() - t0
    # -- deployments on a process work pool, a worker, the scoring limit
    limit = "lsun-score"
    text, categories = soak_config(Path(args.config), args.categories, str(root), dask, limit)
    (work / "categories.toml").write_text(text)
    prefect = str(BIN / "prefect")
    run([prefect, "gcl", "create", limit, "--limit", str(args.score_limit)], env)
    run([prefect, "work-pool", "create", "soak", "--type", "process"], env)
    apply = [sys.executable, "-m", "deployments", "apply", "--config", str(work / "categories.toml"), "--pool", "soak"]
    run(apply, env, cwd=work)
    worker = procs.start(
        "prefect-worker",
        # no --limit: a run resumed while its suspended process is still exiting makes a limited worker crash
        # ("this borrower is already holding one of this CapacityLimiter's tokens", Prefect issue #16806)
        [prefect, "worker", "start", "--pool", "soak"],
        env | {"PREFECT_WORKER_QUERY_SECONDS": "3", "PREFECT_WORKER_PREFETCH_SECONDS": "3"},
        work,
    )
    # -- the labeling service, gold, the crowd through the service
    service_port = free_port()
    service = f"http://127.0.0.1:{service_port}"
    for c in categories:
        run([str(BIN / "lsun-hitl"), "gold", "--root", str(root), "--category", c, "--from-truth", "60"], env)
    procs.start(
        "service",
        [
            str(BIN / "lsun-hitl"),
            "serve",
            "--root",
            str(root),
            "--port",
            str(service_port),
            "--public-url",
            f"{service}/",
        ],
        env,
    )
    wait_http(f"{service}/", 60, "the labeling service")
    procs.start(
        "crowd",
        [str(BIN / "lsun-hitl"), "crowd", "--root", str(root), "--service", service, "--category", *categories],
        env,
    )
    print(
        f"soak: {len(categories)} categories ({', '.join(categories)}) on {args.limit:,} images; Prefect UI "
        f"http://127.0.0.1:{port}/ ({args.database}), Dask {dask}, labeling service {service}/",
        flush=True,
    )
    return watch(args, work, procs, worker, storage, categories, limit, port, started, pool_s)


def watch(
    args: argparse.Namespace,
    work: Path,
    procs: Processes,
    worker: subprocess.Popen,
    storage: Any,
    categories: list[str],
    limit: str,
    port: int,
    started: float,
    pool_s: float,
) -> int:
    from prefect import get_client
    from prefect.deployments import run_deployment

    from lsun_hitl.evaluation import evaluate
    from lsun_hitl.status import category_status

    runs = {c: str(run_deployment(f"lsun-cascade/lsun-{c}", timeout=0).id) for c in categories}
    t_runs = time.time()
    peak: dict[str, int] = {}
    suspended_since: dict[str, float] = {}  # run id -> when it was last seen entering Suspended
    lingered = [0.0]  # the longest a suspended run's process was still alive after its suspension was seen
    slots_peak, suspensions = 0, dict.fromkeys(categories, 0)
    seen: dict[str, list[str]] = {c: [] for c in categories}
    shots = Path(args.screenshots) if args.screenshots else None
    shot_taken: set[str] = set()
    ui = f"http://127.0.0.1:{port}"
    last_print = 0.0
    while True:
        with get_client(sync_client=True) as client:
            states = {c: client.read_flow_run(r).state for c, r in runs.items()}
            slots_peak = max(slots_peak, client.read_global_concurrency_limit_by_name(limit).active_slots)
        for c, s in states.items():
            name = s.name if s else "?"
            if not seen[c] or seen[c][-1] != name:
                seen[c].append(name)
                suspensions[c] += name == "Suspended"
                if name == "Suspended":
                    suspended_since[runs[c]] = time.time()
            if name != "Suspended":
                suspended_since.pop(runs[c], None)
        for name, rss in procs.rss().items():
            peak[name] = max(peak.get(name, 0), rss)
        for run_id in flow_run_processes(worker):
            if run_id in suspended_since:
                lingered[0] = max(lingered[0], time.time() - suspended_since[run_id])
        if shots is not None:
            take_screenshots(shots, shot_taken, ui, runs, states)
        if time.time() - last_print > 30:
            last_print = time.time()
            rows = [category_status(storage, c) for c in categories]  # reads storage: only when printing
            print(
                f"[{time.time() - started:6.0f} s] "
                + ", ".join(
                    f"{c}: {s.name if s else '?'} it{r.iteration}"
                    for (c, s), r in zip(states.items(), rows, strict=True)
                ),
                flush=True,
            )
        if all(s is not None and s.is_final() for s in states.values()):
            break
        if time.time() - t_runs > args.timeout_s:
            print(f"soak: runs not finished after {args.timeout_s} s", flush=True)
            break
        time.sleep(2)
    wall = time.time() - t_runs
    time.sleep(3)  # the last artifact updates
    if shots is not None:
        take_screenshots(shots, shot_taken, ui, runs, states, final=True)
    errors = {
        name: sum(bool(API_ERROR.search(line)) for line in (work / "logs" / f"{name}.log").open(errors="replace"))
        for name in ("prefect-server", "prefect-worker")
    }
    scoring_peak, spans = most_at_once(storage, categories)
    figures = []
    for c in categories:
        row = category_status(storage, c)
        ok = states[c] is not None and states[c].is_completed()
        e = evaluate(storage, c) if ok else None
        figures.append(
            {
                "category": c,
                "state": states[c].name if states[c] else "?",
                "states": seen[c],
                "suspended": suspensions[c],
                "iterations": row.iteration,
                "human_labels": row.human_labeled,
                "labeled_share": row.human_labeled / max(1, args.limit),
                "precision": e.precision if e else None,
                "false_omission": e.false_omission if e else None,
                "recall": e.recall if e else None,
            }
        )
    result = {
        "categories": len(categories),
        "pool": args.limit,
        "database": args.database,
        "dask_workers": args.dask_workers,
        "score_limit": args.score_limit,
        "pool_s": pool_s,
        "wall_s": wall,
        "peak_rss_mb": {k: round(v / 2**20) for k, v in peak.items()},
        "suspended_process_lingered_s": round(lingered[0], 1),
        "suspensions": sum(suspensions.values()),
        "most_categories_scoring_at_once": scoring_peak,
        "scoring_steps": spans,
        "most_limit_slots_taken": slots_peak,
        "api_errors": errors,
        "runs": figures,
    }
    (work / "soak.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0 if all(f["state"] == "Completed" for f in figures) else 1


def flow_run_processes(worker: subprocess.Popen) -> list[str]:
    """The flow run ids of the processes the worker runs now (each gets PREFECT__FLOW_RUN_ID in its environment)."""
    ids = []
    for p in psutil.Process(worker.pid).children(recursive=True):
        try:
            run_id = p.environ().get("PREFECT__FLOW_RUN_ID")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if run_id:
            ids.append(run_id)
    return ids


def most_at_once(storage: Any, categories: list[str]) -> tuple[int, int]:
    """The most scoring steps that held a slot of the limit at once (each step records when it took and gave
    back its slot); how many steps scored."""
    from lsun_hitl.steps import read_steps

    edges = sorted(
        (t, d)
        for c in categories
        for s in read_steps(storage, c)
        if s["step"] == "score" and "slot_taken" in s
        for t, d in ((s["slot_taken"], 1), (s["slot_given"], -1))
    )
    now = most = 0
    for _, d in edges:  # at equal times an end (-1) sorts before a start: touching spans do not overlap
        now += d
        most = max(most, now)
    return most, len(edges) // 2


def take_screenshots(
    shots: Path, taken: set[str], ui: str, runs: dict[str, str], states: dict[str, Any], final: bool = False
) -> None:
    """The runs list and a suspended run's resume form once three runs are suspended; the status artifact at
    the end. A screenshot that fails is reported, not fatal (the soak's figures matter more)."""
    shots.mkdir(parents=True, exist_ok=True)
    suspended = [c for c, s in states.items() if s is not None and s.name == "Suspended"]
    todo = []
    if "runs" not in taken and len(suspended) >= min(3, len(runs)):
        todo.append(("runs", f"{ui}/runs", None))
        todo.append(("resume-form", f"{ui}/runs/flow-run/{runs[suspended[0]]}", "Resume"))
    if final and "status" not in taken:
        todo.append(("status", f"{ui}/artifacts/artifact/{latest_artifact_id('lsun-status')}", None))
    for name, url, click in todo:
        taken.add(name)
        try:
            screenshot(url, shots / f"prefect-{name}.png", click=click)
            print(f"soak: screenshot {shots / f'prefect-{name}.png'}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported; the soak goes on
            print(f"soak: screenshot of {url} failed: {exc}", flush=True)


def latest_artifact_id(key: str) -> str:
    """The id of the newest artifact under ``key`` (its page shows the table; the key's page, its history)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_artifacts(  # every argument set: Prefect 3.8's sync client sends nulls otherwise
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
            offset=0,
        )
    return str(latest.id)


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\n{r['categories']} categories, {r['pool']:,} images, Prefect on {r['database']}, "
        f"{r['dask_workers']} Dask workers, scoring limit {r['score_limit']}: {r['wall_s']:.0f} s wall "
        f"(pool built in {r['pool_s']:.0f} s)"
    )
    print(
        "| category | final state | times suspended | iterations | human labels (share of pool) | precision "
        "| false omission | recall |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    for f in r["runs"]:
        print(
            f"| {f['category']} | {f['state']} | {f['suspended']} | {f['iterations']} | {f['human_labels']:,} "
            f"({f['labeled_share']:.1%}) | {fmt(f['precision'])} | {fmt(f['false_omission'])} | "
            f"{fmt(f['recall'])} |"
        )
    print(f"\npeak RSS MB (with children): {r['peak_rss_mb']}")
    print(
        f"suspended runs: {r['suspensions']}; the longest a suspended run's process lived on after the suspension "
        f"was seen: {r['suspended_process_lingered_s']} s (then none: waiting holds no process)"
    )
    print(
        f"most categories scoring at once: {r['most_categories_scoring_at_once']}; most slots of the limit taken: "
        f"{r['most_limit_slots_taken']} of {r['score_limit']}"
    )
    print(f"Prefect API errors (5xx, ERROR or tracebacks in the logs): {r['api_errors']}")


if __name__ == "__main__":
    raise SystemExit(main())
