"""Threads the app starts besides serving (loading stored dictionaries, compiling programs),
ended with the app.

They are not daemon threads, and they stop between compilations when asked: a thread still
inside XLA when the interpreter exits is unwound through C++ frames that do not allow it, and
the process aborts (``FATAL: exception not rethrown``, exit status 134) instead of stopping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundWork:
    """Starts named threads; `stop` asks them to finish early and waits for them."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        """Set at shutdown: long tasks check it between their steps."""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, name: str, target: Callable[..., object], *args, **kwargs) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=name)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    def stop(self, timeout: float) -> None:
        """Ask every thread to stop and wait up to `timeout` seconds in all."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # the interpreter will still wait for it at exit
                log.warning("background thread %s still running at shutdown", thread.name)
