"""Dask: an existing cluster by scheduler address, or an embedded ``LocalCluster``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed


class ClusterError(RuntimeError):
    """The Dask scheduler cannot be reached."""


@contextmanager
def dask_client(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str = "4GiB",
) -> Iterator[Client]:
    """Yield a Dask client: connected to ``address`` if given, else to a new ``LocalCluster``.

    The local cluster has one process per core (at most ``n_workers``), one thread each, and a
    memory limit per worker; it is closed on exit so nothing is held between steps.
    """
    if address:
        try:
            client = Client(address, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address!r} ({exc}). Start one "
                "(`dask scheduler` and `dask worker <address>`, or any Dask deployment) or leave "
                "--dask-address unset to use an embedded LocalCluster."
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    workers = n_workers or max(1, min(2, os.cpu_count() or 1))
    # no MALLOC_TRIM_THRESHOLD_ for our workers: it halves torch's throughput (see scoring.py)
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            memory_limit=memory_limit,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def run_on_dask(
    client: Client | None,
    fn: Callable[..., Any],
    items: Sequence[Any],
    *,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Map ``fn(item, **kwargs)`` over ``items`` on ``client`` (in-process when None).

    Results come back in the order of ``items``; ``progress(done, total)`` is called as they finish.
    """
    total = len(items)
    if client is None:
        results = []
        for i, item in enumerate(items):
            results.append(fn(item, **kwargs))
            if progress:
                progress(i + 1, total)
        return results
    futures = client.map(fn, items, pure=False, **kwargs)
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * total
    done = 0
    for future in as_completed(futures):
        results[index[future.key]] = future.result()
        done += 1
        if progress:
            progress(done, total)
    return results
