"""This process's memory counters from /proc/self/status (Linux), for metrics and benchmarks."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes: "VmRSS" (resident now), "VmHWM" (peak
    resident; `reset_peak()` sets it back to VmRSS), ... RuntimeError if the field is absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the file counts kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM back to the current VmRSS (writes 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
