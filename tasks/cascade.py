"""Prefect tasks: the library's cascade steps with retries, caching and progress in the UI."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from lsun_hitl import cascade, steps
from lsun_hitl.calibration import Thresholds
from lsun_hitl.config import CascadeParams
from lsun_hitl.labels import LabelRequest, take
from lsun_hitl.progress import Bar, fan_out
from lsun_hitl.report import funnel_markdown
from lsun_hitl.split import Funnel
from lsun_hitl.status import status, status_markdown
from lsun_hitl.storage import Storage

T = TypeVar("T")

# Retry policies. A step that fails on a storage or cluster hiccup is retried: it finds whatever part of its
# output was stored and goes on. Publishing a request to people backs off longer (storage may be briefly
# unreachable while labelers write to it) and is never cached: it must see the current requests.
STEP: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5}
PUBLISH: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "cache_policy": NO_CACHE}


def recorded(step: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Record the figures of a step taking (storage, category, params, iteration, ...): ``steps.record``."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(storage: Storage, category: str, params: CascadeParams, iteration: int, *args: Any) -> T:
            with steps.record(storage, category, iteration, step):
                return fn(storage, category, params, iteration, *args)

        return run

    return wrap


def ui_progress(description: str) -> Callable[[int, int], None]:
    """A progress artifact in the Prefect UI, updated at most once a second."""
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= 1.0:
            last[0] = now
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(1, total))

    return update


@task(**STEP)
def start_cascade(storage: Storage, category: str, params: CascadeParams) -> int:
    return cascade.start(storage, category, params)


@task(retries=1, retry_delay_seconds=5)
def pretrain_backbone(storage: Storage, params: CascadeParams) -> list[str]:
    if not cascade.backbones_missing(storage, params):  # stored (or none asked for): no progress artifact in the UI
        return cascade.pretrain(storage, params)
    progress = fan_out(Bar("pretrain", "step"), ui_progress("pool: self-supervised pretraining"))
    return cascade.pretrain(storage, params, progress=progress)


@task(**STEP)
@recorded("sample")
def draw_sample(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> dict[str, int]:
    drawn = cascade.sample(storage, category, params, iteration, dask_address)
    return {"train": len(drawn.train), "calibration": len(drawn.calibration)}


@task(**PUBLISH)
@recorded("publish")
def publish_labels(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None
) -> LabelRequest:
    request = cascade.publish_iteration(storage, category, params, iteration, flow_run_id)
    report_status(storage)
    return request


@task(**PUBLISH)
def publish_remainder(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None
) -> LabelRequest | None:
    return cascade.publish_remainder(storage, category, params, iteration, flow_run_id)


@task(**PUBLISH)
@recorded("recheck")
def publish_recheck(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    flow_run_id: str | None,
    dask_address: str | None,
) -> LabelRequest | None:
    return cascade.publish_recheck(storage, category, params, iteration, flow_run_id, dask_address)


@task(cache_policy=NO_CACHE)
def labels_complete(storage: Storage, category: str, request_id: str) -> bool:
    return cascade.labels_complete(storage, category, request_id)


@task(**STEP, cache_policy=NO_CACHE)
def collect_labels(storage: Storage, category: str, request_id: str) -> int:
    return take(storage, category, request_id).num_rows


@task(retries=1, retry_delay_seconds=5)
@recorded("train")
def train_model(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str:
    progress = fan_out(Bar(f"train it{iteration}", "step"), ui_progress(f"{category}: training, iteration {iteration}"))
    return cascade.train(storage, category, params, iteration, progress=progress)


@task(retries=2, retry_delay_seconds=10)
@recorded("score")
def score_pool(storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None) -> int:
    with scoring_slot(params.score_limit):
        progress = fan_out(
            Bar(f"score it{iteration}", "part"), ui_progress(f"{category}: scoring, iteration {iteration}")
        )
        return cascade.score(storage, category, params, iteration, dask_address=dask_address, progress=progress)


@contextlib.contextmanager
def scoring_slot(limit: str | None) -> Iterator[None]:
    """A slot of the Prefect global concurrency limit ``limit`` while the block runs (none: no limit). Strict:
    a limit that does not exist fails the step instead of letting every category score at once."""
    if limit is None:
        yield
        return
    asked = time.time()
    with concurrency(limit, occupy=1, strict=True):
        taken = time.time()
        try:
            yield
        finally:
            steps.add_figures(slot_taken=round(taken, 3), slot_wait_s=round(taken - asked, 3), slot_given=time.time())


@task(**STEP)
@recorded("calibrate")
def calibrate_thresholds(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None
) -> Thresholds:
    return cascade.calibrate(storage, category, params, iteration, dask_address)


@task(**STEP)
@recorded("split")
def split_pool(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None
) -> Funnel:
    return cascade.split(storage, category, params, iteration, dask_address)


@task(cache_policy=NO_CACHE)
def check_stop(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str | None:
    return cascade.should_stop(storage, category, params, iteration)


@task(cache_policy=NO_CACHE)
def remainder_decision(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str:
    return cascade.remainder_decision(storage, category, params, iteration)


@task(**STEP, cache_policy=NO_CACHE)
def ask_remainder(storage: Storage, category: str, iteration: int, flow_run_id: str | None, why: str) -> dict:
    return cascade.ask_remainder(storage, category, iteration, flow_run_id, why)


@task(**STEP, cache_policy=NO_CACHE)
def store_decision(storage: Storage, category: str, decision: str) -> dict:
    return cascade.decide_remainder(storage, category, decision)


@task(**STEP)
def label_remainder(storage: Storage, category: str, iteration: int) -> Funnel:
    return cascade.finish_remainder(storage, category, iteration)


def artifact_key(kind: str, category: str) -> str:
    """An artifact key for ``category`` (Prefect keys take lower-case letters, digits and dashes only)."""
    return f"{kind}-{category.replace('_', '-')}"


def report_status(storage: Storage) -> None:
    """The ``lsun-status`` artifact: every category under the root, where it stands (``lsun_hitl.status``);
    each run adds a version when it starts waiting for people and after each iteration."""
    create_markdown_artifact(
        markdown=status_markdown(status(storage)),
        key="lsun-status",
        description=f"every category under {storage.url}: what it waits for, labels spent, decisions",
    )


@task(cache_policy=NO_CACHE)
def report_funnel(storage: Storage, category: str) -> str:
    markdown = funnel_markdown(category, cascade.funnels(storage, category))
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("funnel", category), description=f"{category}: cascade funnel"
    )
    report_status(storage)
    return markdown


@task(**STEP, cache_policy=NO_CACHE)
def finish_dataset(
    storage: Storage, category: str, stop: str | None, params: CascadeParams, dask_address: str | None = None
) -> cascade.Summary:
    summary = cascade.finish(storage, category, stop, params, dask_address)
    for warning in summary.warnings:
        get_run_logger().warning("%s: %s", category, warning)
    create_markdown_artifact(
        markdown=f"```\n{summary}\n```",
        key=artifact_key("summary", category),
        description=f"{category}: final dataset summary",
    )
    report_status(storage)
    return summary


@task(**PUBLISH)
def publish_audit(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None
) -> LabelRequest | None:
    return cascade.publish_audit(storage, category, params, flow_run_id)


@task(**PUBLISH)
def publish_audit_recheck(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None
) -> LabelRequest | None:
    return cascade.publish_audit_recheck(storage, category, params, flow_run_id)


@task(**STEP, cache_policy=NO_CACHE)
def audit_dataset(storage: Storage, category: str, params: CascadeParams) -> cascade.Audit:
    result = cascade.audit(storage, category, params)
    create_markdown_artifact(
        markdown=f"```\n{result}\n```", key=artifact_key("audit", category), description=f"{category}: audit"
    )
    return result
