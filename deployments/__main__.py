"""``python -m deployments serve|apply [--config categories.toml] [--pool NAME]``."""

from __future__ import annotations

import argparse
import os
import sys

from lsun_hitl.config import ConfigError

from . import DEFAULT_CONFIG, build, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments", description=__doc__)
    parser.add_argument("action", choices=("serve", "apply", "show"))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--pool", help="work pool for `apply` (its workers run the flow from this checkout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "show":
        for d in config:
            print(f"{d.name}\tcron={d.cron}\troot={d.root}\tparams={d.params}")
        return 0
    if args.action == "serve":
        from prefect import serve

        serve(*build(config))
    else:
        if not args.pool:
            print(
                "error: apply needs --pool NAME (create it with `prefect work-pool create NAME --type process`)",
                file=sys.stderr,
            )
            return 2
        for deployment in build(config, for_workers=True):
            deployment_id = deployment.apply(work_pool_name=args.pool)
            print(f"{deployment.name}: {deployment_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
