"""What a process costs, read straight from /proc (Linux): CPU seconds and memory.

`utime + stime` from `/proc/<pid>/stat` counts every thread the process ever ran,
including ones that have exited, in clock ticks (usually 10 ms); phases last seconds,
so the resolution is a percent or better.
"""

from __future__ import annotations

import os
import platform
import timeit
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces; everything after its ")" is fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def system_seconds(pid: int) -> float:
    """The kernel's share of `cpu_seconds` (syscalls, wake-ups, socket work)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2 :].split()[12]) / _TICKS


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine has spent not idle (all processes), from
    /proc/stat: user, nice, system, irq, softirq and steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def load_average() -> float:
    """The 1-minute load average: how busy the machine was before we started."""
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int  # bytes resident now (VmRSS)
    peak: int  # bytes resident at the process's peak (VmHWM)


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return Memory(rss=values["VmRSS"], peak=values["VmHWM"])


@dataclass(frozen=True, slots=True)
class Machine:
    cpus: int
    cpu_model: str
    python: str
    kernel: str

    def describe(self) -> str:
        return f"{self.cpus} CPUs ({self.cpu_model}), Linux {self.kernel}, Python {self.python}"


def machine() -> Machine:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return Machine(
        cpus=len(os.sched_getaffinity(0)),
        cpu_model=model,
        python=platform.python_version(),
        kernel=platform.release(),
    )


def speed_gauge_ms() -> float:
    """Best of five timings of one fixed pure-Python loop, in ms: how fast this host runs
    this interpreter right now. A shared VM's speed drifts by half from day to day;
    runs read apart only compare at similar gauges (the ratios in one run always do)."""
    return min(timeit.repeat("sum(range(10**6))", repeat=5, number=3)) / 3 * 1000
