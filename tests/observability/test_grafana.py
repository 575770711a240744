"""`deploy/grafana/edgeplane.json`: an importable Grafana dashboard whose every expression
names only metrics that `GET /metrics` really exports.

- the dashboard's shape: unique panel ids, grid positions that fit and do not overlap,
  Prometheus targets with a `refId` and an `expr`, variables that exist;
- every PromQL expression (panel targets and the `label_values(...)` of the template
  variables) is reduced to the metric names it selects by `metric_names`, a small
  tokenizer; each name must be a sample name of a real gateway's scrape (with a config
  and traffic that make every family appear), so a misspelt name or a missing `_total`
  fails;
- the expressions parse: `promtool check rules` (Debian's `prometheus`) over them, the
  Grafana variables replaced by values.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, RawClient, base_config
from edgeplane.policies.api_keys.store import generate_key
from wsutil import connect_peer

pytestmark = pytest.mark.timeout(60)

DASHBOARD = REPO / "deploy" / "grafana" / "edgeplane.json"
PROMTOOL = shutil.which("promtool")
BUILTINS = {"__rate_interval", "__interval", "__range"}  # Grafana's own variables

# PromQL words that are not metric names: binary operators, modifiers, literals.
KEYWORDS = {"and", "or", "unless", "atan2", "by", "without", "on", "ignoring", "group_left", "group_right",
            "offset", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
# Label matchers {...}, ranges and subqueries [...], label lists by (...), on (...), ...
_LISTS = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                    re.IGNORECASE)
# An identifier not inside a number or a $variable, and not a function (followed by "(").
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_LABEL_VALUES = re.compile(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(...)` query) selects."""
    if m := _LABEL_VALUES.fullmatch(expr):
        expr = m.group(1) or ""  # label_values(label) alone names no metric
    rest = _LISTS.sub(" ", _STRING.sub('""', expr))
    return {name for name in _IDENT.findall(rest) if name.lower() not in KEYWORDS}


def test_the_extractor_finds_metric_names_and_nothing_else():
    e = 'sum(rate(edgeplane_requests_total{status=~"5.."}[5m])) by (route)'
    assert metric_names(e) == {"edgeplane_requests_total"}
    e = 'histogram_quantile(0.99, sum by (le, route) (rate(h_bucket{route=~"$route", x="rate(y)"}[$__rate_interval])))'
    assert metric_names(e) == {"h_bucket"}
    e = "a_total / on (job) group_left (hash) b_info offset 5m > bool 1e3 unless c or vector(0) and d[5m:1m]"
    assert metric_names(e) == {"a_total", "b_info", "c", "d"}
    assert metric_names('label_values(x_total{job=~"$job"}, route)') == {"x_total"}
    assert metric_names("label_values(route)") == set()
    assert metric_names("sum without (instance) (count_values('v', y))") == {"y"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    """Every panel, the panels of collapsed rows included."""
    return [q for p in panels for q in (p, *_panels(p.get("panels", [])))]


def _expressions(dash: dict) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    out = [(f"panel {p['id']} {p.get('title')!r} {t['refId']}", t["expr"])
           for p in _panels(dash["panels"]) for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append((f"variable {v['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def test_the_dashboard_is_an_importable_shape():
    dash = _dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert len(variables) == len(dash["templating"]["list"])
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "route"} <= variables.keys()
    for v in variables.values():  # `definition` is what the editor shows of the query
        if v["type"] == "query" and isinstance(v["query"], dict):
            assert v.get("definition", v["query"]["query"]) == v["query"]["query"], v["name"]
    panels = _panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys() and g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["id"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['id']} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["id"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["id"]
        assert all(isinstance(t["expr"], str) and t["expr"].strip() for t in p["targets"]), p["id"]
    for where, expr in _expressions(dash):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= variables.keys() | BUILTINS, (where, used)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package; "
                                             "scripts/test installs it)")
def test_every_expression_parses(tmp_path):
    """promtool parses each expression (as a recording rule), variables replaced by values."""
    def concrete(expr: str) -> str:
        expr = re.sub(r"\$\{?__(?:rate_interval|interval)\}?", "1m", expr).replace("$__range", "1h")
        return re.sub(r"\$\{?\w+\}?", ".*", expr)

    rules = []
    for i, (_, expr) in enumerate(_expressions(_dashboard())):
        if m := _LABEL_VALUES.fullmatch(expr):
            expr = m.group(1) or "vector(1)"
        rules.append({"record": f"dashboard:expr_{i}", "expr": concrete(expr)})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def _config(upstream_port: int, tmp_path) -> tuple[dict, str]:
    """Every family: a proxied route, a throttle, a JWT authorizer with a JWKS url, a
    custom authorizer, an API key with a usage plan quota, a WebSocket API. The demo
    upstream stands in for the JWKS endpoint and the authorizer (its echo is neither a
    key set nor an answer: a failed fetch, a failed call)."""
    demo = f"http://127.0.0.1:{upstream_port}"
    key, key_hash = generate_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{id: k1, hash: '{key_hash}', plan: free}}\n")
    mock = {"type": "mock"}
    cfg = base_config(upstream_port, routes=[
        {"route": "ANY /users/{id}", "integration": {"type": "http", "upstream": "demo"}},
        {"route": "GET /slow", "throttle": {"rate": 0.001, "burst": 1}, "integration": mock},
        {"route": "GET /jwt", "auth": "users", "integration": mock},
        {"route": "GET /custom", "auth": "custom", "integration": mock},
        {"route": "GET /plan", "auth": "partners", "integration": mock},
    ])
    cfg["authorizers"] = {
        "users": {"type": "jwt", "issuer": "https://auth.test/", "audience": ["api"], "algorithms": ["RS256"],
                  "jwks": {"url": demo + "/jwks.json"}},
        "custom": {"type": "http", "url": demo + "/authorize", "timeout": "500ms"},
        "partners": {"type": "api_key", "keys_file": str(keys)},
    }
    cfg["usage_plans"] = {"free": {"quota": {"limit": 1, "period": "DAY"}}}
    cfg["tracing"] = {"otlp": {"endpoint": demo + "/v1/traces"}}  # the demo answers 200: a stand-in collector
    cfg["data_dir"] = str(tmp_path / "data")
    cfg["websocket_apis"] = {"chat": {"path": "/chat", "routes": {"$default": {
        "integration": {"type": "http", "upstream": "demo"}, "return_response": True}}}}
    return cfg, key


async def _sample_names(admin) -> set[str]:
    c = await RawClient.connect(admin)
    try:
        r = await c.request("GET", "/metrics")
    finally:
        await c.close()
    assert r.status == 200, r.body
    return {s.name for f in text_string_to_metric_families(r.body.decode()) for s in f.samples}


async def test_every_expression_names_metrics_that_metrics_exports(upstream, gateway, tmp_path):
    cfg, key = _config(upstream.port, tmp_path)
    gw = await gateway(cfg)
    c = await RawClient.connect(gw.addresses[0])
    try:
        assert (await c.request("POST", "/users/1", body=b"hello")).status == 200
        assert [(await c.request("GET", "/slow")).status for _ in range(2)] == [200, 429]
        assert (await c.request("GET", "/jwt")).status == 401
        bad = {"authorization": "Bearer not.a.jwt"}  # twice: the second from the negative cache
        assert [(await c.request("GET", "/jwt", headers=bad)).status for _ in range(2)] == [401, 401]
        assert (await c.request("GET", "/custom", headers={"authorization": "x"})).status == 500
        statuses = [(await c.request("GET", "/plan", headers={"x-api-key": key})).status for _ in range(2)]
        assert statuses == [200, 429]
        assert (await c.request("GET", "/nowhere")).status == 404
    finally:
        await c.close()
    ws = await connect_peer(gw.addresses[0][1], handshake=True, target="/chat")
    ws.send_text('{"hello": 1}')
    await ws.recv_message()
    ws.close(1000)
    await ws.recv_close()
    for _ in range(50):  # messages and closes are counted once both legs have closed
        exported = await _sample_names(gw.admin_address)
        if "edgeplane_websocket_closes_total" in exported:
            break
        await asyncio.sleep(0.05)
    assert "edgeplane_requests" not in exported and "edgeplane_requests_total" in exported  # sample names

    unknown = []
    for where, expr in _expressions(_dashboard()):
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        unknown += [f"{where}: {name}" for name in sorted(names - exported)]
    assert not unknown, "not in /metrics:\n" + "\n".join(unknown)
