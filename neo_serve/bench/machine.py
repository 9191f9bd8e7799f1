"""What the machine did beside a benchmark: CPU steal, shared by `neo-serve bench` and
`neo-serve bench serve`."""

from __future__ import annotations

STEAL_WARNING = 0.10  # a measurement with more CPU steal than this is flagged in the reports


class StealMeter:
    """Share of this machine's CPU time the hypervisor gave to other guests while a point ran
    (`steal` in /proc/stat). On a shared VM it comes and goes within minutes and can take half
    of what the model would get, so a point measured under it is not comparable with one
    measured without."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None  # not Linux: unknown
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        return fields[7] if len(fields) > 7 else 0, sum(fields[:8])

    def fraction(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return (end[0] - self._start[0]) / (end[1] - self._start[1])


def format_steal(value: float | None) -> str:
    """A steal share for the reports: "12%", or "?" where it is unknown."""
    return "?" if value is None else f"{value:.0%}"
