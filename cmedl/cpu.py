"""What this machine's CPU offers inference: physical cores, instruction-set flags, native bf16. Stdlib only.

The command-line process (``python -m cmedl ...``, which is also how Slicer runs segmentation, in a child
process) asks this module how many threads torch should use; importing it never imports torch, so
``cmedl --help``, ``cmedl lungs`` and ``cmedl info`` stay fast.

Thread rule (:func:`inference_threads`), first match wins:

1. an explicit count (a ``--threads`` option, a function argument);
2. ``OMP_NUM_THREADS`` when set to a positive integer (what torchrun, job schedulers and users set);
3. the physical cores among the CPUs this process may run on: ``os.sched_getaffinity`` gives the CPUs, and
   ``/sys/devices/system/cpu/cpuN/topology`` their (package, core) pairs, so hyperthread siblings count once;
   a cgroup CPU quota (``cpu.max``, as a container limit sets) caps it. Without ``/sys`` the affinity set's
   size is used, and without that ``os.cpu_count()``. Cores other processes keep busy when the thread count
   is chosen (:func:`busy_cores`: CPU times since the command line started, less its own; elsewhere over a
   0.2 s wait) are left out, keeping at least one.

One thread per physical core: a convolution keeps a core's vector units busy, and a second hyperthread on
the same core only competes for them. And no thread for a core another process keeps busy: every parallel
operation waits at its end for its slowest thread, so one thread sharing a core with another process stalls
them all. Measured on a 2-core machine with the other core busy: the built-in U-Net took 0.8-1.1 s per batch
of four 128 px tiles on 2 threads and 0.2-0.3 s on 1.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")
_PROC_STAT = Path("/proc/stat")
#: how long the CPUs are watched for other processes' work before the thread count is chosen
BUSY_SAMPLE_SECONDS = 0.2
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: CPU flags (``/proc/cpuinfo``) meaning the CPU computes bf16 matrix products natively
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_cli_process = False
# Where the command line started watching the CPUs (mark_cli_process): (monotonic s, /proc/stat, own CPU s).
_watch_start: tuple[float, dict[int, list[int]], float] | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads torch gets and why (``reason`` is one line for a summary)."""

    count: int
    reason: str


def mark_cli_process() -> None:
    """Record that this process is the ``cmedl`` command line (called by ``python -m cmedl``).

    Only then does inference set torch's thread count (:func:`cmedl.inference.configure_threads`): imported as a
    library, inside Slicer's own Python or a user's script, the engine leaves the host's threads alone.
    """
    global _cli_process, _watch_start
    _cli_process = True
    # The CPUs are watched from now on: when the thread count is chosen, after the imports and the reading of the
    # input, the window is seconds long and nothing waits for it (busy_cores).
    _watch_start = watch_point()


def is_cli_process() -> bool:
    """True once :func:`mark_cli_process` was called in this process."""
    return _cli_process


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86; ARM says Features
            return frozenset(value.split())
    return frozenset()


def native_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The flags among :data:`NATIVE_BF16_FLAGS` this CPU has (empty: bf16 would be emulated, and slow)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity set; all CPUs where that is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sys_cpu: Path = _SYS_CPU) -> tuple[int, str]:
    """Physical cores among ``cpus`` (default :func:`usable_cpus`), and how they were counted.

    Logical CPUs sharing a (package, core) pair in ``sys_cpu``/cpuN/topology are one core. Where the topology
    cannot be read, every logical CPU counts.
    """
    cpus = usable_cpus() if cpus is None else cpus
    cores = core_ids(cpus, sys_cpu)
    if cores is None:
        return max(1, len(cpus)), f"{len(cpus)} usable CPUs (core topology unreadable)"
    count = max(1, len(set(cores.values())))
    return count, f"{count} physical cores among {len(cpus)} usable CPUs"


def core_ids(cpus: list[int], sys_cpu: Path = _SYS_CPU) -> dict[int, tuple[str, str]] | None:
    """The (package, core) pair of each logical CPU, or None where the topology cannot be read."""
    cores = {}
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores[cpu] = (
                (topology / "physical_package_id").read_text().strip(),
                (topology / "core_id").read_text().strip(),
            )
        except OSError:
            return None
    return cores


def cgroup_cpu_limit(path: Path = _CGROUP_CPU_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows this process (``quota / period``, rounded up), None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def watch_point(stat: Path = _PROC_STAT) -> tuple[float, dict[int, list[int]], float] | None:
    """A reading to measure the other processes' CPU use from: (monotonic seconds, ``/proc/stat`` jiffies per CPU,
    this process's CPU seconds); None where ``/proc/stat`` cannot be read."""
    times = _cpu_times(stat)
    return None if times is None else (time.monotonic(), times, _own_cpu_seconds())


def _own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    used = os.times()
    return used.user + used.system


def _clock_ticks() -> int:
    """Jiffies per second in ``/proc/stat``."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def busy_cores(
    cpus: list[int] | None = None,
    interval: float = BUSY_SAMPLE_SECONDS,
    stat: Path = _PROC_STAT,
    sys_cpu: Path = _SYS_CPU,
    since: tuple[float, dict[int, list[int]], float] | None = None,
) -> int:
    """Physical cores among ``cpus`` that other processes keep busy now.

    With ``since`` (a :func:`watch_point` at least ``interval`` seconds old, as the command line takes when it
    starts): the CPUs' busy time since then, less this process's own CPU time, in whole CPUs (each CPU's worth more
    than half used), without waiting. Otherwise two readings of ``/proc/stat``, ``interval`` seconds apart, while
    this process waits: a logical CPU more than half busy in between makes its core busy. Where ``/proc/stat``
    cannot be read, the whole part of the 1-minute load average is the count instead (that average also remembers
    the last minute, a run just finished too).
    """
    cpus = usable_cpus() if cpus is None else cpus
    if since is not None and time.monotonic() - since[0] >= interval:
        now = watch_point(stat)
        if now is not None:
            return _busy_since(since, now, cpus, sys_cpu)
    first = _cpu_times(stat)
    if first is None:
        try:
            return int(os.getloadavg()[0])
        except (AttributeError, OSError):  # Windows
            return 0
    time.sleep(interval)
    second = _cpu_times(stat) or {}
    spans = _spans(first, second, cpus)
    busy_cpus = [cpu for cpu, (total, busy) in spans.items() if total > 0 and busy / total > 0.5]
    cores = core_ids(cpus, sys_cpu)
    return len({cores[cpu] for cpu in busy_cpus}) if cores is not None else len(busy_cpus)


def _busy_since(
    start: tuple[float, dict[int, list[int]], float],
    now: tuple[float, dict[int, list[int]], float],
    cpus: list[int],
    sys_cpu: Path,
) -> int:
    """Physical cores' worth of other processes' work between two :func:`watch_point` readings.

    This process ran in between (a busy sample cannot tell its CPU from another's), so its own CPU time is
    subtracted from the CPUs' busy time; what is left, in CPUs' worth of the window, rounded (a CPU more than half
    used counts), is the count. Busy CPUs are taken to lie on distinct cores, as the scheduler spreads work.
    """
    spans = _spans(start[1], now[1], cpus)
    totals = [total for total, _ in spans.values()]
    if not totals or sum(totals) <= 0:
        return 0
    window = sum(totals) / len(totals)
    busy = sum(busy for _, busy in spans.values())
    others = max(0.0, busy - (now[2] - start[2]) * _clock_ticks())
    busy_cpus = int(others / window + 0.5)
    cores = core_ids(cpus, sys_cpu)
    physical = len(set(cores.values())) if cores is not None else len(cpus)
    return min(busy_cpus, physical)


def _spans(first: dict[int, list[int]], second: dict[int, list[int]], cpus: list[int]) -> dict[int, tuple[int, int]]:
    """Per CPU of ``cpus`` read both times: (jiffies elapsed, of them busy: neither idle nor iowait)."""
    spans = {}
    for cpu in cpus:
        before, after = first.get(cpu), second.get(cpu)
        if before is None or after is None:
            continue
        total = sum(after) - sum(before)
        idle = (after[3] + after[4]) - (before[3] + before[4])
        spans[cpu] = (total, total - idle)
    return spans


def _cpu_times(stat: Path) -> dict[int, list[int]] | None:
    """Jiffies per logical CPU from ``/proc/stat`` (user, nice, system, idle, iowait, ...), None if unreadable."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and len(values) >= 5:
            times[int(name[3:])] = [int(value) for value in values[:8]]
    return times or None


def inference_threads(
    explicit: int | None = None, environ: dict[str, str] | None = None, busy: int | None = None
) -> ThreadChoice:
    """The thread count for torch by the module's rule: explicit, then OMP_NUM_THREADS, then idle physical cores.

    ``busy`` is the number of physical cores other processes keep busy (default :func:`busy_cores`, measured).
    """
    environ = os.environ if environ is None else environ
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise ValueError(f"thread count must be a positive integer, got {explicit!r}")
        return ThreadChoice(explicit, f"{explicit} threads as asked")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            count = int(omp)
        except ValueError:
            count = 0
        if count >= 1:
            return ThreadChoice(count, f"OMP_NUM_THREADS={count}")
    count, how = physical_cores()
    quota = cgroup_cpu_limit()
    if quota is not None and quota < count:
        count, how = quota, f"{how}, capped at {quota} by the cgroup CPU quota"
    if count > 1:
        busy = busy_cores(since=_watch_start) if busy is None else busy
        idle = max(1, count - busy)
        if idle < count:
            return ThreadChoice(idle, f"{how}, {count - idle} busy with other processes")
    return ThreadChoice(count, how)


def training_threads(environ: dict[str, str] | None = None, busy: int | None = None) -> ThreadChoice:
    """The thread count for training on a CPU: :func:`inference_threads`' rule, with the idle physical cores
    shared among the training processes of one machine (``LOCAL_WORLD_SIZE`` under ``torchrun``), unless
    OMP_NUM_THREADS decides (``torchrun`` sets it to 1 per process unless told otherwise)."""
    environ = os.environ if environ is None else environ
    choice = inference_threads(environ=environ, busy=busy)
    if choice.reason.startswith("OMP_NUM_THREADS"):
        return choice
    try:
        processes = int(environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    except ValueError:
        processes = 1
    if processes > 1:
        share = max(1, choice.count // processes)
        return ThreadChoice(share, f"{choice.reason}, shared by {processes} training processes")
    return choice
