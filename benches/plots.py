"""PNG charts of a bench run (`run.py --plot DIR`), with matplotlib (the `bench` extra).

Owns `write(data, directory, growth=None) -> [paths]`:
- `req-per-cpu.png`: requests per CPU-second per scenario, one bar per target (the
  gateway and each peer), the figure the budget is written in;
- `latency-cdf.png`: the latency CDF of every closed-loop (and open-loop) result, from
  the quantiles the load generators export (`cdf_ms`), on a log scale;
- `cost-growth.png` (with `growth`, a `benches/growth.py --json` file): gateway
  CPU per request against the number of routes, on a log scale, and the other curves of
  that file beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write(data: dict[str, Any], directory: Path, growth: dict[str, Any] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    closed = [r for r in data["results"] if r.get("kind") == "closed" and r.get("req_per_cpu_s")]
    scenarios = list(dict.fromkeys(r["scenario"] for r in closed))
    targets = list(dict.fromkeys(r["target"] for r in closed))
    if closed:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scenarios)), 4))
        width = 0.8 / max(1, len(targets))
        for i, target in enumerate(targets):
            values = [next((r["req_per_cpu_s"] for r in closed if r["scenario"] == s and r["target"] == target), 0)
                      for s in scenarios]
            ax.bar([x + i * width for x in range(len(scenarios))], values, width, label=target)
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(scenarios))], scenarios)
        ax.set_ylabel("requests per CPU-second")
        ax.set_title("Requests per server CPU-second (higher is better)")
        ax.legend()
        fig.tight_layout()
        written.append(directory / "req-per-cpu.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    with_cdf = [r for r in data["results"] if r.get("cdf_ms")]
    if with_cdf:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in with_cdf:
            xs = [ms for _, ms in r["cdf_ms"]]
            ys = [q / 100.0 for q, _ in r["cdf_ms"]]
            ax.plot(xs, ys, marker=".", label=f"{r['target']} {r['scenario']} ({r['kind']})")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("share of requests answered within")
        ax.set_title("Latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(directory / "latency-cdf.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    curves = (growth or {}).get("results") or {}
    if curves.get("routes"):
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
        for ax, (dim, points) in zip(axes[0], curves.items(), strict=False):
            ax.plot([p[dim] for p in points], [p["us_cpu_per_req"] for p in points], marker="o")
            if dim in ("routes", "connections", "clients"):
                ax.set_xscale("log")
            ax.set_xlabel(dim)
            ax.set_ylabel("gateway us CPU per request")
            ax.set_ylim(bottom=0)
            ax.set_title(f"cost against {dim}")
        fig.tight_layout()
        written.append(directory / "cost-growth.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
