"""``lsun-hitl``: import data, build the pool, run the cascade, deliver labels, export, run the demo."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys

from cli import data, datasets, people, runs
from lsun_hitl.cluster import ClusterError
from lsun_hitl.config import ConfigError
from lsun_hitl.labelers import LabelerError
from lsun_hitl.labels import LabelError
from lsun_hitl.quality import QualityError
from lsun_hitl.storage import StorageError

COMMANDS = {
    "import-fashion-mnist": data.cmd_import,
    "ingest": data.cmd_ingest,
    "pretrain": data.cmd_pretrain,
    "truth": data.cmd_truth,
    "run": runs.cmd_run,
    "resume": runs.cmd_resume,
    "decide": runs.cmd_decide,
    "status": runs.cmd_status,
    "simulate": runs.cmd_simulate,
    "replay": runs.cmd_replay,
    "demo": runs.cmd_demo,
    "handout": people.cmd_handout,
    "serve": people.cmd_serve,
    "labelers": people.cmd_labelers,
    "gold": people.cmd_gold,
    "seed-positives": people.cmd_seed_positives,
    "crowd": people.cmd_crowd,
    "evaluate": datasets.cmd_evaluate,
    "export": datasets.cmd_export,
    "review": datasets.cmd_review,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsun-hitl", description=(__doc__ or "").replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, runs, people, datasets):
        module.add_commands(sub)
    return parser


def log_to_terminal(level: int) -> None:
    """This project's loggers to stderr at ``level``. Not the root logger: a handler there makes Prefect skip
    its own console set-up, and each of its lines then printed bare (``INFO:prefect.task_runs:...``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("lsun_hitl", "cli", "flows", "tasks", "deployments"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    # No telemetry from the embedded Prefect server (machines may have no internet).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default; a busy 2-core machine can need more
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", logging.getLevelName(level).lower())
    log_to_terminal(level)
    try:
        COMMANDS[args.command](args)
    except (
        ConfigError,
        StorageError,
        ClusterError,
        LabelError,
        LabelerError,
        QualityError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"lsun-hitl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """The ``lsun-hitl`` executable: ``main``, then leave without the interpreter's native teardown.

    pyarrow's thread pools can abort a finished process while they are torn down at exit (SIGABRT,
    "terminate called without an active exception"; apache/arrow#34314), which turned a command that
    had printed its result into exit status -6. The exit handlers still run (Prefect's temporary server
    and Dask stop through them), the output is flushed, and then the process ends with the command's status.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors and --help
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()  # what a normal exit runs first; os._exit skips only the native teardown
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
