"""Chaos over a whole run (issue 28): many SIGKILLs, on every part, while people keep labeling.

    python benchmarks/chaos.py --kills 30 --out docs/benchmarks/chaos.json      # ~10-15 min on 2 cores
    python benchmarks/chaos.py --kills 6 --limit 1500                            # what the test suite runs

One category's cascade (several iterations, a few thousand Fashion-MNIST images) runs from the command line
as in production: ``prefect server start`` (SQLite), ``dask scheduler`` and two ``dask worker`` processes,
``lsun-hitl serve`` (the labeling service), ``lsun-hitl crowd --service`` (simulated people answering through
it, logging every submission the service accepted) and ``lsun-hitl run --dask-address``. A seeded schedule
SIGKILLs the flow process, a Dask worker, the labeling service or the Prefect server at random moments, and
at first sight the flow in each step of the loop, a worker while it scores, the service and the Prefect
server while the run waits for people (``REQUIRED_HITS``; the flow waits
``--step-pause`` seconds at the start of each step, ``LSUN_HITL_STEP_PAUSE_S``, or steps that take
milliseconds could never be seen); a supervisor restarts each as a process manager would; the crowd is never
killed (it stands for people).

At the end it checks:

- the run finished, and its results equal an uninterrupted run's given the same answers: the cascade runs
  again over a copy of the pool while ``lsun-hitl crowd --replay-from`` answers each request with the chaos
  run's stored answers (``integrity.result_files``: pool, samples, models, scores, calibration, aggregated
  labels, manifests, dataset);
- every submission the service accepted is stored once, whole (``integrity.vote_audit``);
- no temporary or unreadable file is left (``integrity.temporary_files``, ``integrity.unreadable_files``);
- no image was asked of people twice (``integrity.asked_twice``).

The labeling service asks one answer per image (``--labels-per-image 1``): with more, a run takes a request
once each image has a decisive answer while more answers may still arrive, so which answers a request's
labels were made from depends on timing, and no replay can repeat that (README, "Reproducibility").
Prints the kill log's summary and the audit; ``--out`` writes everything as JSON. Exit status 1 if a check
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.soak import free_port, wait_http  # noqa: E402

BIN = Path(sys.executable).parent
LOOP_STEPS = ("sample", "publish", "wait for labels", "train", "score", "recheck", "calibrate", "split")
TARGETS = {"flow": 0.4, "dask-worker": 0.2, "service": 0.2, "prefect-server": 0.2}  # shares of the kills
KILLABLE = ["flow", "dask-worker", "dask-worker-2", "service", "prefect-server"]
# kills the full run must deal: the flow in every step of the loop, a worker while it scores, the labeling
# service and the Prefect server while the run waits for people
REQUIRED_HITS = (
    *(("flow", step) for step in LOOP_STEPS),
    ("dask-worker", "score"),
    ("service", "wait for labels"),
    ("prefect-server", "wait for labels"),
)


@dataclass
class Component:
    """One supervised process: how to start it, and its restarts."""

    name: str
    argv: list[str]
    restart_delay: float
    proc: subprocess.Popen | None = None
    starts: int = 0
    started_at: float = 0.0  # wall clock of the last start
    done: bool = False  # the flow: exited 0


@dataclass
class Supervisor:
    """Starts each component in its own session (killed as a group), restarts what died."""

    work: Path
    env: dict[str, str]
    parts: dict[str, Component] = field(default_factory=dict)

    def add(self, name: str, argv: list[str], restart_delay: float = 1.0) -> Component:
        self.parts[name] = Component(name, argv, restart_delay)
        return self.start(name)

    def start(self, name: str) -> Component:
        c = self.parts[name]
        log = open(self.work / f"{name}.log", "a")  # noqa: SIM115 - handed to the process
        log.write(f"\n==== start {c.starts + 1} at {time.strftime('%H:%M:%S')}\n")
        log.flush()
        c.proc = subprocess.Popen(
            c.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work
        )
        c.starts += 1
        c.started_at = time.time()
        return c

    def alive(self, name: str) -> bool:
        c = self.parts[name]
        return c.proc is not None and c.proc.poll() is None

    def kill(self, name: str) -> None:
        c = self.parts[name]
        if c.proc is not None and c.proc.poll() is None:
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait(30)

    def stop_all(self) -> None:
        for c in self.parts.values():
            if c.proc is not None and c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGTERM)
                    c.proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(c.proc.pid, signal.SIGKILL)


def current_step(storage, category: str) -> tuple[int, str, float] | None:
    """(iteration, step, seconds since it started) the run started last, "wait for labels" while its latest
    request is not taken."""
    from lsun_hitl.labels import list_requests, was_taken
    from lsun_hitl.steps import CURRENT_STEP
    from lsun_hitl.storage import report_key

    path = storage.path(report_key(category, CURRENT_STEP))
    try:
        mark = storage.read_json(path)
        requests = list_requests(storage, category)
    except (FileNotFoundError, json.JSONDecodeError, OSError, ValueError):
        return None
    step = mark["step"]
    if step in ("publish", "recheck") and requests and not was_taken(storage, category, requests[-1].request_id):
        latest = requests[-1].request_id
        if latest.startswith(f"iteration-{mark['iteration']}"):
            step = "wait for labels"
    return int(mark["iteration"]), step, time.time() - float(mark["since"])


def run_flags(args: argparse.Namespace) -> list[str]:
    """The cascade's settings: small samples, a hard category, at least three iterations, the remainder to
    people without asking (no operator here)."""
    return [
        "--train-sample", "300", "--calibration-sample", "400", "--first-calibration-sample", "400",
        "--max-sample-fraction", "0.3", "--target-precision", "0.9", "--target-false-omission", "0.05",
        "--max-iterations", str(args.iterations),
        "--stop-unlabeled", "50", "--no-stop-when-cheaper", "--large-remainder", "people", "--allow-small-pool",
        "--label-poll-s", "1", "--label-timeout", "1800", "--score-partition", "200", "--score-batch", "100",
        "--image-size", "32", "--epochs", "3", "--train-batch-size", "64", "--seed", str(args.seed),
    ]  # fmt: skip


def crowd_flags(args: argparse.Namespace) -> list[str]:
    """Careful simulated people (2% wrong, no spammers): with one answer an image, as the service asks here,
    people's labels are what calibration holds the model to, and a noisier crowd would leave the model nothing
    it could certify, so every image would go to people and the split would decide nothing."""
    return ["--seed", str(args.seed), "--accuracy", "0.98", "--spammer-share", "0"]


def chaos(args: argparse.Namespace, work: Path) -> dict:
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.steps import STEP_PAUSE_ENV
    from lsun_hitl.storage import Storage

    rng = random.Random(args.seed)
    env = os.environ | {
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        STEP_PAUSE_ENV: str(args.step_pause),  # steps that take milliseconds last long enough to be hit
    }
    port, sched, service_port = free_port(), free_port(), free_port()
    api, dask, service = f"http://127.0.0.1:{port}/api", f"tcp://127.0.0.1:{sched}", f"http://127.0.0.1:{service_port}"
    env["PREFECT_API_URL"] = api
    sup = Supervisor(work, env)
    lsun = str(BIN / "lsun-hitl")
    sup.add("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)])
    dask_cmd = [str(BIN / "dask")]
    sup.add("dask-scheduler", [*dask_cmd, "scheduler", "--host", "127.0.0.1", "--port", str(sched), "--no-dashboard"])
    worker = [*dask_cmd, "worker", dask, "--nthreads", "1", "--memory-limit", "3GiB", "--no-dashboard", "--no-nanny"]
    sup.add("dask-worker", worker)
    sup.add("dask-worker-2", worker)
    root = work / "root"
    storage = Storage(str(root))
    prefix = import_fashion_mnist(storage, limit=args.limit, seed=args.seed)
    done = subprocess.run([lsun, "ingest", "--root", str(root), "--images", prefix], env=env, capture_output=True)
    if done.returncode:
        raise SystemExit(f"chaos: ingest failed: {done.stdout[-2000:]!r} {done.stderr[-2000:]!r}")
    wait_http(f"{api}/health", 120, "the Prefect server")
    serve = [lsun, "serve", "--root", str(root), "--port", str(service_port), "--public-url", f"{service}/"]
    sup.add("service", [*serve, "--labels-per-image", "1", "--max-labels-per-image", "2", "--gold-rate", "0"])
    wait_http(f"{service}/", 60, "the labeling service")
    accepted = work / "accepted.jsonl"
    crowd = [lsun, "crowd", "--root", str(root), "--service", service, "--category", args.category]
    sup.add("crowd", [*crowd, *crowd_flags(args), "--accepted-log", str(accepted)])
    run = [lsun, "run", "--root", str(root), "--category", args.category, "--dask-address", dask, *run_flags(args)]
    sup.add("flow", run, restart_delay=2.0)
    print(f"chaos: {args.category} on {args.limit:,} images, {args.kills} kills planned; logs in {work}", flush=True)

    kills: list[dict] = []
    hit: set[tuple[str, str]] = set()  # (target, step) pairs killed
    flow_killed_at: set[tuple[int, str]] = set()  # (iteration, step)
    started = time.monotonic()
    next_kill = started + rng.expovariate(1 / args.mean_gap)
    dead_since: dict[str, float] = {}
    while True:
        now = time.monotonic()
        if now - started > args.timeout:
            raise SystemExit(f"chaos: the run did not finish within {args.timeout:.0f} s (logs in {work})")
        flow = sup.parts["flow"]
        if flow.proc is not None and flow.proc.poll() == 0:
            break
        # restart what died, as a supervisor would (the flow once Prefect answers)
        for name, c in sup.parts.items():
            if sup.alive(name):
                dead_since.pop(name, None)
                continue
            since = dead_since.setdefault(name, now)
            if now - since >= c.restart_delay:
                if name == "flow":
                    wait_http(f"{api}/health", 120, "the Prefect server")
                sup.start(name)
                dead_since.pop(name, None)
        where = current_step(storage, args.category)
        step, in_step = (where[1], where[2]) if where else ("start", 0.0)
        # the required (target, step) pairs are killed at their first sight (a worker once the step's pause is
        # over and its tasks run); scheduled kills go to any target, the flow at most once per step of an
        # iteration so that the run moves on; once the kills left are only enough for the targets never
        # killed, those come first
        killed = {k["target"].removesuffix("-2") for k in kills}
        spare = args.kills - len(kills) > len(set(TARGETS) - killed - {"flow"})
        # a worker's kill counts while the living flow's tasks run: the mark is this flow process's own
        working = sup.alive("flow") and time.time() - in_step > sup.parts["flow"].started_at
        due = [
            t
            for t, at in REQUIRED_HITS
            if at == step
            and (t, step) not in hit
            and (t != "dask-worker" or (working and in_step > args.step_pause + 0.3))
        ]
        due = [n for n in KILLABLE if n.removesuffix("-2") in due and sup.alive(n)] if spare else []
        if len(kills) < args.kills and (now >= next_kill or due):
            names = [n for n in KILLABLE if sup.alive(n)]  # each kind of target once first, then at random
            names = [n for n in names if n.removesuffix("-2") not in killed] or names
            if ((where or (0,))[0], step) in flow_killed_at:
                names = [n for n in names if n != "flow"]
            if due:
                names = due[:1]
            if names:
                share = [TARGETS[n.removesuffix("-2")] / (2 if n.startswith("dask-worker") else 1) for n in names]
                name = rng.choices(names, share)[0]
                sup.kill(name)
                kills.append({"t": round(now - started, 1), "target": name, "iteration": where[0] if where else 0})
                kills[-1]["step"] = step
                hit.add((name.removesuffix("-2"), step))
                if name == "flow":
                    flow_killed_at.add((kills[-1]["iteration"], step))
                print(
                    f"  {now - started:7.1f} s  kill {name:15s} at iteration {kills[-1]['iteration']}, {step}",
                    flush=True,
                )
            next_kill = now + rng.expovariate(1 / args.mean_gap)
        time.sleep(0.1)
    wall = time.monotonic() - started
    print(f"chaos: the run finished after {wall:.0f} s and {len(kills)} kills", flush=True)
    return {
        "wall_s": round(wall, 1),
        "kills": kills,
        "starts": {n: c.starts for n, c in sup.parts.items()},
        "supervisor": sup,
        "root": root,
        "accepted": accepted,
        "dask": dask,
        "api": api,
        "env": env,
    }


def replay(args: argparse.Namespace, work: Path, ran: dict) -> dict:
    """The same cascade, uninterrupted, over a copy of the pool, answered with the chaos run's stored answers."""
    from lsun_hitl.integrity import result_files
    from lsun_hitl.steps import STEP_PAUSE_ENV
    from lsun_hitl.storage import Storage

    sup: Supervisor = ran["supervisor"]
    again = work / "replay"
    shutil.copytree(ran["root"] / "pool", again / "pool")
    lsun = str(BIN / "lsun-hitl")
    sup.add(
        "replay-crowd",
        [lsun, "crowd", "--root", str(again), "--category", args.category, "--replay-from", str(ran["root"])],
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [
            lsun,
            "run",
            "--root",
            str(again),
            "--category",
            args.category,
            "--dask-address",
            ran["dask"],
            *run_flags(args),
        ],
        env={k: v for k, v in ran["env"].items() if k != STEP_PAUSE_ENV},  # nothing to hit: no pauses
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    sup.kill("replay-crowd")
    if done.returncode:
        return {"finished": False, "output": (done.stdout + done.stderr)[-3000:]}
    a, b = result_files(Storage(str(ran["root"])), args.category), result_files(Storage(str(again)), args.category)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {"finished": True, "wall_s": round(time.monotonic() - t0, 1), "files": len(a), "differ": differ}


def audit(args: argparse.Namespace, ran: dict) -> dict:
    from lsun_hitl.integrity import asked_twice, temporary_files, unreadable_files, vote_audit
    from lsun_hitl.storage import Storage

    storage = Storage(str(ran["root"]))
    path: Path = ran["accepted"]
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    summary = storage.read_json(storage.path(f"datasets/{args.category}/summary.json"))
    return {
        "summary": {
            k: summary.get(k)
            for k in ("positive", "negative", "unresolved", "human_labeled_images", "decided_by_model", "iterations")
        },
        "votes": vote_audit(storage, args.category, lines),
        "temporary_files": temporary_files(storage),
        "unreadable_files": unreadable_files(storage),
        "asked_twice": asked_twice(storage, args.category),
    }


def verdict(ran: dict, replayed: dict, checked: dict, min_kills: int) -> list[str]:
    """The checks that failed, one line each (empty: all held)."""
    v = checked["votes"]
    pairs = {(k["target"].removesuffix("-2"), k["step"]) for k in ran["kills"]}
    missed = [f"{t} in {step}" for t, step in REQUIRED_HITS if (t, step) not in pairs]
    targets = {k["target"].removesuffix("-2") for k in ran["kills"]}
    failed = [
        (len(ran["kills"]) >= min_kills, f"{len(ran['kills'])} kills, fewer than {min_kills}"),
        (
            not missed or min_kills < len(REQUIRED_HITS),
            f"kills never dealt: {', '.join(missed)}",
        ),
        (set(TARGETS) <= targets, f"targets never killed: {sorted(set(TARGETS) - targets)}"),
        (replayed.get("finished", False), "the replay did not finish"),
        (not replayed.get("differ"), f"results differ from the replay's: {replayed.get('differ', [])[:5]}"),
        (v["lost_batches"] == 0 and v["short_batches"] == 0, f"accepted answers not stored: {v}"),
        (v["counted_twice"] == 0, f"answers stored twice: {v['counted_twice']}"),
        (
            v["answers_stored"] == v["answers_accepted"],
            f"stored {v['answers_stored']} of {v['answers_accepted']} accepted",
        ),
        (not checked["temporary_files"], f"temporary files left: {checked['temporary_files'][:5]}"),
        (not checked["unreadable_files"], f"unreadable files: {checked['unreadable_files'][:5]}"),
        (not checked["asked_twice"], f"asked twice: {checked['asked_twice'][:5]}"),
        (checked["summary"]["unresolved"] == 0, "images left unresolved"),
    ]
    return [msg for ok, msg in failed if not ok]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--category", default="shirt", help="a hard category keeps the loop iterating")
    ap.add_argument("--limit", type=int, default=3000, help="Fashion-MNIST images in the pool")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs to deal (the check wants at least --min-kills)")
    ap.add_argument("--min-kills", type=int, default=20)
    ap.add_argument("--mean-gap", type=float, default=20.0, help="mean seconds between scheduled kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-pause", type=float, default=2.0, help="seconds the flow waits at the start of each step")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--work", help="keep the work folder here (default: a temporary one, removed)")
    ap.add_argument("--out", help="write the kill log, restarts and audit as JSON")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lsun-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children on the way out
    ran: dict = {}
    try:
        ran = chaos(args, work)
        replayed = replay(args, work, ran)
        checked = audit(args, ran)
    finally:
        if ran.get("supervisor"):
            ran["supervisor"].stop_all()
    failed = verdict(ran, replayed, checked, args.min_kills)
    by = Counter((k["target"].removesuffix("-2"), k["step"]) for k in ran["kills"])
    print(f"kills: {len(ran['kills'])} in {ran['wall_s']:.0f} s; restarts: {ran['starts']}")
    for (target, step), n in sorted(by.items()):
        print(f"  {target:15s} {step:16s} {n}")
    differ = len(replayed.get("differ", []))
    print(f"replay: {replayed.get('files')} result files, {differ} differ, {replayed.get('wall_s')} s")
    print(f"answers: {checked['votes']}")
    print(f"dataset: {checked['summary']}")
    print(f"temporary files: {len(checked['temporary_files'])}, unreadable: {len(checked['unreadable_files'])}, "
          f"asked twice: {len(checked['asked_twice'])}")  # fmt: skip
    print("audit: all checks held" if not failed else "audit FAILED:\n  " + "\n  ".join(failed), flush=True)
    if args.out:
        out = {k: v for k, v in ran.items() if k in ("wall_s", "kills", "starts")}
        Path(args.out).write_text(
            json.dumps(out | {"replay": replayed, "audit": checked, "failed": failed}, indent=1, default=str)
        )
    if not args.work and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
