"""Process memory as Linux reports it (/proc/self): resident set size, its peak, and
resetting that peak. Read by inference (`casa.assistant`), the memory callback and the
benchmarks; 0 / False where /proc is unavailable.
"""

from __future__ import annotations

from pathlib import Path


def _proc_status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
