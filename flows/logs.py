"""What a cascade run prints in the terminal: Prefect's own console lines, less one per finished task.

Prefect logs ``Finished in state Completed()`` for every task run at INFO; a cascade runs dozens of tasks an
iteration, so the terminal filled with them between the lines that say something (the funnel, what the run
waits for) and the progress bars. ``quiet_completed_tasks`` drops exactly those records from Prefect's console
handler: they still reach the Prefect API (the UI's logs), and a task that fails or retries still prints.
"""

from __future__ import annotations

import logging

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler


class CompletedTaskFilter(logging.Filter):
    """Drops ``prefect.task_runs``' INFO record of a task that completed; keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "prefect.task_runs"
            and record.levelno == logging.INFO
            and str(record.msg).startswith("Finished in state Completed")
        )


def quiet_completed_tasks() -> None:
    """Add ``CompletedTaskFilter`` to Prefect's console handler in this process (once; after Prefect's logging
    is set up, which it is here if it was not)."""
    ensure_logging_setup()
    handlers = [h for lg in (logging.getLogger(), logging.getLogger("prefect")) for h in lg.handlers]
    for handler in handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, CompletedTaskFilter) for f in handler.filters
        ):
            handler.addFilter(CompletedTaskFilter())
