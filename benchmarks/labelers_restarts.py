"""Labelers under load and restarts (issue 28): many people labeling while the service is killed and restarted.

    python benchmarks/labelers_restarts.py                                   # 200 labelers, 600 s, restart every 60 s
    python benchmarks/labelers_restarts.py --labelers 40 --seconds 45 --restart-every 12    # the test's size

Sets up a local root with a pool of Fashion-MNIST PNGs published as several open label requests (every image
wants ``--labels-per-image`` answers, so the work does not run out while the labelers run) and a gold set, and
starts ``lsun-hitl serve`` in a process of its own. ``--labelers`` simulated people, asyncio tasks in
``--client-procs`` processes, each with its own HTTP connection, do what the labeling page does for
``--seconds``: take the next batch, fetch each of its images, answer each after a think time (``--think-ms``
per image, exponential), submit the batch. Every call is timed client side (``time.perf_counter``). A call
that fails for a dropped or refused connection, a timeout or a 5xx is retried after a back-off (0.25 s
doubling to 2 s, as a page that keeps trying), and a labeler keeps its batch's answers and sends the same
batch again until it is answered 200: a submission whose response was lost is sent twice, and the service
must store it once.

Meanwhile the driver kills the service every ``--restart-every`` seconds -- SIGKILL by default (no shutdown
runs, writes are cut wherever they are), SIGTERM with ``--signal term`` (uvicorn's graceful shutdown) -- and
starts it again on the same port at once. At the end the labelers finish the submission they hold (no new
batch), and the root is audited:

- every submission answered 200 is stored, whole, exactly once, with the answers the labeler sent
  (``integrity.vote_audit`` and a check of each stored answer against the labeler's);
- no answer is stored twice, no labeler answered one image twice (outside gold), and batches stored that no
  labeler was told were accepted are counted;
- the desk's live counts (``/api/admin/requests`` before the last stop) equal the counts a desk rebuilds from
  storage: what the service counted in memory across the restarts is what it stored;
- no torn file (``integrity.unreadable_files``); temporary files a kill left behind are counted.

Printed per call kind: calls, failed attempts (by reason), p50 / p99 / max of the whole call as the labeler
waited for it (retries and back-off included), split into calls in normal operation, calls that began within
``--settle-s`` after the service came back, and calls that spanned a restart (began or were still running
between the kill and the service answering again); the restarts' downtime; throughput in answers/s. A progress
line every ``--progress-s`` seconds. ``--out`` writes everything as JSON. Exit status 1 if the audit fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.soak import free_port  # noqa: E402

CATEGORY = "sneaker"
KINDS = ("next batch", "image", "submit")
BACKOFF = (0.25, 2.0)  # first wait after a failed attempt, longest wait


# ---- the root ---------------------------------------------------------------------------------------------
def make_root(root: Path, n_images: int, n_gold: int, request_size: int, n_labelers: int) -> dict[str, Any]:
    """Fashion-MNIST PNGs (reused cyclically past 70,000) under a local root, published as requests of
    ``request_size`` images, a gold set of ``n_gold``, tokens for the labelers and an admin. Returns the
    labelers' truth, tokens and the admin token."""
    import pyarrow as pa
    from PIL import Image

    from lsun_hitl import labels
    from lsun_hitl.fashion_mnist import load_arrays
    from lsun_hitl.labelers import create_labeler
    from lsun_hitl.quality import write_gold
    from lsun_hitl.storage import Storage

    arrays = load_arrays()
    pixels = np.concatenate([a[1] for a in arrays])
    classes = np.concatenate([a[2] for a in arrays])
    storage = Storage(str(root))
    total = n_images + n_gold
    storage.fs.makedirs(storage.path("images"), exist_ok=True)
    for start in range(0, total, 5000):
        files = {}
        for i in range(start, min(total, start + 5000)):
            buf = io.BytesIO()
            Image.fromarray(pixels[i % len(pixels)], "L").save(buf, format="PNG")
            files[storage.path(f"images/{i}.png")] = buf.getvalue()
        storage.fs.pipe(files)
    ids = [f"img{i:06d}" for i in range(total)]
    uris = [storage.url_of(f"images/{i}.png") for i in range(total)]
    truth = {ids[i]: bool(classes[i % len(classes)] == 7) for i in range(total)}  # 7 = sneaker
    n_requests = math.ceil(n_images / request_size)
    for r in range(n_requests):
        part = slice(r * request_size, min(n_images, (r + 1) * request_size))
        table = pa.table({"image_id": ids[part], "uri": uris[part]})
        labels.publish_request(storage, CATEGORY, f"iteration-{r + 1}", r + 1, table, None)
    gold = slice(n_images, total)
    write_gold(
        storage,
        CATEGORY,
        pa.table(
            {"image_id": ids[gold], "uri": uris[gold], "answer": ["yes" if truth[i] else "no" for i in ids[gold]]}
        ),
    )
    tokens = [create_labeler(storage, f"p{k:03d}") for k in range(n_labelers)]
    admin = create_labeler(storage, "admin", role="admin")
    return {"storage": storage, "truth": truth, "tokens": tokens, "admin": admin, "requests": n_requests}


# ---- the service ------------------------------------------------------------------------------------------
class Service:
    """``lsun-hitl serve`` as a process of its own on a fixed port, killed and started again by the driver."""

    def __init__(self, root: str, port: int, qc_args: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.argv = [sys.executable, "-m", "cli", "serve", "--root", root, "--port", str(port), "--no-resume"]
        self.argv += qc_args
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 300) -> float:
        """Poll ``/healthz`` until it answers 200; returns the time it did (``time.perf_counter``)."""
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"labelers_restarts: the service exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.perf_counter()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"labelers_restarts: the service did not answer within {timeout:.0f} s; see {self.log}")

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:  # a graceful stop that hangs: finish it
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)


class Usage:
    """CPU shares of the service and the labelers' processes between samples, and the machine's load average."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, float]] = {}
        self.samples: list[dict[str, float]] = []

    def _share(self, pid: int) -> float:
        import psutil

        try:
            proc = psutil.Process(pid)
            t, age = proc.cpu_times(), time.time() - proc.create_time()
        except psutil.NoSuchProcess:
            return 0.0
        now, used = time.perf_counter(), t.user + t.system
        before = self.last.get(pid, (now - age, 0.0))  # a process not seen before: since it started
        self.last[pid] = (now, used)
        return 100 * (used - before[1]) / max(now - before[0], 1e-3)

    def sample(self, service: subprocess.Popen | None, clients: list[Any]) -> dict[str, float]:
        out = {
            "service": self._share(service.pid) if service is not None else 0.0,
            "labelers": sum(self._share(p.pid) for p in clients),
            "load": os.getloadavg()[0],
        }
        self.samples.append(out)
        return out


# ---- the labelers -----------------------------------------------------------------------------------------
def client_process(
    url: str,
    labelers: list[tuple[str, str, int]],
    truth: dict[str, bool],
    think_ms: float,
    start_at: float,
    ramp_s: float,
    end_at: float,
    drain_until: float,
    progress: Any,
    results: Any,
) -> None:
    """Labelers ``(name, token, seed)`` as asyncio tasks in one process, each with its own connection."""
    import ssl

    import httpx

    # one TLS context for all (the service is plain HTTP): httpx builds one per client otherwise, ~150 ms of
    # CPU each on a busy machine, which stalled this process's event loop for seconds while labelers arrived
    tls = ssl.create_default_context()

    calls: list[tuple[int, float, float, int, float]] = []  # kind, first attempt's start, end, attempts, waited
    failures: Counter[str] = Counter()
    accepted: list[dict[str, Any]] = []
    outcome: Counter[str] = Counter()

    async def labeler(name: str, token: str, seed: int, delay: float) -> None:
        rng = np.random.default_rng(seed)
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=1)
        await asyncio.sleep(max(0.0, start_at + delay - time.perf_counter()))
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits, verify=tls) as client:

            async def call(kind: int, method: str, path: str, finish: bool = False, **kw: Any) -> Any:
                """The call, retried through connection errors, timeouts and 5xx; None once the labeler stops
                (``finish``: not before ``drain_until``)."""
                first = time.perf_counter()
                attempts, waited, wait = 0, 0.0, BACKOFF[0]
                while True:
                    attempts += 1
                    try:
                        r = await client.request(method, path, **kw)
                        if r.status_code < 500:
                            calls.append((kind, first, time.perf_counter(), attempts, waited))
                            return r
                        failures[f"{KINDS[kind]}: HTTP {r.status_code}"] += 1
                    except httpx.TransportError as exc:
                        failures[f"{KINDS[kind]}: {type(exc).__name__}"] += 1
                    now = time.perf_counter()
                    if now >= (drain_until if finish else end_at):
                        failures[f"{KINDS[kind]}: abandoned at the end"] += 1
                        return None
                    pause = min(wait * (0.5 + rng.random()), BACKOFF[1])
                    await asyncio.sleep(pause)
                    waited += pause
                    wait = min(2 * wait, BACKOFF[1])

            pending: tuple[str, list[dict[str, Any]]] | None = None  # a batch answered, not yet accepted
            while True:
                if pending is not None:
                    batch_id, answers = pending
                    r = await call(2, "POST", f"/api/batches/{batch_id}/labels", finish=True, json={"answers": answers})
                    pending = None
                    if r is None:
                        outcome["submission never accepted"] += 1
                    elif r.status_code == 200:
                        body = r.json()
                        accepted.append(
                            {
                                "labeler": name,
                                "batch_id": batch_id,
                                "answers": len(answers),
                                "stored": bool(body["stored"]),
                                "at": time.perf_counter(),
                                "sent": "".join(a["answer"][0] for a in sorted(answers, key=lambda a: a["index"])),
                            }
                        )
                        with progress.get_lock():
                            progress.value += 1
                    else:
                        outcome[f"submit refused: HTTP {r.status_code}"] += 1
                if time.perf_counter() >= end_at:
                    return
                r = await call(0, "POST", "/api/batches/next")
                if r is None:
                    return
                if r.status_code == 403:  # flagged by the gold check: this person gets no more work
                    outcome["labeler flagged"] += 1
                    return
                if r.status_code != 200:
                    outcome[f"next batch refused: HTTP {r.status_code}"] += 1
                    await asyncio.sleep(1.0)
                    continue
                batch = r.json()["batch"]
                if batch is None:
                    outcome["no work to hand out"] += 1
                    await asyncio.sleep(r.json().get("retry_after_s", 5))
                    continue
                answers = []
                for item in batch["items"]:
                    r = await call(1, "GET", f"/api/batches/{batch['batch_id']}/images/{item['index']}")
                    if r is None:
                        return
                    if r.status_code != 200:
                        outcome[f"image refused: HTTP {r.status_code}"] += 1
                    if think_ms:
                        await asyncio.sleep(rng.exponential(think_ms / 1000))
                    right = rng.random() < 0.95
                    answer = "yes" if right == truth[item["image_id"]] else "no"
                    answers.append({"index": item["index"], "answer": answer})
                pending = (batch["batch_id"], answers)

    async def everyone() -> None:
        n = len(labelers)
        await asyncio.gather(
            *(labeler(name, token, seed, ramp_s * k / max(n, 1)) for k, (name, token, seed) in enumerate(labelers))
        )

    asyncio.run(everyone())
    results.put(
        {
            "calls": np.array(calls, dtype=float).reshape(-1, 5),
            "failures": dict(failures),
            "accepted": accepted,
            "outcome": dict(outcome),
        }
    )


# ---- the figures ------------------------------------------------------------------------------------------
def latency_table(calls: np.ndarray, windows: list[tuple[float, float]], settle_s: float) -> list[dict[str, Any]]:
    """Per call kind: calls, attempts beyond the first, and p50 / p99 / max ms of the whole call in normal
    operation, just after a restart (began within ``settle_s`` of the service answering again) and across one."""
    kind, t0, t1, attempts, waited = calls.T if len(calls) else (np.zeros(0),) * 5
    spans = np.zeros(len(calls), bool)
    settling = np.zeros(len(calls), bool)
    for down, up in windows:
        spans |= (t0 <= up) & (t1 >= down)
        settling |= (t0 > up) & (t0 <= up + settle_s)
    settling &= ~spans
    ms = (t1 - t0) * 1000

    def stats(mask: np.ndarray) -> dict[str, float | int | None]:
        v = ms[mask]
        if not len(v):
            return {"calls": 0, "p50": None, "p99": None, "max": None}
        p50, p99 = np.percentile(v, [50, 99])
        return {
            "calls": int(len(v)),
            "p50": round(float(p50), 1),
            "p99": round(float(p99), 1),
            "max": round(float(v.max()), 1),
        }

    rows = []
    for k, name in enumerate(KINDS):
        mine = kind == k
        rows.append(
            {
                "call": name,
                "calls": int(mine.sum()),
                "retried_calls": int((mine & (attempts > 1)).sum()),
                "retries": int((attempts[mine] - 1).sum()),
                "retry_wait_s": round(float(waited[mine].sum()), 1),
                "normal": stats(mine & ~spans & ~settling),
                "settling": stats(mine & settling),
                "spanning_restart": stats(mine & spans),
                "all": stats(mine),
            }
        )
    return rows


def timeline(calls: np.ndarray, start: float, bin_s: float) -> list[dict[str, Any]]:
    """Per ``bin_s`` of the run (by when calls began): calls of each kind and the p99 ms of all of them."""
    if not len(calls):
        return []
    kind, t0, t1 = calls[:, 0], calls[:, 1] - start, calls[:, 2] - calls[:, 1]
    out = []
    for b in range(int(max(t0.max(), 0) // bin_s) + 1):
        mine = (t0 >= b * bin_s) & (t0 < (b + 1) * bin_s)
        if mine.any():
            out.append(
                {
                    "from_s": b * bin_s,
                    "calls": {name: int((mine & (kind == k)).sum()) for k, name in enumerate(KINDS)},
                    "p99_ms": round(float(np.percentile(t1[mine], 99) * 1000), 1),
                }
            )
    return out


def _cell(s: dict[str, Any]) -> str:
    return "–" if not s["calls"] else f"{s['calls']:,}: {s['p50']:,.0f} / {s['p99']:,.0f} / {s['max']:,.0f}"


def print_table(rows: list[dict[str, Any]], settle_s: float) -> None:
    print(
        f"| call | calls | retries | normal: n: p50 / p99 / max ms | first {settle_s:.0f} s after a restart "
        "| spanning a restart | all: p50 / p99 / max ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["all"]
        every = "–" if not a["calls"] else f"{a['p50']:,.0f} / {a['p99']:,.0f} / {a['max']:,.0f}"
        print(
            f"| {r['call']} | {r['calls']:,} | {r['retries']:,} ({r['retried_calls']:,} calls, "
            f"{r['retry_wait_s']:,.0f} s waited) | {_cell(r['normal'])} | {_cell(r['settling'])} "
            f"| {_cell(r['spanning_restart'])} | {every} |"
        )


# ---- the audit --------------------------------------------------------------------------------------------
def audit(storage: Any, accepted: list[dict[str, Any]], live: list[dict[str, Any]], qc: Any) -> dict[str, Any]:
    """The root against what the labelers were told (see the module's docstring)."""
    import pandas as pd

    from lsun_hitl import integrity
    from lsun_hitl.desk import LabelingDesk
    from lsun_hitl.storage import votes_dir

    figures = integrity.vote_audit(storage, CATEGORY, accepted)
    files = storage.glob(storage.path(votes_dir(CATEGORY, "*"), "*.parquet"))
    frames = []
    for f in files:
        t = storage.read_table(f).to_pandas()
        t["file_batch"] = f.rsplit("/", 1)[1].removesuffix(".parquet")
        frames.append(t)
    stored = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["batch_id", "image_id"])
    # each stored answer against what its labeler sent: the batch file gives the image of each index
    sent = {a["batch_id"]: a["sent"] for a in accepted}
    altered = 0
    for batch_id, group in stored[stored["batch_id"].isin(sent.keys())].groupby("batch_id"):
        ids = storage.read_json(storage.path(f"labels/{CATEGORY}/batches/{batch_id}.json"))["image_ids"]
        want = {image_id: sent[batch_id][k] for k, image_id in enumerate(ids)}
        altered += int(sum(want.get(i) != a[0] for i, a in zip(group["image_id"], group["answer"], strict=True)))
    told_stored = Counter(a["batch_id"] for a in accepted if a["stored"])
    plain = stored[~stored["gold"].astype(bool)] if len(stored) else stored
    # the desk's counts as a restarted service rebuilds them from storage, against the live ones
    rebuilt = {(p["request_id"]): p for p in LabelingDesk(storage, qc).progress()}
    keys = ("images", "done", "answers", "complete")
    mismatched = [
        {
            "request": p["request_id"],
            "live": {k: p[k] for k in keys},
            "stored": {k: rebuilt[p["request_id"]][k] for k in keys},
        }
        for p in live
        if {k: p[k] for k in keys} != {k: rebuilt.get(p["request_id"], {}).get(k) for k in keys}
    ]
    return {
        "votes": figures,
        # a resubmission answered "stored before": its first try was stored, but its response was cut
        "accepted_as_stored_before": sum(1 for a in accepted if not a["stored"]),
        "accepted_twice_as_stored": sum(1 for n in told_stored.values() if n > 1),
        "answers_altered": altered,
        "files_named_for_another_batch": int((stored["batch_id"] != stored["file_batch"]).sum()) if len(stored) else 0,
        "image_answered_twice_by_one_labeler": int(plain.duplicated(["request_id", "image_id", "labeler"]).sum())
        if len(plain)
        else 0,
        "live_counts_differ_from_storage": mismatched,
        "live_answers": sum(p["answers"] for p in live),
        "temporary_files": len(integrity.temporary_files(storage)),
        "unreadable_files": integrity.unreadable_files(storage, ["labels"]),
    }


def failed_checks(a: dict[str, Any]) -> list[str]:
    v = a["votes"]
    checks = {
        "an accepted batch is not stored": v["lost_batches"],
        "an accepted batch is stored short": v["short_batches"],
        "answers stored short of those accepted": v["answers_accepted"] - v["answers_stored"],
        "an answer is stored twice": v["counted_twice"],
        "a batch was answered stored=true twice": a["accepted_twice_as_stored"],
        "a stored answer differs from the one sent": a["answers_altered"],
        "a file holds another batch's answers": a["files_named_for_another_batch"],
        "a labeler answered an image twice": a["image_answered_twice_by_one_labeler"],
        "the live counts differ from storage's": len(a["live_counts_differ_from_storage"]),
        "a file is torn": len(a["unreadable_files"]),
    }
    return [f"{what} ({n})" for what, n in checks.items() if n]


# ---- the driver -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelers", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=600, help="how long the labelers work")
    ap.add_argument("--restart-every", type=float, default=60, help="seconds between kills of the service")
    ap.add_argument("--signal", choices=("kill", "term"), default="kill", help="SIGKILL (default) or SIGTERM")
    ap.add_argument("--think-ms", type=float, default=500, help="a labeler's mean time per image (exponential)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--labels-per-image", type=int, default=5, help="answers every image gets (no more, no fewer)")
    ap.add_argument("--gold-rate", type=float, default=0.1)
    ap.add_argument("--images", type=int, help="pool images to label (default: enough for the run, 25%% to spare)")
    ap.add_argument("--request-size", type=int, default=5000, help="images per published request")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the labelers' asyncio tasks run in")
    ap.add_argument("--ramp-s", type=float, default=10, help="labelers arrive spread over this many seconds")
    ap.add_argument("--settle-s", type=float, default=10, help="calls begun this soon after a restart are 'settling'")
    ap.add_argument("--drain-s", type=float, default=120, help="at the end, how long labelers may finish a submission")
    ap.add_argument("--progress-s", type=float, default=30)
    ap.add_argument("--work", help="folder for the root and the service's log (default: a new temporary one)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from lsun_hitl.quality import QCParams

    qc = QCParams(
        labels_per_image=args.labels_per_image,
        max_labels_per_image=args.labels_per_image,
        batch_size=args.batch_size,
        gold_rate=args.gold_rate,
    ).validate()
    per_second = args.labelers * (1000 / args.think_ms if args.think_ms else 50)  # answers/s at most
    n_images = args.images or math.ceil(1.25 * per_second * args.seconds * (1 - args.gold_rate) / qc.labels_per_image)
    work = Path(args.work or tempfile.mkdtemp(prefix="labelers-restarts-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    setup = make_root(work / "root", n_images, 200, args.request_size, args.labelers)
    storage = setup["storage"]
    print(
        f"root {storage.url}: {n_images:,} images in {setup['requests']} requests, 200 gold, "
        f"{args.labelers} labelers ({time.perf_counter() - t:.0f} s to set up)",
        flush=True,
    )
    qc_args = ["--batch-size", str(qc.batch_size), "--gold-rate", str(qc.gold_rate)]
    qc_args += ["--labels-per-image", str(qc.labels_per_image), "--max-labels-per-image", str(qc.max_labels_per_image)]
    service = Service(storage.url, free_port(), qc_args, work / "service.log")
    t = time.perf_counter()
    service.start()
    first_start = service.wait_ready() - t
    print(f"service up on {service.url} in {first_start:.1f} s", flush=True)

    sig = signal.SIGKILL if args.signal == "kill" else signal.SIGTERM
    start = time.perf_counter() + 1.0
    end_at = start + args.seconds
    progress = mp.Value("l", 0)
    results: mp.Queue = mp.Queue()
    specs = [(f"p{k:03d}", tok, k) for k, tok in enumerate(setup["tokens"])]
    groups = [specs[i :: args.client_procs] for i in range(args.client_procs)]
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(
            target=client_process,
            args=(
                service.url,
                g,
                setup["truth"],
                args.think_ms,
                start,
                args.ramp_s,
                end_at,
                end_at + args.drain_s,
                progress,
                results,
            ),
        )
        for g in groups
        if g
    ]
    for p in procs:
        p.start()
    usage = Usage()
    restarts: list[dict[str, float]] = []
    next_restart = start + args.restart_every
    next_report = start + args.progress_s
    try:
        while time.perf_counter() < end_at:
            now = time.perf_counter()
            if now >= next_restart:
                down = time.perf_counter()
                service.kill(sig)
                service.start()
                up = service.wait_ready()
                restarts.append({"at_s": down - start, "down": down, "up": up, "downtime_s": up - down})
                print(f"  restart {len(restarts)} at {down - start:.0f} s: down {up - down:.1f} s", flush=True)
                next_restart = down + args.restart_every
            elif now >= next_report:
                cpu = usage.sample(service.proc, procs)
                print(
                    f"  {now - start:.0f} s: {progress.value:,} batches accepted, {len(restarts)} restarts; "
                    f"CPU: service {cpu['service']:.0f}%, labelers {cpu['labelers']:.0f}%, "
                    f"load average {cpu['load']:.1f} on {os.cpu_count()} cores",
                    flush=True,
                )
                next_report += args.progress_s
            else:
                time.sleep(min(0.2, next_restart - now, next_report - now))
        print(f"  {args.seconds:.0f} s: stopping the labelers (they finish the batch they hold)", flush=True)
        parts = [results.get(timeout=args.drain_s + 120) for _ in procs]
        for p in procs:
            p.join(30)
        import httpx

        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {setup['admin']}"}) as admin:
            live = admin.get("/api/admin/requests", timeout=60).json()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if service.proc is not None and service.proc.poll() is None:
            service.kill(signal.SIGTERM)

    calls = np.concatenate([p["calls"] for p in parts])
    failures: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    accepted = [a for p in parts for a in p["accepted"]]
    for p in parts:
        failures.update(p["failures"])
        outcome.update(p["outcome"])
    windows = [(r["down"], r["up"]) for r in restarts]
    rows = latency_table(calls, windows, args.settle_s)
    bins = timeline(calls, start, 10.0)
    checked = audit(storage, accepted, live, qc)
    failed = failed_checks(checked)
    answers = sum(a["answers"] for a in accepted)
    in_time = sum(a["answers"] for a in accepted if a["at"] <= end_at)  # not the batches finished after the end
    downtimes = [r["downtime_s"] for r in restarts]

    print(
        f"\n{args.labelers} labelers ({args.client_procs} client processes, {args.think_ms:.0f} ms per image), "
        f"{args.seconds:.0f} s, the service {'SIGKILLed' if sig == signal.SIGKILL else 'SIGTERMed'} and restarted "
        f"every {args.restart_every:.0f} s: {len(restarts)} restarts"
    )
    if downtimes:
        print(
            "downtime (kill to /healthz answering): "
            + ", ".join(f"{d:.1f}" for d in downtimes)
            + f" s (median {np.median(downtimes):.1f})"
        )
    print(
        f"{len(accepted):,} batches accepted, {answers:,} answers ({answers - in_time:,} in the batches finished "
        f"after the {args.seconds:.0f} s): {in_time / args.seconds:,.1f} answers/s, "
        f"{np.sum(calls[:, 1] <= end_at) / args.seconds:,.0f} calls/s"
    )
    print_table(rows, args.settle_s)
    print("p99 ms of all calls per 10 s:", " ".join(f"{b['p99_ms']:,.0f}" for b in bins))
    slow = calls[np.argsort(calls[:, 2] - calls[:, 1])[-5:]] if len(calls) else calls
    print(
        "slowest calls (ms at s):",
        ", ".join(f"{KINDS[int(k)]} {(b - a) * 1000:,.0f} at {a - start:.0f}" for k, a, b, *_ in slow[::-1]),
    )
    print("failed attempts:", ", ".join(f"{k} {v:,}" for k, v in failures.most_common()) or "none")
    if outcome:
        print("labelers:", ", ".join(f"{k} {v:,}" for k, v in outcome.most_common()))
    v = checked["votes"]
    print(
        f"audit: {v['batches_accepted']:,} batches accepted holding {v['answers_accepted']:,} answers; "
        f"stored for them {v['answers_stored']:,}; lost batches {v['lost_batches']}, short {v['short_batches']}, "
        f"answers stored twice {v['counted_twice']}, altered {checked['answers_altered']}, "
        f"stored without an acknowledgement {v['stored_unacknowledged']}; "
        f"resubmissions answered stored=false {checked['accepted_as_stored_before']}; "
        f"live counts = storage's: {not checked['live_counts_differ_from_storage']} "
        f"({checked['live_answers']:,} answers counted); temporary files left by kills {checked['temporary_files']}"
    )
    print("audit: PASSED" if not failed else "audit: FAILED: " + "; ".join(failed))
    if args.out:
        result = {
            "args": vars(args),
            "images": n_images,
            "restarts": [{k: r[k] for k in ("at_s", "downtime_s")} for r in restarts],
            "first_start_s": first_start,
            "batches_accepted": len(accepted),
            "answers_accepted": answers,
            "answers_per_s": in_time / args.seconds,
            "calls": rows,
            "timeline": bins,
            "cpu": usage.samples,
            "failures": dict(failures),
            "labelers": dict(outcome),
            "audit": checked,
            "failed": failed,
            "work": str(work),
        }
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
