"""`EmbeddedBroker`: an amqtt MQTT broker in a background thread of this process.

amqtt is imported only when the broker is served or `OpenAuthPlugin` is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Self

from .probes import (
    LOOPBACK_HOST,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    free_port,
    port_is_free,
    probe_mqtt,
)

log = logging.getLogger(__name__)

# amqtt logs every connection and state change at INFO / DEBUG.
_CHATTY_LOGGERS = ("amqtt", "transitions")


def quiet_amqtt_loggers() -> None:
    """Cap amqtt's per-connection logging at WARNING unless someone configured it."""
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; building the class here keeps amqtt out of import time.
    if name == "OpenAuthPlugin":
        from amqtt.plugins.base import BaseAuthPlugin

        class OpenAuthPlugin(BaseAuthPlugin):
            """Lets every client in without marking it anonymous.

            amqtt's AnonymousAuthPlugin flags each session as anonymous, and amqtt
            neither queues QoS 1 messages for an offline anonymous session nor keeps
            it; this plugin keeps Mosquitto's behaviour for clean_session=False.
            """

            async def authenticate(self, *, session: Any) -> bool:
                return True

        globals()[name] = OpenAuthPlugin
        return OpenAuthPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmbeddedBroker:
    """An amqtt MQTT 3.1.1 broker on 127.0.0.1, run by a thread with its own event loop.

    Anonymous clients, QoS 0/1/2, retained messages and last wills work; state is
    in memory only (a restart forgets retained messages and sessions).
    """

    def __init__(self, port: int = 0, *, host: str = LOOPBACK_HOST,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> str:
        """Start the broker; returns its URL once it answers MQTT CONNECT."""
        if self._thread is not None:
            raise RuntimeError("EmbeddedBroker already started")
        quiet_amqtt_loggers()
        pick_port = self.port == 0
        if not pick_port and not port_is_free(self.host, self.port):
            raise OSError(f"cannot start the embedded MQTT broker: {self.host}:{self.port} is in use")
        for _attempt in range(3):  # a picked port can be taken before amqtt binds it
            if pick_port:
                self.port = free_port(self.host)
            self._ready.clear()
            self._error = None
            self._thread = threading.Thread(
                target=self._thread_main, name=f"amqtt-broker-{self.port}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(self.start_timeout_s):
                self.stop()
                raise TimeoutError(f"embedded MQTT broker did not start within "
                                   f"{self.start_timeout_s:.1f} s on {self.url}")
            if self._error is None:
                break
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            if not (pick_port and isinstance(self._error.__cause__, OSError)):
                raise RuntimeError(f"embedded MQTT broker failed on {self.url}: {self._error}")
        else:
            raise RuntimeError(f"embedded MQTT broker found no free port: {self._error}")
        reason = probe_mqtt(self.url, timeout_s=self.start_timeout_s)
        if reason is not None:
            self.stop()
            raise ConnectionError(f"embedded MQTT broker at {self.url} does not answer: {reason}")
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Shut the broker down and join its thread; safe to call twice."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not stop within %.1f s", STOP_TIMEOUT_S)
        else:
            log.info("embedded MQTT broker on %s stopped", self.url)
        self._thread = self._loop = self._stop_requested = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {f"{__name__}.OpenAuthPlugin": {}},
        }

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_log_loop_exception)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001 -- start() re-raises it; the thread ends quietly
            self._error = exc
        finally:
            self._ready.set()
            loop.run_until_complete(_cancel_leftover_tasks())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        self._stop_requested = asyncio.Event()
        broker = Broker(self._config())  # must be built inside the running loop
        await broker.start()
        self._ready.set()
        await self._stop_requested.wait()
        await broker.shutdown()


async def _cancel_leftover_tasks() -> None:
    """Cancel what amqtt leaves behind (client connection handlers) so nothing dies pending."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Dropped client connections surface here as unretrieved task errors; not worth a traceback.
    log.debug("embedded MQTT broker: %s (%r)", context.get("message"), context.get("exception"))
