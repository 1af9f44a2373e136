"""Per-category Prefect deployments of the cascade flow, from one TOML file (``categories.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from lsun_hitl.config import CascadeParams, ConfigError, validate

DEFAULT_CONFIG = Path(__file__).with_name("categories.toml")


@dataclass(frozen=True)
class CategoryDeployment:
    """What one category's deployment runs, and when."""

    category: str
    root: str
    dask_address: str | None
    params: dict[str, Any]
    cron: str | None
    timezone: str = "UTC"
    tags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"lsun-{self.category}"

    def parameters(self) -> dict[str, Any]:
        return {"category": self.category, "root": self.root, "dask_address": self.dask_address, "params": self.params}


def load_config(path: str | Path = DEFAULT_CONFIG) -> list[CategoryDeployment]:
    """Read the categories and their settings; ConfigError naming the file and the entry on a mistake."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read deployment config {str(path)!r}: {exc}") from exc
    defaults = config.get("defaults", {})
    categories = config.get("categories")
    if not categories:
        raise ConfigError(f"{path}: no [categories.<name>] table; add one per category to deploy")
    known = {"root", "dask_address", "cron", "timezone", "tags", "params"}
    out = []
    for category, own in categories.items():
        unknown = set(own) - known
        if unknown:
            raise ConfigError(
                f"{path}: [categories.{category}] has unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        merged = {**defaults, **own}
        params = {**defaults.get("params", {}), **own.get("params", {})}
        try:
            validate(category, CascadeParams.from_dict(params))
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{path}: [categories.{category}]: {exc}") from exc
        out.append(
            CategoryDeployment(
                category=category,
                root=merged.get("root", "lsun-data"),
                dask_address=merged.get("dask_address") or None,
                params=params,
                cron=merged.get("cron") or None,
                timezone=merged.get("timezone", "UTC"),
                tags=list(merged.get("tags", [])),
            )
        )
    return out


REPO = Path(__file__).resolve().parents[1]  # the checkout whose flows/cascade.py the deployments run
ENTRYPOINT = "flows/cascade.py:category_cascade"


def build(config: list[CategoryDeployment], *, for_workers: bool = False) -> list[Any]:
    """Prefect ``RunnerDeployment`` objects, one per category.

    ``for_workers``: for a work pool (``apply``). A worker runs each flow run in a fresh temporary folder, so
    the flow is loaded from this checkout by path (``from_source``) and a local storage root is made absolute
    (a relative one would land in that folder and go with it after every suspension)."""
    from prefect.schedules import Cron

    from flows.cascade import category_cascade

    flow = category_cascade.from_source(source=str(REPO), entrypoint=ENTRYPOINT) if for_workers else category_cascade
    return [
        flow.to_deployment(
            name=d.name,
            parameters={**d.parameters(), "root": _absolute(d.root)} if for_workers else d.parameters(),
            schedule=Cron(d.cron, timezone=d.timezone) if d.cron else None,
            concurrency_limit=1,  # one run per category at a time
            tags=[*d.tags, d.category],
            description=f"LSUN cascade for {d.category!r} over {d.root}",
        )
        for d in config
    ]


def _absolute(root: str) -> str:
    """``root`` as any process on this machine reads it: URLs as given, a local folder made absolute."""
    return root if "://" in root else str(Path(root).expanduser().resolve())
