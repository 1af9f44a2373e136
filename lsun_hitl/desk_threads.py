"""Background threads that the labeling desk (``lsun_hitl.desk``) waits for when it closes.

The desk refreshes its view of storage and calls ``on_complete`` (which resumes a flow run) in
threads of their own, so that labelers' calls never wait on them. Left running while the interpreter
shuts down such threads can abort it (a native thread calling back into Python), hence ``close``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class BackgroundThreads:
    """Start daemon threads and join them on ``close``; none start once closed (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def spawn(self, target: Callable[[], None], name: str) -> bool:
        """Run ``target`` in a daemon thread named ``name``; False (nothing started) once closed."""

        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        with self._lock:
            if self._closed:
                return False
            thread = threading.Thread(target=run, name=name, daemon=True)
            self._threads.add(thread)
            thread.start()
        return True

    def open(self) -> None:
        """Allow new threads again after ``close``."""
        with self._lock:
            self._closed = False

    def close(self, timeout: float) -> list[str]:
        """Start no more threads and wait up to ``timeout`` seconds in all for the running ones.

        Returns the names of the threads still running when the time was up.
        """
        with self._lock:
            self._closed = True
            running = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in running if t.is_alive()]
