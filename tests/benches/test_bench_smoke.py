"""The bench never rots: `benches/run.py --smoke` end to end, plus the pieces of the
load generation it cannot exercise on a machine without wrk.

The smoke run uses the bundled Python load generator (no wrk, nginx, haproxy or Envoy
needed): it starts the demo upstream and the gateway as processes, runs plain + mock
closed-loop and plain open-loop for about a second each, and writes JSON; here we
assert the figures are sane.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

BENCHES = REPO / "benches"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHES / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())

    assert data["smoke"] == {"ok": True, "failures": []}
    assert data["meta"]["load_generator"] == "python"
    runs = {(r["target"], r["scenario"], r["kind"]): r for r in data["results"]}
    assert set(runs) == {("edgeplane", "plain", "closed"), ("edgeplane", "plain", "open"),
                         ("edgeplane", "mock", "closed")}
    for key, r in runs.items():
        assert r["requests"] > 0, key
        assert r["errors_total"] == 0, (key, r["errors"])
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], (key, lat)
        assert r["cpu_s"] >= 0
    for key in (("edgeplane", "plain", "closed"), ("edgeplane", "mock", "closed")):
        r = runs[key]
        assert r["cpu_us_per_req"] > 0 and r["req_per_cpu_s"] > 0, r
        assert 0 < r["rss_idle_mib"] < 1024, r
    ol = runs[("edgeplane", "plain", "open")]
    assert ol["load"]["mode"] == "open" and ol["load"]["rate"] > 0
    assert ol["requests"] == ol["load"]["scheduled"]  # every due request was answered
    assert "plain" in proc.stdout and "req/CPU-s" in proc.stdout


def test_help_lists_every_scenario_and_option():
    proc = subprocess.run([sys.executable, str(BENCHES / "run.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for word in ("plain", "full", "mock", "post-1k", "resp-64k", "keepalive-off", "--compare", "--duration",
                 "--warmup", "--connections", "--workers", "--quick", "--smoke", "--json"):
        assert word in proc.stdout, word


def test_wrk_result_parsing():
    wrkrun = _load("wrkrun")
    text = ("Running 1s test @ http://127.0.0.1:1/2b\n"
            'BENCH_RESULT {"requests": 5000, "duration_us": 1000000, "bytes": 1, '
            '"errors": {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}, '
            '"latency_us": {"p50": 100.0, "p90": 200.0, "p99": 900.0, "p99.9": 1500.0, "max": 2000.0, '
            '"mean": 120.0}}\n')
    r = wrkrun.parse(text, 64, True)
    assert r["requests"] == 5000 and r["rps"] == 5000.0 and r["errors_total"] == 3
    assert r["latency_ms"]["p99"] == 0.9
    lua = wrkrun.script("POST", 1024)
    assert 'wrk.method = "POST"' in lua and 'string.rep("x", 1024)' in lua and "function done" in lua


def test_loadgen_histogram_percentiles():
    loadgen = _load("loadgen")
    h = loadgen.Histogram()
    for i in range(1, 1001):  # 1 ms .. 1000 ms
        h.add(i / 1000.0)
    assert h.percentile_ms(50) == pytest.approx(500, rel=0.02)
    assert h.percentile_ms(99) == pytest.approx(990, rel=0.02)
    assert h.summary_ms()["max"] == pytest.approx(1000, rel=1e-6)


@pytest.mark.timeout(120)
def test_a_user_benchmarks_their_own_config_and_the_budget_check(tmp_path):
    cfg = tmp_path / "own.yaml"
    cfg.write_text('listen: ["127.0.0.1:8080"]\nadmin: {listen: "127.0.0.1:9901", insecure: true}\n'
                   'access_log: {destination: "off"}\nroutes:\n'
                   '  - {route: "GET /hello", match: {headers: {x-bench: "1"}}, integration: {type: mock, body: hi}}\n')
    out = tmp_path / "own.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHES / "run.py"), "--config", str(cfg), "--request", "GET /hello", "-H", "X-Bench: 1",
         "--duration", "1", "--warmup", "0.3", "--connections", "4", "--loadgen", "python", "--check",
         "--json", str(out)], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (own,) = [r for r in data["results"] if r["scenario"] == "own"]
    assert own["requests"] > 0 and own["errors_total"] == 0  # the header reached the conditional route
    from edgeplane.http import native
    assert data["meta"]["provenance"]["python"]
    assert data["meta"]["provenance"]["hot_path"] == ("compiled" if native.COMPILED else native.WHY)
    assert "legend:" in proc.stdout and "check: every measured budget row is met" in proc.stdout
    assert "issue" not in proc.stdout.lower()  # budgets, not tracker words


def test_compare_marks_changes_past_the_noise_band(tmp_path, capsys):
    compare = _load("compare")

    def run(rate: float, p99: float) -> dict:
        return {"meta": {"provenance": {"commit": "abc", "python": "3.11"}},
                "results": [{"target": "edgeplane", "scenario": "plain", "kind": "closed", "req_per_cpu_s": rate,
                             "latency_ms": {"p99": p99}},
                            {"target": "nginx", "scenario": "plain", "kind": "closed", "req_per_cpu_s": 100_000,
                             "latency_ms": {"p99": 1.0}}]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(30_000, 2.0)))
    b.write_text(json.dumps(run(27_000, 2.5)))
    assert compare.main([str(a), str(b), "--fail-on-regression"]) == 2
    out = capsys.readouterr().out
    assert "-10.0%" in out and "WORSE" in out and "regressions past the band: plain (closed): -10.0%" in out
    b.write_text(json.dumps(run(30_900, 2.0)))
    assert compare.main([str(a), str(b), "--fail-on-regression"]) == 0  # +3 %: noise


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (`pip install -e '.[test]'` installs it)")
    plots = _load("plots")
    cdf = [[q, q / 10] for q in (1, 50, 99, 99.9)]
    data = {"results": [{"target": t, "scenario": s, "kind": "closed", "req_per_cpu_s": n, "cdf_ms": cdf}
                        for t, s, n in (("edgeplane", "plain", 30_000), ("nginx", "plain", 90_000),
                                        ("edgeplane", "mock", 70_000))]}
    growth = {"results": {"routes": [{"routes": n, "us_cpu_per_req": 30.0} for n in (10, 1000, 10000)]}}
    written = plots.write(data, tmp_path / "charts", growth=growth)
    assert [p.name for p in written] == ["req-per-cpu.png", "latency-cdf.png", "cost-growth.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
