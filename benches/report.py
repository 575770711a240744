"""Bench report: owns the derived figures (CPU per request, ratios gateway/peer, the
budget rows) and their presentation as text tables; the JSON file is the
same data, written by run.py.

Definitions:
- `cpu_s`: utime+stime of every process of the server under test (supervisor and
  workers; nginx master and workers) over the measured window, read from /proc.
- `cpu_us_per_req` = cpu_s / requests; `req_per_cpu_s` = requests / cpu_s (the figure
  that survives noisy machines: it does not depend on how fast the load generator is).
- `cpu_util` = cpu_s / the load generator's measured duration (1.0 = one core busy; the
  CPU window also spans the generator's start-up and wind-down, when the server idles).
- ratio = gateway req_per_cpu_s / peer req_per_cpu_s, same scenario (for `full`, the
  peer's `plain`, since the peers have no authorizer/throttle/access log there).
"""

from __future__ import annotations

GATEWAY = "edgeplane"

BUDGET = [
    # (row, kind, scenario, peer, peer scenario, threshold, comparison): req per CPU-s ratios
    ("plain / nginx plain", "ratio", "plain", "nginx", "plain", 0.9, ">="),
    ("full / nginx plain", "ratio", "full", "nginx", "plain", 0.7, ">="),
    ("mock / nginx mock", "ratio", "mock", "nginx", "mock", 0.8, ">="),
    ("keepalive-off / nginx keepalive-off", "ratio", "keepalive-off", "nginx", "keepalive-off", 0.8, ">="),
    ("post-1k / nginx post-1k", "ratio", "post-1k", "nginx", "post-1k", 0.9, ">="),
    ("resp-64k / nginx resp-64k", "ratio", "resp-64k", "nginx", "resp-64k", 1.0, ">="),
    ("plain / Envoy plain", "ratio", "plain", "envoy", "plain", 2.5, ">="),
    ("cache-hit / nginx proxy_cache hit", "ratio", "cache-hit", "nginx", "cache-hit", 0.8, ">="),
    ("function (async handler) / nginx mock", "ratio", "function", "nginx", "mock", 0.5, ">="),
]


def derive(cpu_s: float, requests: int, wall_s: float) -> dict:
    return {
        "cpu_s": round(cpu_s, 3),
        "cpu_util": round(cpu_s / wall_s, 3) if wall_s > 0 else None,
        "cpu_us_per_req": round(cpu_s / requests * 1e6, 2) if requests else None,
        "req_per_cpu_s": round(requests / cpu_s) if cpu_s > 0 else None,
    }


def _find(results: list[dict], target: str, scenario: str, kind: str = "closed") -> dict | None:
    return next((r for r in results if r["target"] == target and r["scenario"] == scenario
                 and r.get("kind", "closed") == kind), None)


def ratios(results: list[dict], peers: list[str]) -> list[dict]:
    out = []
    for g in (r for r in results if r["target"] == GATEWAY and r.get("kind") == "closed"):
        for peer in peers:
            p = (_find(results, peer, g["peer_scenario"]) if g.get("peer_scenario") else None) \
                or _find(results, peer, g["scenario"]) \
                or (_find(results, peer, "plain") if g.get("peer_mode") is None else None)
            if p is None or not g.get("req_per_cpu_s") or not p.get("req_per_cpu_s"):
                continue
            out.append({
                "scenario": g["scenario"], "peer": peer, "peer_scenario": p["scenario"],
                "gateway_req_per_cpu_s": g["req_per_cpu_s"], "peer_req_per_cpu_s": p["req_per_cpu_s"],
                "ratio": round(g["req_per_cpu_s"] / p["req_per_cpu_s"], 3),
            })
    return out


def budget(results: list[dict], ratio_rows: list[dict]) -> list[dict]:
    rows = []
    for label, _kind, scen, peer, peer_scen, threshold, _cmp in BUDGET:
        r = next((x for x in ratio_rows if x["scenario"] == scen and x["peer"] == peer
                  and x["peer_scenario"] == peer_scen), None)
        rows.append(_row(label, f">= {threshold}", r and r["ratio"], r is not None and r["ratio"] >= threshold))
    ol = _find(results, GATEWAY, "plain", "open")
    p99 = ol and ol["latency_ms"]["p99"]
    rows.append(_row("plain p99 at 50% of capacity, open loop (ms)", "<= 2", p99,
                     p99 is not None and ol["errors_total"] == 0 and p99 <= 2.0))
    if ol and ol.get("note"):
        rows[-1]["note"] = "load generator was late; see the open-loop note"
    nginx_ol = _find(results, "nginx", "plain", "open")
    bound = nginx_ol and nginx_ol["latency_ms"]["p99"] * 1.2
    rows.append(_row("plain p99, open loop / nginx's at the same rate", "<= 1.2", p99 and bound and
                     round(p99 / nginx_ol["latency_ms"]["p99"], 2), bool(p99 and bound and p99 <= bound)))
    off, obs = _find(results, GATEWAY, "full-off"), _find(results, GATEWAY, "full-obs")
    if off and obs and off.get("req_per_cpu_s") and obs.get("req_per_cpu_s"):
        kept = round(obs["req_per_cpu_s"] / off["req_per_cpu_s"], 3)
        rows.append(_row("full-obs / full-off req per CPU-s (observability's cost)", ">= 0.9", kept, kept >= 0.9))
    plain = _find(results, GATEWAY, "plain")
    rss = plain and plain.get("rss_idle_worker_mib")
    rows.append(_row("RSS per idle worker (MiB)", "<= 60", rss, rss is not None and rss <= 60))
    for label, bound, where in (("memory per idle keep-alive connection (KiB)", "<= 5", "benches/idle_conns.py"),
                                ("memory per idle proxied WebSocket (KiB)", "<= 12", "benches/ws_bench.py")):
        rows.append({"row": label, "budget": bound, "measured": None, "met": None, "note": f"see {where}"})
    return rows


def _row(label: str, bound: str, value, met: bool) -> dict:
    return {"row": label, "budget": bound, "measured": value, "met": met if value is not None else None,
            "note": "" if value is not None else "not measured in this run"}


# --------------------------------------------------------------------------- text


def table(headers: list[str], rows: list[list], align_left: int = 2) -> str:
    """A plain-text table: the first `align_left` columns left-aligned, the rest right."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < align_left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(vals, widths, strict=False)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def results_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        scen = r["scenario"] + (" (open)" if r.get("kind") == "open" else "")
        rows.append([r["target"], scen, r["load"]["tool"], r["rps"], lat["p50"], lat["p90"], lat["p99"],
                     lat["p99.9"], r["errors_total"], r["cpu_s"], r["cpu_util"], r["cpu_us_per_req"],
                     r["req_per_cpu_s"], r.get("rss_idle_mib")])
    return table(["target", "scenario", "load", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors",
                   "CPU s", "CPU util", "us CPU/req", "req/CPU-s", "RSS idle MiB"], rows, align_left=3)


def ratios_table(rows: list[dict]) -> str:
    return table(["scenario", "peer", "gateway req/CPU-s", "peer req/CPU-s", "ratio"],
                  [[r["scenario"],
                    r["peer"] + ("" if r["peer_scenario"] == r["scenario"] else f" ({r['peer_scenario']})"),
                    r["gateway_req_per_cpu_s"], r["peer_req_per_cpu_s"], r["ratio"]] for r in rows])


def openloop_table(results: list[dict]) -> str:
    rows = [[r["target"], r["scenario"], r["load"]["rate"], r["rps"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
             r["latency_ms"]["p99.9"], r["latency_ms"]["max"], r["load"]["send_lag_ms"]["p99"],
             r["load"].get("waited_for_connection"), r["errors_total"], r["cpu_util"]]
            for r in results if r.get("kind") == "open"]
    return table(["target", "scenario", "rate", "achieved", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                   "send lag p99 ms", "waited", "errors", "CPU util"], rows)


def budget_table(rows: list[dict]) -> str:
    return table(["budget row", "budget", "measured", "met", "note"],
                  [[r["row"], r["budget"], r["measured"], r["met"], r["note"]] for r in rows], align_left=5)
