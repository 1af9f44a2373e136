"""Progress callbacks ``(done, total) -> None``: a terminal bar, and fan-out to several sinks."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

Progress = Callable[[int, int], None]


class Bar:
    """A tqdm bar driven by ``(done, total)`` calls; closes itself when done reaches total."""

    def __init__(self, desc: str, unit: str = "it") -> None:
        self.desc, self.unit = desc, unit
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=True)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()


def fan_out(*sinks: Progress | None) -> Progress:
    """One callback that forwards to every sink given (None entries are skipped)."""
    live = [s for s in sinks if s is not None]

    def call(done: int, total: int) -> None:
        for sink in live:
            sink(done, total)

    return call
