"""PNG plots of `neo-serve bench serve`: generated tokens/s and p50 time to first token against
the number of concurrent clients, one panel per model, one line per system. Needs matplotlib
(the `bench` extra); imported only when plots are asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STYLES = {"offline": ("black", "--", "s"), "baseline": ("tab:red", ":", "v")}
STAGE_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:orange"]

PLOTS = (  # file name, y label, value of a point, log y
    ("serve_bench_tokens_per_s.png", "generated tokens/s", lambda p: p["tokens_per_s"], False),
    ("serve_bench_ttft_p50.png", "time to first token p50 (ms)", lambda p: p["ttft_ms"]["p50"], True),
)


def plot_serve_bench(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the plots into `out_dir`; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    points = results["points"]
    models = list(dict.fromkeys(p["model"] for p in points))
    clients = sorted({p["clients"] for p in points})
    machine = results["machine"]
    caption = f"{machine['cpu']}, {machine['torch_threads']} threads per system"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, label, value, log_y in PLOTS:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            for system in dict.fromkeys(p["system"] for p in points if p["model"] == model):
                series = sorted((p["clients"], value(p)) for p in points
                                if p["model"] == model and p["system"] == system and value(p) is not None)
                if not series:
                    continue
                color, line, marker = _style(system)
                ax.plot([x for x, _ in series], [y for _, y in series], color=color, linestyle=line, marker=marker,
                        label=system)
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(n) for n in clients])
            ax.minorticks_off()
            if log_y:
                ax.set_yscale("log")
            ax.set_title(model)
            ax.set_xlabel("concurrent clients (N)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"neo-serve bench serve: {label}\n{caption}", fontsize="medium")
        fig.tight_layout()
        path = out_dir / file_name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _style(system: str) -> tuple[str, str, str]:
    if system in STYLES:
        return STYLES[system]
    if system.startswith("offline, paired with "):  # dashed, in the colour of its served system
        return _style(system.removeprefix("offline, paired with "))[0], "--", "s"
    # "neo-serve S stage(s)[, R replicas]": one colour per (S, R) for S, R in 1..2
    words = system.replace(",", "").split()
    stages = int(words[1]) if system.startswith("neo-serve ") else 1
    replicas = int(words[3]) if len(words) > 3 and words[4:5] == ["replicas"] else 1
    return STAGE_COLORS[(stages - 1 + 2 * (replicas - 1)) % len(STAGE_COLORS)], "-", "o"
