"""This process's memory and CPU use, for the agent's heartbeat and the edge benchmark.

Linux first (/proc/self/status), with the portable `resource` module as the fallback.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

BYTES_PER_MB = 1_000_000  # decimal MB: the stricter reading of the 80 MB target


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/<pid>/status (e.g. VmHWM), None off Linux or once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    """Resident memory now, in MB."""
    kb = status_kb("VmRSS")
    return peak_rss_mb() if kb is None else kb * 1024 / BYTES_PER_MB


def peak_rss_mb() -> float:
    """Peak resident memory of this program, in MB: VmHWM where Linux has it, because ru_maxrss
    carries the parent's peak over fork + exec (a child of a 200 MB parent reads >= 200 MB)."""
    kb = status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / BYTES_PER_MB


class CpuMeter:
    """CPU use of this process between calls, in percent of one core."""

    def __init__(self) -> None:
        self._cpu_s, self._wall_s = time.process_time(), time.monotonic()

    def percent(self) -> float:
        cpu_s, wall_s = time.process_time(), time.monotonic()
        busy, elapsed = cpu_s - self._cpu_s, wall_s - self._wall_s
        self._cpu_s, self._wall_s = cpu_s, wall_s
        return 100.0 * busy / elapsed if elapsed > 0 else 0.0
