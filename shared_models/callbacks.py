"""Keep a network thread alive whatever a callback is handed.

paho-mqtt re-raises an exception from a callback and its network thread dies with it, while
the client still reports itself connected: frames would spool forever. Every paho callback on
the edge and in the cloud goes through :class:`CallbackGuard`, which counts the exception,
logs the first of each kind with its traceback (a flood of hostile messages must not flood
the log too) and returns normally. Stdlib only: the edge imports it."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any


class CallbackGuard:
    """Wraps callbacks so that none raises; ``errors`` counts what they swallowed."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.errors = 0
        self._logged: set[tuple[str, str]] = set()  # (callback, exception type) already logged
        self._lock = threading.Lock()

    def wrap(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(callback, "__qualname__", repr(callback))

        @functools.wraps(callback)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point: nothing escapes into paho
                self._count(name, exc)
                return None

        return guarded

    def _count(self, name: str, exc: Exception) -> None:
        key = (name, type(exc).__name__)
        with self._lock:
            self.errors += 1
            first = key not in self._logged
            self._logged.add(key)
        if first:
            self.log.error("callback %s raised %s (counted; later ones of this kind are only counted)",
                           name, key[1], exc_info=exc)
