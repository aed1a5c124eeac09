"""How much memory this machine can still give, for estimates made before a large allocation.

A batch or volume size that cannot fit should be refused at once with the estimate, not after minutes of
swapping and an out-of-memory error. Stdlib only (psutil is used when installed): the phantom writer, the
training configuration and the Slicer panel all ask.
"""

from __future__ import annotations

import os
from pathlib import Path

# cgroup v2 reports "max" for no limit; v1 a huge number.
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_NO_LIMIT = 1 << 60


def available_ram_bytes() -> int | None:
    """Memory a new allocation can take without swapping, in bytes; None when the system does not say.

    The smallest of the system's available memory (``MemAvailable``, as psutil or ``/proc/meminfo`` give it,
    else free pages from ``os.sysconf``) and what is left under this process's cgroup limit: inside a container
    ``/proc/meminfo`` shows the host's memory, not the container's.
    """
    found = [value for value in (_system_available(), _cgroup_left()) if value is not None]
    return min(found) if found else None


def describe_bytes(count: float) -> str:
    """``count`` bytes for a person: ``512 MiB``, ``3.4 GiB``, ``120 TiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # not reached; keeps type checkers content


def _system_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing (the engine does not require it) or unable to read the system
        pass
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_left() -> int | None:
    for limit_file, usage_file in (
        (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
        (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes"),
    ):
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit = int(limit_text)
            if limit >= _NO_LIMIT:
                return None
            # The usage counts the page cache, which the kernel gives back under pressure.
            return max(0, limit - int(usage_file.read_text().strip()) + _reclaimable(usage_file.parent))
        except (OSError, ValueError):
            continue
    return None


def _reclaimable(folder: Path) -> int:
    """Inactive file cache of a cgroup (``memory.stat``), in bytes; 0 when unknown."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
