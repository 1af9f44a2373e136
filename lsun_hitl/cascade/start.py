"""Starting a cascade: checks before any work, the iteration-0 manifest, and the pool's own backbones."""

from __future__ import annotations

import logging

from .. import model as model_lib
from ..cluster import dask_client
from ..config import CascadeParams, ModelParams, validate
from ..ingest import pool_size
from ..manifest import manifest_iterations, n_manifest_parts
from ..manifest_parts import write_initial
from ..partitions import Partitioning
from ..plan import Plan, plan
from ..plan import check as check_plan
from ..pretrain import POOL_WEIGHTS, pretrain_on_pool, pretrained_weights
from ..progress import Progress
from ..storage import Storage, pretrained_key
from .common import restore_funnels
from .sample import largest_sample

log = logging.getLogger(__package__)


def preflight(
    storage: Storage,
    category: str,
    params: CascadeParams,
    dask_address: str | None = None,
    need_pool: bool = True,
    base_rate: float | None = None,
) -> Plan | None:
    """Check everything a run needs before any work starts; raise an error naming the fix.

    Returns the first iteration's plan for a new cascade (None when it has started, or without ``need_pool``);
    a pool too small for the settings to save labels is refused unless ``params.allow_small_pool``.
    ``base_rate`` is the user's estimate of the category's share of the pool, for the plan (a gold set says
    little about it: gold is usually balanced on purpose).
    """
    validate(category, params)
    storage.check_writable()
    n_pool = pool_size(storage) if need_pool else None
    # Pretrained weights are first used after people labeled the first sample: check them now.
    for m in {m for m in (params.model, *params.model_schedule) if m.weights and m.weights != POOL_WEIGHTS}:
        model_lib.build(m, pretrained_weights(storage, m))  # missing file or wrong architecture: a clear error
    if dask_address:
        with dask_client(dask_address):
            pass
    if n_pool is None or manifest_iterations(storage, category):
        return None
    first = plan(category, n_pool, params, base_rate)
    check_plan(first, params, params.allow_small_pool)
    return first


def start(storage: Storage, category: str, params: CascadeParams) -> int:
    """Validate the settings and the storage, write the iteration-0 manifest if missing.

    Returns the last iteration whose manifest exists (0 for a new cascade), so a restarted run
    continues after it.
    """
    preflight(storage, category, params, need_pool=False)
    done = manifest_iterations(storage, category)
    if not done:
        n = pool_size(storage)
        if n == 0:
            raise ValueError(f"the pool at {storage.url} is empty: ingest images first")
        first = plan(category, n, params)
        check_plan(first, params, params.allow_small_pool)
        log.info("%s", first)
        partitioning = Partitioning(n, n_manifest_parts(n, params.manifest_partition))
        write_initial(storage, category, partitioning, next_sample=(params.seed, largest_sample(params)))
        return 0
    restore_funnels(storage, category, [k for k in done if k > 0])
    return done[-1]


def pool_backbones(params: CascadeParams) -> list[ModelParams]:
    """The run's models that start from the pool's own backbone (``weights == "pool"``), one per arch and size."""
    models = {(m.arch, m.image_size): m for m in [params.model, *params.model_schedule] if m.weights == POOL_WEIGHTS}
    return list(models.values())


def backbones_missing(storage: Storage, params: CascadeParams) -> bool:
    """Whether one of the run's pool backbones is not stored yet (``pretrain`` would train)."""
    return any(not storage.exists(storage.path(pretrained_key(m.arch, m.image_size))) for m in pool_backbones(params))


def pretrain(storage: Storage, params: CascadeParams, progress: Progress | None = None) -> list[str]:
    """Pretrain, once per pool, every model of the run whose weights are ``"pool"``; return their paths."""
    return [pretrain_on_pool(storage, m, seed=params.seed, progress=progress) for m in pool_backbones(params)]
