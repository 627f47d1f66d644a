"""`ServerProcess`: a `mosquitto` / `redis-server` binary on a free loopback port."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Self

from .probes import (
    LOOPBACK_HOST,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    free_port,
    port_is_free,
    wait_for_port,
)

log = logging.getLogger(__name__)


def _mosquitto_command(binary: str, port: int, host: str, workdir: str) -> list[str]:
    config = os.path.join(workdir, "mosquitto.conf")
    with open(config, "w") as handle:
        handle.write(f"listener {port} {host}\nallow_anonymous true\n")
    return [binary, "-c", config]


def _redis_command(binary: str, port: int, host: str, workdir: str) -> list[str]:
    return [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", workdir, "--daemonize", "no"]


# kind -> (URL scheme, command builder, URL path)
SERVER_KINDS: dict[str, tuple[str, Callable[[str, int, str, str], list[str]], str]] = {
    "mosquitto": ("mqtt", _mosquitto_command, ""),
    "redis-server": ("redis", _redis_command, "/0"),
}
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_server_binary(kind: str) -> str | None:
    """Path of the `mosquitto` / `redis-server` binary, looking in sbin dirs too."""
    if kind not in SERVER_KINDS:
        raise ValueError(f"unknown server kind {kind!r}; known: {sorted(SERVER_KINDS)}")
    return shutil.which(kind) or shutil.which(kind, path=os.pathsep.join(_EXTRA_BIN_DIRS))


class ServerProcess:
    """A `mosquitto` or `redis-server` binary on a free loopback port, in a temp dir."""

    def __init__(self, kind: str, *, port: int = 0, host: str = LOOPBACK_HOST,
                 binary: str | None = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r}; known: {sorted(SERVER_KINDS)}")
        self.kind = kind
        self.host = host
        self.port = port
        self.binary = binary or find_server_binary(kind)
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        scheme, _, path = SERVER_KINDS[self.kind]
        return f"{scheme}://{self.host}:{self.port}{path}"

    def start(self) -> str:
        """Start the server; returns its URL once its port accepts connections."""
        if self._process is not None:
            raise RuntimeError(f"{self.kind} already started")
        if self.binary is None:
            raise FileNotFoundError(f"no {self.kind} binary on PATH or in {_EXTRA_BIN_DIRS}")
        pick_port = self.port == 0
        if not pick_port and not port_is_free(self.host, self.port):
            raise OSError(f"cannot start {self.kind}: {self.host}:{self.port} is in use")
        self._workdir = tempfile.mkdtemp(prefix=f"soundfleet-{self.kind}-")
        log_path = os.path.join(self._workdir, "server.log")
        for _attempt in range(3):  # a picked port can be taken before the server binds it
            if pick_port:
                self.port = free_port(self.host)
            _, build_command, _ = SERVER_KINDS[self.kind]
            command = build_command(self.binary, self.port, self.host, self._workdir)
            with open(log_path, "ab") as log_file:
                self._process = subprocess.Popen(
                    command, cwd=self._workdir, stdin=subprocess.DEVNULL,
                    stdout=log_file, stderr=subprocess.STDOUT,
                )
            process = self._process
            try:
                wait_for_port(self.host, self.port, self.start_timeout_s,
                              alive=lambda proc=process: proc.poll() is None)
                if process.poll() is not None:  # someone else answered on that port
                    raise RuntimeError(f"{self.kind} exited with code {process.returncode}")
                log.info("%s (pid %s) listening on %s", self.kind, process.pid, self.url)
                return self.url
            except RuntimeError:
                self._process = None
                if not pick_port:
                    break
            except TimeoutError:
                break
        tail = _tail(log_path)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start on {self.host}:{self.port}; log:\n{tail}")

    def stop(self) -> None:
        """Terminate the server (SIGKILL after a grace period) and remove its temp dir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _tail(path: str, max_chars: int = 2000) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-max_chars:]
    except OSError:
        return "(no log)"
