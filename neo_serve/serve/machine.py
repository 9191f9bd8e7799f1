"""How many cores this process may use: what `neo-serve up` sizes its stages' threads by."""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (`docker run --cpus 2`, a Pod's CPU limit),
    or None without one: cgroup v2's `cpu.max` ("200000 100000"; "max ..." is no limit), else v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 is no limit). Neither the affinity mask nor
    torch's thread count sees a quota, and a 2-CPU quota on a 64-core host would otherwise get 63
    threads per step, each descheduled in turn at the quota's end."""
    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(root, *parts)) as file:
                return file.read().strip()
        except OSError:
            return None

    try:
        v2 = read("cpu.max")
        if v2 is not None:
            quota, period = v2.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota, period = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
        if quota is None or period is None or int(quota) < 0:
            return None
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # a file we cannot read as a quota: none
        return None


def available_cores(cgroup_root: str = CGROUP_ROOT) -> int:
    """Cores this process may use: its affinity mask, capped by its cgroup's CPU quota, whole
    cores only (at least one). Ray 2.60 counts a quota's CPUs the same way (truncated): a 1.5-CPU
    quota is 1 here and in Ray, so what `neo-serve up` reserves and what Ray offers agree."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else max(1, min(cores, math.floor(limit)))
