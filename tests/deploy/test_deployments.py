"""Deployments through the real command line and real gateways: `deploy`, `deployments`,
`rollback` and `canary promote|abort` write the store (SQLite in the data directory,
or a real redis-server with `cluster:`), and a running `edgeplane serve` (one process
or workers) serves each change live, with no request failing meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_processes import _start_serve, _stop

from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(90)


def api_config(tmp_path: Path, version: str, **extra) -> dict:
    """A config whose mock route answers which API `version` it is, on dev and prod."""
    cfg = base_config(routes=[
        {"route": "GET /version", "integration": {"type": "mock", "body": {
            "version": version, "backend": "${stageVariables.backend}"}}},
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "users"}},
    ])
    cfg["upstreams"] = {"users": {"targets": ["http://127.0.0.1:9"]}, "users_next": {"targets": ["http://127.0.0.1:9"]}}
    cfg["stages"] = {"dev": {"variables": {"backend": "users_next"}}, "prod": {"variables": {"backend": "users"}}}
    cfg["data_dir"] = str(tmp_path / "data")
    cfg.update(extra)
    return cfg


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeplane", *args], capture_output=True, text=True, timeout=60)


def deploy(path: Path, stage: str, message: str = "") -> str:
    done = cli("deploy", "-c", str(path), "--stage", stage, "-m", message)
    assert done.returncode == 0, done.stderr
    return re.match(r"deployed (d-[0-9a-f]{8}) ", done.stdout).group(1)  # type: ignore[union-attr]


async def version(addr, path: str, headers: dict | None = None) -> str:
    r = await RawClient.once(addr, "GET", path, headers=headers)
    assert r.status == 200, (r.status, r.body)
    return json.loads(r.body)["version"]


def test_deploy_deployments_and_rollback_record_and_print_the_history(tmp_path):
    path = write(tmp_path / "api.yaml", api_config(tmp_path, "v1"))
    done = cli("deploy", "-c", str(path), "--stage", "prod", "-m", "first release")
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    first = re.fullmatch(r"deployed (d-[0-9a-f]{8}) to stage prod \(was the config file's API\); "
                         r"sha256 ([0-9a-f]{12}): \"first release\"\n.*\n", done.stdout)
    assert first is not None, done.stdout
    d1 = first.group(1)
    # immutable: the file as written, its hash, kept in the data directory
    assert (tmp_path / "data" / "deployments" / f"{d1}.yaml").read_text() == text
    assert hashlib.sha256(text.encode()).hexdigest().startswith(first.group(2))
    write(path, api_config(tmp_path, "v2"))
    d2 = deploy(path, "prod", "second")
    listing = cli("deployments", "-c", str(path))
    assert listing.returncode == 0
    rows = listing.stdout.splitlines()
    assert rows[0].split() == ["ID", "CREATED", "SHA256", "STAGES", "DESCRIPTION"]
    assert rows[1].startswith(d1) and rows[1].split()[3:] == ["-", "first", "release"]
    assert rows[2].startswith(d2) and rows[2].split()[3:] == ["prod", "second"]
    # rollback: to the one before; again: back to the other (history is kept, never rewritten)
    back = cli("rollback", "-c", str(path), "--stage", "prod")
    assert back.returncode == 0 and back.stdout.startswith(f"stage prod: {d2} -> {d1} (rollback)")
    assert cli("rollback", "-c", str(path), "--stage", "prod").stdout.startswith(f"stage prod: {d1} -> {d2}")
    history = json.loads(cli("deployments", "-c", str(path), "--stage", "prod", "--format", "json").stdout)
    assert [(r["action"], r["deployment"]) for r in history["history"]] == [
        ("deploy", d1), ("deploy", d2), ("rollback", d1), ("rollback", d2)]
    human = cli("deployments", "-c", str(path), "--stage", "prod").stdout.splitlines()
    assert human[-1].startswith("* ") and human[-1].split()[2:4] == ["rollback", d2]
    assert cli("rollback", "-c", str(path), "--stage", "prod", "--to", d1).returncode == 0
    # refusals: exit 1, a message, nothing written
    for command, args, message in [
        (["rollback"], ("--stage", "prod", "--to", "d-0badc0de"), "no deployment d-0badc0de in "),
        (["rollback"], ("--stage", "dev"), "stage dev has no deployments to roll back"),
        (["deploy"], ("--stage", "qa"), "unknown stage 'qa' (stages in "),
        (["canary", "promote"], ("--stage", "prod"), "stage prod has no running canary"),
    ]:
        refused = cli(*command, "-c", str(path), *args)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    assert len(json.loads(cli("deployments", "-c", str(path), "--stage", "prod", "--format", "json")
                          .stdout)["history"]) == 5


async def test_a_stage_serves_its_deployment_and_a_host_change_that_breaks_it_is_refused(gateway, tmp_path):
    path = write(tmp_path / "api.yaml", api_config(tmp_path, "v1"))
    d1 = deploy(path, "prod")
    write(path, api_config(tmp_path, "v2"))
    gw = await gateway(str(path))
    addr = gw.addresses[0]
    # prod serves its deployment; dev, with none, the file as it is now
    assert [await version(addr, "/prod/version"), await version(addr, "/dev/version")] == ["v1", "v2"]
    # the host drops the upstream prod's deployment needs: validate and reload refuse it, located
    broken = api_config(tmp_path, "v2")
    broken["upstreams"].pop("users")
    broken["routes"].pop()
    broken["stages"]["prod"]["variables"]["backend"] = "users_next"
    write(path, broken)
    done = cli("validate", "-c", str(path))
    assert done.returncode == 1
    assert f"stage 'prod' serving deployment {d1}: routes[1].integration.upstream: " in done.stderr, done.stderr
    with pytest.raises(Exception) as refused:
        await gw.reload_from_source()
    assert f"deployment {d1}" in str(refused.value)
    assert await version(addr, "/prod/version") == "v1"  # the running config keeps serving


@pytest.mark.parametrize("workers", [1, 2])
async def test_deploy_and_rollback_are_served_live_with_no_request_failing(tmp_path, workers):
    path = tmp_path / "gw.yaml"
    cfg = api_config(tmp_path, "v1")
    d1 = deploy(write(path, cfg), "prod", "v1")
    proc, addr, _admin, lines, drain = await _start_serve(tmp_path, cfg, "--workers", str(workers))
    # per connection, each version it saw in turn (with workers, each worker switches on its
    # own: two connections may see a switch a few ms apart, but none may go back)
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[object] = []
    stop = asyncio.Event()

    async def load(mine: list[str]) -> None:
        c = await RawClient.connect(addr)
        try:
            while not stop.is_set():
                r = await c.request("GET", "/prod/version")
                if r.status != 200:
                    failures.append((r.status, r.body))
                elif not mine or mine[-1] != json.loads(r.body)["version"]:
                    mine.append(json.loads(r.body)["version"])
        except Exception as exc:  # a reset or a timeout: a failed request
            failures.append(exc)
        finally:
            await c.close()

    async def until(expected: str) -> None:
        for _ in range(100):
            if all(mine and mine[-1] == expected for mine in seen):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{expected} not served within 5 s: {seen}\n{''.join(lines)}")

    try:
        clients = [asyncio.ensure_future(load(mine)) for mine in seen]
        await until("v1")
        write(path, api_config(tmp_path, "v2"))  # the file changes: prod stays on its deployment
        await asyncio.sleep(0.3)
        d2 = await asyncio.to_thread(deploy, path, "prod", "v2")
        await until("v2")
        done = await asyncio.to_thread(cli, "rollback", "-c", str(path), "--stage", "prod")
        assert done.stdout.startswith(f"stage prod: {d2} -> {d1}")
        await until("v1")
        stop.set()
        await asyncio.gather(*clients)
    finally:
        stop.set()
        assert await _stop(proc, drain) == 0
    assert failures == []
    assert seen == [["v1", "v2", "v1"]] * 4
    assert any("deployment store" in line and "reloading" in line for line in lines)


async def test_a_canary_serves_another_deployment_and_is_promoted_or_aborted_live(tmp_path):
    path = tmp_path / "gw.yaml"
    cfg = api_config(tmp_path, "v1")
    d1 = deploy(write(path, cfg), "prod")
    write(path, api_config(tmp_path, "v2"))
    d2 = deploy(path, "dev")
    cfg["stages"]["prod"]["canary"] = {"deployment": d2, "percent": 10.0, "force_header": "x-edgeplane-canary",
                                       "variable_overrides": {"backend": "users_next"}}
    cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "access.log"),
                         "format": "$context.stage $context.isCanaryRequest"}
    write(path, cfg)
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        always, never = {"x-edgeplane-canary": "always"}, {"x-edgeplane-canary": "never"}
        assert await version(addr, "/prod/version", always) == "v2"
        assert await version(addr, "/prod/version", never) == "v1"
        r = await RawClient.once(addr, "GET", "/prod/version", headers=always)
        assert json.loads(r.body)["backend"] == "users_next"  # the canary's variable overrides
        sides = [await version(addr, "/prod/version") for _ in range(200)]
        assert 0 < sides.count("v2") < 60, sides.count("v2")  # 10 %: p(outside) < 1e-6
        m = await RawClient.once(admin, "GET", "/metrics")
        assert re.search(rb'edgeplane_requests_total\{[^}]*canary="true"[^}]*stage="prod"', m.body), m.body[:400]
        done = await asyncio.to_thread(cli, "canary", "promote", "-c", str(path), "--stage", "prod")
        assert done.returncode == 0 and f"{d2} serves every request" in done.stdout, done.stderr
        for _ in range(100):  # within the poll interval
            if await version(addr, "/prod/version", never) == "v2":
                break
            await asyncio.sleep(0.05)
        assert {await version(addr, "/prod/version") for _ in range(50)} == {"v2"}
        r = await RawClient.once(addr, "GET", "/prod/version")
        assert json.loads(r.body)["backend"] == "users_next"  # the overrides were promoted too
        again = await asyncio.to_thread(cli, "canary", "abort", "-c", str(path), "--stage", "prod")
        assert again.returncode == 1 and "(this one was promoted or aborted)" in again.stderr
        history = json.loads(cli("deployments", "-c", str(path), "--stage", "prod", "--format", "json").stdout)
        assert [(r["action"], r["deployment"]) for r in history["history"]] == [("deploy", d1), ("promote", d2)]
        # a new canary (another percent) runs again, and abort removes it
        cfg["stages"]["prod"]["canary"]["percent"] = 50.0
        cfg["stages"]["prod"]["canary"]["deployment"] = d1
        write(path, cfg)
        assert cli("reload", "--admin", f"{admin[0]}:{admin[1]}").returncode == 0
        assert await version(addr, "/prod/version", always) == "v1"
        assert cli("canary", "abort", "-c", str(path), "--stage", "prod").returncode == 0
        for _ in range(100):
            if await version(addr, "/prod/version", always) == "v2":
                break
            await asyncio.sleep(0.05)
        assert await version(addr, "/prod/version", always) == "v2"  # no canary: the force header does nothing
    finally:
        assert await _stop(proc, drain) == 0
    logged = (tmp_path / "access.log").read_text().splitlines()
    assert "prod true" in logged and "prod false" in logged


async def test_two_hosts_share_deployments_through_redis_and_keep_serving_without_it(tmp_path, redis_server):
    hosts = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = api_config(tmp_path / name, "v1", cluster={"redis": redis_server.url})
        hosts.append((tmp_path / name, cfg))
    path_a = write(hosts[0][0] / "gw.yaml", hosts[0][1])
    d1 = deploy(path_a, "prod", "v1")
    started = [await _start_serve(folder, cfg) for folder, cfg in hosts]
    try:
        addrs = [s[1] for s in started]
        assert [await version(a, "/prod/version") for a in addrs] == ["v1", "v1"]
        write(path_a, api_config(hosts[0][0], "v2", cluster={"redis": redis_server.url}))
        d2 = deploy(path_a, "prod", "v2")  # recorded by host a's command: both hosts serve it
        for _ in range(100):
            if [await version(a, "/prod/version") for a in addrs] == ["v2", "v2"]:
                break
            await asyncio.sleep(0.05)
        assert [await version(a, "/prod/version") for a in addrs] == ["v2", "v2"]
        redis_server.kill()  # out of reach: both keep serving what they have, and say so
        await asyncio.sleep(1.5)
        assert [await version(a, "/prod/version") for a in addrs] == ["v2", "v2"]
        refused = cli("rollback", "-c", str(path_a), "--stage", "prod")
        assert refused.returncode == 1 and "deployment store redis" in refused.stderr
        # a reload while Redis is down serves the deployments last read on this host
        b_admin = started[1][2]
        assert cli("reload", "--admin", f"{b_admin[0]}:{b_admin[1]}").returncode == 0
        assert await version(addrs[1], "/prod/version") == "v2"
        redis_server.start()  # back (empty: this one keeps no data); a new deploy reaches both
        await asyncio.sleep(1.2)
        write(path_a, api_config(hosts[0][0], "v3", cluster={"redis": redis_server.url}))
        d3 = deploy(path_a, "prod", "v3")
        for _ in range(100):
            if [await version(a, "/prod/version") for a in addrs] == ["v3", "v3"]:
                break
            await asyncio.sleep(0.05)
        assert [await version(a, "/prod/version") for a in addrs] == ["v3", "v3"]
    finally:
        for proc, _addr, _admin, _lines, drain in started:
            assert await _stop(proc, drain) == 0
    logs = "".join(started[0][3])
    assert "serving what was deployed before" in logs and "reachable again" in logs
    assert len({d1, d2, d3}) == 3


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_commands_racing_on_one_stage_cannot_undo_each_other(tmp_path, backend, request):
    extra = {"cluster": {"redis": request.getfixturevalue("redis_server").url}} if backend == "redis" else {}
    path = write(tmp_path / "api.yaml", api_config(tmp_path, "v1", **extra))
    racers = [subprocess.Popen([sys.executable, "-m", "edgeplane", "deploy", "-c", str(path), "--stage", "prod",
                                "-m", f"racer {i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(6)]
    outcomes = [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in racers]  # type: ignore[union-attr]
    won = [out for code, out, _ in outcomes if code == 0]
    lost = [err for code, _, err in outcomes if code != 0]
    assert won and all("changed while this command ran" in err and "nothing was changed" in err for err in lost)
    history = json.loads(cli("deployments", "-c", str(path), "--stage", "prod", "--format", "json").stdout)["history"]
    assert len(history) == len(won)
    # each winner's "(was X)" is the record before its own: no write was based on a stale read
    was = {re.match(r"deployed (d-\w+) to stage prod \(was ([^)]*)\)", out).groups() for out in won}  # type: ignore
    chain = {(r["deployment"], prev["deployment"] if prev else "the config file's API")
             for prev, r in zip([None, *history], history, strict=False)}
    assert was == chain


async def test_a_promotion_is_undone_by_rollback_and_a_deployment_is_a_snapshot(tmp_path, monkeypatch, gateway):
    cfg = api_config(tmp_path, "${RELEASE_NAME}")
    # (0 %: no request goes to it by chance; promoting it is what this test is about)
    cfg["stages"]["prod"]["canary"] = {"percent": 0.0, "variable_overrides": {"backend": "users_next"}}
    path = write(tmp_path / "api.yaml", cfg)
    done = subprocess.run([sys.executable, "-m", "edgeplane", "deploy", "-c", str(path), "--stage", "prod"],
                          capture_output=True, text=True, env={**os.environ, "RELEASE_NAME": "resolved-at-deploy"})
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("RELEASE_NAME", "the-gateways-own")  # what the file says now: dev serves it
    gw = await gateway(str(path))
    addr = gw.addresses[0]
    r = await RawClient.once(addr, "GET", "/prod/version")
    assert json.loads(r.body) == {"version": "resolved-at-deploy", "backend": "users"}
    assert await version(addr, "/dev/version") == "the-gateways-own"
    promoted = cli("canary", "promote", "-c", str(path), "--stage", "prod")
    assert promoted.returncode == 0, promoted.stderr
    await gw.reload_from_source()
    r = await RawClient.once(addr, "GET", "/prod/version")
    assert json.loads(r.body) == {"version": "resolved-at-deploy", "backend": "users_next"}  # the overrides, kept
    back = cli("rollback", "-c", str(path), "--stage", "prod")
    assert back.returncode == 0 and " (rollback)" in back.stdout, back.stderr
    await gw.reload_from_source()
    r = await RawClient.once(addr, "GET", "/prod/version")
    assert json.loads(r.body)["backend"] == "users"  # the promotion's variables are gone with it
    # a recorded API changed on disk is refused: the gateway keeps what it read, and says why
    (d_id,) = [p.name.split(".")[0] for p in (tmp_path / "data" / "deployments").glob("*.api.json")]
    api_file = tmp_path / "data" / "deployments" / f"{d_id}.api.json"
    api_file.write_text(api_file.read_text().replace("resolved-at-deploy", "tampered"))
    import edgeplane.deploy.served as served

    served._apis.clear()  # as a freshly started process would (the cache is per process)
    refused = cli("rollback", "-c", str(path), "--stage", "prod", "--to", d_id)
    assert refused.returncode == 1 and "does not match the sha256 it was recorded with" in refused.stderr
    await gw.reload_from_source()
    assert await version(addr, "/prod/version") == "resolved-at-deploy"


async def test_workers_serve_a_canary_given_as_a_relative_config_file(tmp_path):
    cfg = api_config(tmp_path, "v1")
    write(tmp_path / "next.yaml", api_config(tmp_path, "v2"))
    cfg["stages"]["prod"]["canary"] = {"deployment": "next.yaml", "percent": 0.0, "force_header": "x-side"}
    proc, addr, _admin, lines, drain = await _start_serve(tmp_path, cfg, "--workers", "2")
    try:
        assert await version(addr, "/prod/version", {"x-side": "always"}) == "v2"
        assert await version(addr, "/prod/version") == "v1"
    finally:
        assert await _stop(proc, drain) == 0


async def test_a_deployed_stage_keeps_its_authorizers_per_stage_and_side(gateway, tmp_path):
    from authorizer_peer import AuthorizerPeer
    from ws_peers import WsClient

    def decide(event: dict) -> dict:
        return {"isAuthorized": event["headers"].get("authorization") == "good"}

    peers = {name: await AuthorizerPeer(decide).start() for name in ("dev", "prod", "next")}
    try:
        cfg = api_config(tmp_path, "v1")
        cfg["routes"][0]["auth"] = "custom"
        cfg["authorizers"] = {"custom": {"type": "http", "url": "${stageVariables.authorizer}", "result_ttl": "0s"}}
        cfg["stages"]["dev"]["variables"]["authorizer"] = peers["dev"].url
        cfg["stages"]["prod"]["variables"]["authorizer"] = peers["prod"].url
        cfg["stages"]["prod"]["canary"] = {"percent": 0.0, "force_header": "x-side",
                                           "variable_overrides": {"authorizer": peers["next"].url}}
        cfg["websocket_apis"] = {"chat": {"path": "/chat", "routes": {"$connect": {
            "auth": "custom", "integration": {"type": "http", "upstream": "users", "path": "/connect"}}}}}
        path = write(tmp_path / "api.yaml", cfg)
        deploy(path, "prod")
        gw = await gateway(str(path))
        addr = gw.addresses[0]

        async def status(target: str, **headers: str) -> int:
            return (await RawClient.once(addr, "GET", target, headers=headers)).status

        for side in ({}, {"x-side": "always"}):
            assert await status("/prod/version", **side) == 401  # no credential: refused, never open
            assert await status("/prod/version", authorization="bad", **side) == 403
            assert await status("/prod/version", authorization="good", **side) == 200
        assert (len(peers["prod"].seen), len(peers["next"].seen)) == (2, 2)  # each side its own URL
        ws = await WsClient.connect(addr, "/prod/chat")
        assert ws.status == 401  # a $connect authorizer from a stage variable runs too
        await ws.aclose()
        # stable names: the stage and side, never the deployment id
        names = set(gw.config.authorizers)
        assert {"custom@prod", "custom@prod:canary", "custom@dev"} <= names
        assert not any("@d-" in n for n in names)
        assert cli("canary", "promote", "-c", str(path), "--stage", "prod").returncode == 0
        await gw.reload_from_source()
        assert await status("/prod/version") == 401
        assert await status("/prod/version", authorization="good") == 200
        assert (len(peers["prod"].seen), len(peers["next"].seen)) == (2, 3)  # promoted: the canary's URL is prod's
    finally:
        for peer in peers.values():
            peer.close()


async def test_a_promoted_variable_moves_a_deployed_stage_to_its_target(gateway, tmp_path):
    from edgeplane.runtime.demo_upstream import DemoUpstream

    async with DemoUpstream() as stable, DemoUpstream() as nxt:
        cfg = api_config(tmp_path, "v1")
        cfg["upstreams"]["users"] = {"targets": ["http://127.0.0.1:${stageVariables.port}"]}
        cfg["stages"]["dev"]["variables"]["port"] = str(nxt.port)
        cfg["stages"]["prod"]["variables"]["port"] = str(stable.port)
        cfg["stages"]["prod"]["canary"] = {"percent": 0.0, "force_header": "x-side",
                                           "variable_overrides": {"port": str(nxt.port)}}
        path = write(tmp_path / "api.yaml", cfg)
        deploy(path, "prod")
        gw = await gateway(str(path))

        async def hit(**headers: str) -> None:
            assert (await RawClient.once(gw.addresses[0], "GET", "/prod/users/1", headers=headers)).status == 200

        await hit()
        await hit(**{"x-side": "always"})
        assert (stable.requests, nxt.requests) == (1, 1)
        assert cli("canary", "promote", "-c", str(path), "--stage", "prod").returncode == 0
        await gw.reload_from_source()
        await hit()
        assert (stable.requests, nxt.requests) == (1, 2)  # the promoted port: prod's copy resolves to it
        assert "users@prod" in gw.config.upstreams and "users@prod:canary" not in gw.config.upstreams


async def test_a_deployed_stage_verifies_a_jwt_audience_from_its_stage_variable(gateway, tmp_path):
    import base64
    import hashlib
    import hmac
    import time

    secret = b"deployments-test-secret-0123456789"
    (tmp_path / "secret").write_bytes(secret)

    def token(audience: str) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps({"iss": "https://auth.test/", "aud": audience, "exp": int(time.time()) + 60}).encode())
        return f"{head}.{body}.{b64(hmac.new(secret, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"

    cfg = api_config(tmp_path, "v1")
    cfg["routes"][0]["auth"] = "users"
    cfg["authorizers"] = {"users": {"type": "jwt", "issuer": "https://auth.test/", "algorithms": ["HS256"],
                                    "audience": "${stageVariables.aud}",
                                    "hs_secret": {"file": str(tmp_path / "secret")}}}
    cfg["stages"]["dev"]["variables"]["aud"] = "api-dev"
    cfg["stages"]["prod"]["variables"]["aud"] = "api"
    deploy(write(tmp_path / "api.yaml", cfg), "prod")
    gw = await gateway(str(tmp_path / "api.yaml"))

    async def status(path: str, audience: str) -> int:
        headers = {"authorization": f"Bearer {token(audience)}"}
        return (await RawClient.once(gw.addresses[0], "GET", path, headers=headers)).status

    assert [await status("/prod/version", "api"), await status("/prod/version", "api-dev"),
            await status("/dev/version", "api-dev"), await status("/dev/version", "api")] == [200, 401, 200, 401]


async def test_an_authorizer_no_stage_serves_is_not_started(gateway, tmp_path):
    from jwks_peer import EmptyJwks

    jwks = await EmptyJwks().start()
    try:
        path = write(tmp_path / "api.yaml", api_config(tmp_path, "v1"))
        deploy(path, "dev")
        deploy(path, "prod")  # both stages serve routes without an authorizer
        later = api_config(tmp_path, "v2")
        later["routes"][0]["auth"] = "files_own"
        later["authorizers"] = {"files_own": {"type": "jwt", "issuer": "https://auth.test/", "audience": "api",
                                              "jwks": {"url": jwks.url}}}
        write(path, later)  # the file's routes use it; no stage serves the file's routes
        gw = await gateway(str(path))
        assert await version(gw.addresses[0], "/prod/version") == "v1"
        assert "files_own" not in gw.config.authorizers and jwks.fetches == 0
        # a stage that serves the file's routes: it is started, and guards them
        later["stages"]["qa"] = {"variables": {"backend": "users"}}
        write(path, later)
        await gw.reload_from_source()
        assert "files_own" in gw.config.authorizers and jwks.fetches >= 1
        assert (await RawClient.once(gw.addresses[0], "GET", "/qa/version")).status == 401
    finally:
        jwks.close()
