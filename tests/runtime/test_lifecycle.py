"""The operable process: reload triggers (SIGHUP, `edgeplane reload`, the admin call through
the supervisor), log reopening (SIGUSR1), clean stops, drain_delay and readiness, honest
drain logs, shared-memory hygiene, sd_notify, process titles and the pidfile.

Everything runs `edgeplane serve -c FILE` as a real process in its own session (so a
signal to its process group reaches only it), on loopback port 0, and waits for what it
checks by polling with a deadline; every test kills the process group it started.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from conftest import RawClient, base_config
from edgeplane.policies.throttle.shared_limits import SHM_DIR

pytestmark = pytest.mark.timeout(90)

EDGEPLANE = str(Path(sys.executable).with_name("edgeplane"))
READY = re.compile(r"edgeplane ready: (\d+) workers? on ([0-9.]+):(\d+)(?:; admin ([0-9.]+):(\d+))?")


def mock(route: str, body: object, **extra: object) -> dict:
    return {"route": route, "integration": {"type": "mock", "status": 200, "body": body}, **extra}


def config(routes: list, **extra: object) -> dict:
    return base_config(None, routes=routes, **extra)


class Serve:
    """One `edgeplane serve` process group; `lines` collects its stderr."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path) -> None:
        self.proc = proc
        self.path = path
        self.lines: list[str] = []
        self.addr: tuple[str, int] = ("", 0)
        self.admin: tuple[str, int] = ("", 0)
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write(self, cfg: dict) -> None:
        self.path.write_text(yaml.safe_dump(cfg))

    async def wait_line(self, pattern: str, timeout: float = 20.0, start: int = 0) -> str:
        """The first stderr line from index `start` on that matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if rx.search(line):
                    return line
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines))

    async def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> int:
        if self.proc.returncode is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        return code

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
async def serve(tmp_path):
    started: list[Serve] = []

    async def start(cfg: dict, *args: str, env: dict | None = None, name: str = "gw.yaml") -> Serve:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        proc = await asyncio.create_subprocess_exec(
            EDGEPLANE, "serve", "-c", str(path), *args, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **(env or {})})
        s = Serve(proc, path)
        started.append(s)
        while True:
            raw = await asyncio.wait_for(proc.stderr.readline(), 30)
            if not raw:
                raise AssertionError("serve exited before ready:\n" + "".join(s.lines))
            s.lines.append(raw.decode())
            m = READY.search(s.lines[-1])
            if m:
                break
        s.addr = (m.group(2), int(m.group(3)))
        if m.group(4):
            s.admin = (m.group(4), int(m.group(5)))
        s._reader = asyncio.ensure_future(_collect(proc.stderr, s.lines))
        return s

    yield start
    for s in started:  # never leave a gateway or its workers behind
        s.kill_group()
        if s.proc.returncode is None:
            await s.proc.wait()
        if s._reader is not None:
            s._reader.cancel()


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while True:
        raw = await stream.readline()
        if not raw:
            return
        lines.append(raw.decode())


async def get(addr: tuple[str, int], path: str, headers: dict | None = None):
    return await RawClient.once(addr, "GET", path, headers)


async def eventually(check, timeout: float = 20.0, what: str = "condition"):
    """Poll the coroutine function `check` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached (last: {last!r})")


async def routes_by_worker(admin: tuple[str, int], n: int = 2) -> dict[int, list[str]]:
    """pid -> its route keys, for each of `n` workers (new connections spread over them):
    /healthz and /routes on one kept-alive connection come from the same worker."""
    seen: dict[int, list[str]] = {}
    for _ in range(200):
        c = await RawClient.connect(admin)
        try:
            pid = (await c.request("GET", "/healthz")).json()["pid"]
            seen[pid] = [r["route"] for r in (await c.request("GET", "/routes")).json()["routes"]]
        finally:
            await c.close()
        if len(seen) == n:
            return seen
    raise AssertionError(f"only saw workers {sorted(seen)}")


def shm_tables(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if re.fullmatch(rf"edgeplane-{pid}(-keys)?", n))


def throttled(routes: list) -> dict:
    """A config with a server-wide and a per-client throttle: both shared tables exist."""
    return config(routes, workers=2, throttle={"rate": 1000, "burst": 1000})


def keyed(route: str, body: object) -> dict:
    return mock(route, body, throttle={"rate": 1000, "burst": 1000, "key": "$context.identity.sourceIp"})


async def cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        EDGEPLANE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------------- reload triggers
async def test_sighup_single_process_applies_on_kept_alive_connection_and_refused_keeps_old(serve):
    s = await serve(config([mock("GET /v", {"v": 1})]))
    c = await RawClient.connect(s.addr)
    try:
        assert (await c.request("GET", "/v")).json() == {"v": 1}
        s.write(config([mock("GET /v", {"v": 2}), mock("GET /new", {"new": True})]))
        s.proc.send_signal(signal.SIGHUP)

        async def changed():
            return (await c.request("GET", "/v")).json() == {"v": 2}

        await eventually(changed, what="the new route on the kept-alive connection")
        assert (await c.request("GET", "/new")).status == 200

        mark = len(s.lines)
        bad = config([{"route": "GET /v", "integration": {"type": "http", "upstream": "nowhere"}}])
        s.write(bad)
        s.proc.send_signal(signal.SIGHUP)
        line = await s.wait_line(r"reload (of .* )?refused", start=mark)
        assert "ERROR" in line
        await s.wait_line(r"routes\[0\].*integration\.upstream.*nowhere", start=mark)
        assert (await c.request("GET", "/v")).json() == {"v": 2}  # the old config keeps serving
        stats = (await get(s.admin, "/stats")).json()["reloads"]
        assert stats["ok"] == 1 and stats["failed"] == 1
    finally:
        await c.close()
    assert s.proc.returncode is None
    assert await s.stop() == 0


async def test_sighup_with_workers_reloads_every_worker_and_refused_changes_nothing(serve):
    s = await serve(config([mock("GET /v", {"v": 1})], workers=2))
    before = await routes_by_worker(s.admin)
    assert all(routes == ["GET /v"] for routes in before.values())

    mark = len(s.lines)
    s.write(config([mock("GET /v", {"v": 2}), mock("GET /added", {})], workers=2))
    s.proc.send_signal(signal.SIGHUP)
    await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    after = await routes_by_worker(s.admin)
    assert set(after) == set(before), "a reload keeps the worker processes"
    assert all(sorted(routes) == ["GET /added", "GET /v"] for routes in after.values())
    bodies = {(await get(s.addr, "/v")).body for _ in range(20)}  # new connections: both workers
    assert bodies == {orjson.dumps({"v": 2})}

    # Refused by the supervisor (a change that cannot be made live): nothing changes.
    mark = len(s.lines)
    s.write(config([mock("GET /v", {"v": 3})], workers=3))
    s.proc.send_signal(signal.SIGHUP)
    await s.wait_line(r"ERROR edgeplane\.workers.*reload of .* refused", start=mark)
    await s.wait_line(r"workers: 2 -> 3 cannot change on reload", start=mark)
    assert await routes_by_worker(s.admin) == after
    assert s.proc.returncode is None
    for _ in range(10):  # every worker shows the supervisor's refusal in its /stats
        c = await RawClient.connect(s.admin)
        try:
            refused = (await c.request("GET", "/stats")).json()["reloads"]["refused_by_supervisor"]
        finally:
            await c.close()
        assert refused["count"] == 1 and any("workers: 2 -> 3" in e for e in refused["last"]["errors"])

    # The admin call in a worker goes through the supervisor, which reloads every worker.
    mark = len(s.lines)
    s.write(config([mock("GET /v", {"v": 4})], workers=2))
    r = await RawClient.connect(s.admin)
    try:
        answer = await r.request("POST", "/config/reload")
    finally:
        await r.close()
    # It answers once every worker applied it: the change is live in both right away.
    assert answer.status == 200 and answer.json()["status"] == "applied", answer.body
    assert answer.json()["workers"] == 2 and answer.json()["restarting"] == 0
    bodies = set()
    for _ in range(12):
        bodies.add((await get(s.addr, "/v")).body)
    assert bodies == {orjson.dumps({"v": 4})}
    await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    assert all(routes == ["GET /v"] for routes in (await routes_by_worker(s.admin)).values())
    s.write(config([mock("GET /v", {"v": 5})], workers=3))
    r = await RawClient.connect(s.admin)
    try:
        refused = await r.request("POST", "/config/reload")
    finally:
        await r.close()
    assert refused.status == 422 and any("workers: 2 -> 3" in e for e in refused.json()["errors"])
    assert await s.stop() == 0



async def test_throttles_change_live_with_workers_and_unchanged_ones_keep_their_counts(serve):
    """The shared-memory tables of `workers: 2` follow a reload: an unchanged limit keeps
    what both workers took from it, a changed or added one starts full at its new rate."""
    def cfg(rate: int, extra: list) -> dict:
        return config([mock("GET /t", {"t": 1}, throttle={"rate": 0.001, "burst": rate}),
                       mock("GET /other", {"o": 1}), *extra], workers=2)

    async def admitted(path: str, n: int) -> int:
        ok = 0
        for _ in range(n):  # a new connection each: both workers take their share
            ok += (await get(s.addr, path)).status == 200
        return ok

    s = await serve(cfg(4, []))
    assert await admitted("/t", 8) == 4  # burst 4 across both workers, no refill to speak of

    # Unchanged limit, another route added: the same slot, still empty.
    mark = len(s.lines)
    s.write(cfg(4, [mock("GET /u", {"u": 1}, throttle={"rate": 0.001, "burst": 2})]))
    s.proc.send_signal(signal.SIGHUP)
    await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    assert await admitted("/t", 4) == 0
    assert await admitted("/u", 4) == 2  # the added one starts full

    # Changed limit (burst 6): a fresh slot, full at the new burst.
    mark = len(s.lines)
    s.write(cfg(6, []))
    s.proc.send_signal(signal.SIGHUP)
    await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    assert await admitted("/t", 10) == 6
    assert not any("ERROR" in line for line in s.lines), s.lines
    assert await s.stop() == 0



async def test_a_reload_no_worker_can_apply_is_rolled_back_and_refused(serve, tmp_path):
    """Every check passes, but every worker fails to apply it (its access log cannot be
    opened): refused, as one process refuses it; no worker is stopped for it."""
    s = await serve(config([mock("GET /v", {"v": 1})], workers=2))
    not_a_dir = tmp_path / "afile"
    not_a_dir.write_text("")
    mark = len(s.lines)
    s.write(config([mock("GET /v", {"v": 2})], workers=2,
                   access_log={"destination": "file", "path": str(not_a_dir / "x.log")}))
    c = await RawClient.connect(s.admin)
    try:
        answer = await c.request("POST", "/config/reload")
    finally:
        await c.close()
    assert answer.status == 422, answer.body
    assert any("no worker could apply" in e for e in answer.json()["errors"]), answer.body
    assert any("Not a directory" in e for e in answer.json()["errors"]), answer.body
    await s.wait_line(r"went back to the running one", start=mark)
    for _ in range(8):  # both workers serve the old config, and nobody was stopped for it
        assert (await get(s.addr, "/v")).json() == {"v": 1}
    assert len({(await get(s.admin, "/healthz")).json()["pid"] for _ in range(16)}) == 2
    assert not any("restarting" in ln or "failed to start" in ln for ln in s.lines[mark:]), s.lines[mark:]
    # a SIGHUP storm of the same file changes nothing either
    for _ in range(5):
        s.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert {(await get(s.addr, "/v")).json()["v"] for _ in range(8)} == {1}
    assert s.proc.returncode is None
    # the next good reload goes through as usual
    s.write(config([mock("GET /v", {"v": 3})], workers=2))
    s.proc.send_signal(signal.SIGHUP)
    await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    assert {(await get(s.addr, "/v")).json()["v"] for _ in range(8)} == {3}
    assert await s.stop() == 0


async def test_a_worker_that_cannot_restart_leaves_no_connection_waiting(serve, tmp_path):
    """Its slot is paused while it is down: the other worker takes every new connection."""
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    s = await serve(config([mock("GET /v", {"v": 1})], workers=2,
                           access_log={"destination": "file", "path": str(logs_dir / "access.log")}))
    pids = set()
    for _ in range(20):
        pids.add((await get(s.admin, "/healthz")).json()["pid"])
    assert len(pids) == 2
    for f in logs_dir.iterdir():
        f.unlink()
    logs_dir.rmdir()  # a restarted worker cannot open its access log now
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    await s.wait_line(rf"worker \d \(pid {victim}\) exited")
    answered = 0
    for _ in range(40):  # each on a new connection; none may hang
        r = await asyncio.wait_for(get(s.addr, "/v"), 3)
        answered += r.status == 200
    assert answered == 40
    assert s.proc.returncode is None  # the other worker serves; the supervisor keeps retrying
    assert await s.stop() == 0


async def test_with_workers_a_new_connection_during_the_drain_is_refused_at_once(serve, upstream):
    s = await serve(base_config(upstream.port, workers=2, drain_timeout="10s"))
    slow = await RawClient.connect(s.addr)
    await slow.send(b"GET /delay/3000 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    await asyncio.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    await s.wait_line(r"draining")
    await asyncio.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        c = await RawClient.connect(s.addr)
        await c.request("GET", "/users/1")
    assert time.monotonic() - started < 1.0  # refused, not queued until the drain ends
    assert (await slow.read_response(timeout=10)).status == 200  # in flight: finished
    await slow.close()
    assert await s.stop() == 0



async def test_with_workers_health_checks_see_the_drain_until_the_last_worker_exits(serve, upstream):
    """One worker exits at once (nothing in flight), the other drains a slow request: the
    first one's admin slot must not swallow health checks meanwhile."""
    s = await serve(base_config(upstream.port, workers=2, drain_timeout="10s"))
    slow = await RawClient.connect(s.addr)
    await slow.send(b"GET /delay/2500 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    await asyncio.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    answers = []
    for _ in range(12):
        try:
            answers.append((await asyncio.wait_for(get(s.admin, "/healthz"), 2)).status)
        except ConnectionRefusedError:
            answers.append("refused")
        await asyncio.sleep(0.1)
    assert set(answers) <= {503, "refused"} and 503 in answers, answers
    assert (await slow.read_response(timeout=10)).status == 200
    await slow.close()
    assert await s.stop() == 0


FAIL_ON_RELOAD = """
from edgeplane.plugins import Policy

_starts = 0


class FailOnReload(Policy):
    name = "fail_on_reload"

    async def start(self, runtime):
        global _starts
        _starts += 1
        if _starts > 1:  # a fresh process starts; a reload in the same process fails
            raise RuntimeError("fail_on_reload: no second start in one process")


plugin = FailOnReload()
"""


async def test_a_reload_every_worker_fails_to_apply_is_refused_and_nobody_restarts(serve, tmp_path):
    """As one process refuses a config it cannot apply, so does a supervisor when no
    worker could: stopping workers for a config none could run would risk them all."""
    (tmp_path / "fail_on_reload.py").write_text(FAIL_ON_RELOAD)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    s = await serve(config([mock("GET /v", {"v": 1})], workers=2, plugins=["fail_on_reload"]), env=env)
    before = set(await routes_by_worker(s.admin))
    mark = len(s.lines)
    s.write(config([mock("GET /v", {"v": 2}), mock("GET /added", {})], workers=2, plugins=["fail_on_reload"]))
    s.proc.send_signal(signal.SIGHUP)
    line = await s.wait_line(r"ERROR edgeplane\.workers.*reload of .* refused", start=mark)
    await s.wait_line(r"no worker could apply config \w+; the supervisor went back", start=mark)
    await s.wait_line(r"fail_on_reload: no second start in one process", start=mark)
    assert "ERROR" in line
    assert set(await routes_by_worker(s.admin)) == before  # the same processes, on the old routes
    assert all(routes == ["GET /v"] for routes in (await routes_by_worker(s.admin)).values())
    assert not any("restarting it on config" in ln for ln in s.lines[mark:])
    assert s.proc.returncode is None
    assert await s.stop() == 0


async def test_supervisor_survives_sighup_and_sigterm_leaves_no_shared_memory(serve):
    s = await serve(throttled([keyed("GET /v", {"v": 1})]))
    assert shm_tables(s.pid) == [f"edgeplane-{s.pid}", f"edgeplane-{s.pid}-keys"]
    workers = set(await routes_by_worker(s.admin))
    for _ in range(3):
        mark = len(s.lines)
        s.proc.send_signal(signal.SIGHUP)
        await s.wait_line(r"reloaded config \w+ in 2 workers", start=mark)
    assert s.proc.returncode is None
    assert set(await routes_by_worker(s.admin)) == workers
    assert (await get(s.addr, "/v")).status == 200
    assert await s.stop() == 0
    assert shm_tables(s.pid) == []
    assert not [n for n in os.listdir(os.environ.get("TMPDIR", "/tmp")) if n.startswith(f"edgeplane-{s.pid}-")]


async def test_stale_shared_memory_of_a_killed_supervisor_is_removed_at_next_start(serve, tmp_path):
    first = await serve(throttled([keyed("GET /v", {"v": 1})]))
    workers = set(await routes_by_worker(first.admin))
    stale = shm_tables(first.pid)
    assert len(stale) == 2
    first.proc.kill()  # SIGKILL: nothing of the supervisor runs
    await first.proc.wait()

    async def workers_gone():
        return not any(os.path.exists(f"/proc/{pid}") for pid in workers)

    await eventually(workers_gone, what="the orphaned workers draining out")
    assert shm_tables(first.pid) == stale  # left behind
    second = await serve(throttled([keyed("GET /v", {"v": 1})]), name="second.yaml")
    await second.wait_line(rf"removed {SHM_DIR}/edgeplane-{first.pid}.*supervisor that is gone")
    assert shm_tables(first.pid) == []
    assert len(shm_tables(second.pid)) == 2
    assert await second.stop() == 0
    assert shm_tables(second.pid) == []


async def test_reload_command_by_pidfile_and_by_admin_address(serve, tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 40 + "\n")
    admin = {"listen": "127.0.0.1:0", "auth": {"token_file": str(token)}}
    pidfile = tmp_path / "edgeplane.pid"
    s = await serve(config([mock("GET /v", {"v": 1})], admin=admin), "--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(s.pid)

    # A second instance on the same pidfile refuses to start.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config([], admin=admin)))
    code, _, err = await cli("serve", "-c", str(other), "--pidfile", str(pidfile))
    assert code == 1 and f"names a running process (pid {s.pid})" in err

    s.write(config([mock("GET /v", {"v": 2})], admin=admin))
    code, out, err = await cli("reload", "--pidfile", str(pidfile))
    assert code == 0, err
    assert f"sent SIGHUP to pid {s.pid}" in out

    async def body_is(v):
        return (await get(s.addr, "/v")).json() == {"v": v}

    await eventually(lambda: body_is(2), what="reload by pidfile")

    s.write(config([mock("GET /v", {"v": 3})], admin=admin))
    admin_addr = f"{s.admin[0]}:{s.admin[1]}"
    code, out, err = await cli("reload", "--admin", admin_addr, "--token-file", str(token))
    assert code == 0, err
    assert "hash" in orjson.loads(out)
    assert await body_is(3)  # the admin call answers once the reload is applied

    code, out, err = await cli("reload", "--admin", admin_addr)  # no token
    assert code == 1 and "401" in err

    s.write(config([mock("GET /v", {"v": 4})], admin=admin, limits={"max_connections": "many"}))
    code, out, err = await cli("reload", "--admin", f"http://{admin_addr}",
                               env={"EDGEPLANE_ADMIN_TOKEN": "t" * 40})
    assert code == 1 and "422" in err and "limits.max_connections" in err
    assert await body_is(3)
    assert await s.stop() == 0
    assert not pidfile.exists()


# ---------------------------------------------------------------------- logs and stops
async def test_sigusr1_reopens_the_access_log_and_the_process_log(serve, tmp_path):
    access = tmp_path / "access.log"
    own = tmp_path / "edgeplane.log"
    s = await serve(config([mock("GET /v", {})], access_log={"destination": "file", "path": str(access),
                                                              "flush_interval": "50ms"}),
                    "--log-file", str(own))

    async def logged(path: Path, needle: str):
        return path.exists() and needle in path.read_text()

    assert (await get(s.addr, "/v?before")).status == 200
    await eventually(lambda: logged(access, "/v"), what="the first access-log line")
    access.rename(tmp_path / "access.log.1")
    own.rename(tmp_path / "edgeplane.log.1")
    s.proc.send_signal(signal.SIGUSR1)
    await eventually(lambda: logged(own, "SIGUSR1: reopened 2 log file(s)"), what="the reopened process log")
    assert (await get(s.addr, "/v", headers={"x-after": "1"})).status == 200
    await eventually(lambda: logged(access, '"path":"/v"'), what="a line in the new access log")
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
    assert s.proc.returncode is None
    assert await s.stop() == 0


async def test_sigterm_to_the_process_group_logs_no_error(serve, tmp_path):
    s = await serve(throttled([keyed("GET /v", {"v": 1})]))
    await routes_by_worker(s.admin)
    assert await s.stop(group=True) == 0
    assert not [line for line in s.lines if " ERROR " in line], "".join(s.lines)
    assert any("supervisor stopping" in line for line in s.lines)
    assert shm_tables(s.pid) == []


async def test_drain_delay_reports_not_ready_while_still_serving(serve):
    s = await serve(config([mock("GET /v", {"v": 1})], drain_delay="8s", drain_timeout="2s"))
    ready = await get(s.admin, "/ready")
    assert ready.status == 200 and ready.json()["status"] == "ready"
    s.proc.send_signal(signal.SIGTERM)

    async def draining():
        r = await get(s.admin, "/healthz")
        return r.status == 503 and r.json() == {"status": "draining"}

    await eventually(draining, what="/healthz 503 during drain_delay")
    not_ready = await get(s.admin, "/ready")
    assert not_ready.status == 503 and not_ready.json() == {"status": "not ready"}
    served = await get(s.addr, "/v")  # a new connection, still accepted and served
    assert served.status == 200 and served.json() == {"v": 1}
    assert s.proc.returncode is None
    assert await s.stop() == 0
    assert not [line for line in s.lines if " ERROR " in line], "".join(s.lines)


async def test_request_cut_at_the_drain_deadline_is_not_logged_as_a_client_close(serve, upstream, tmp_path):
    access = tmp_path / "access.log"
    cfg = base_config(upstream.port, drain_timeout="300ms",
                      access_log={"destination": "file", "path": str(access)})
    s = await serve(cfg)
    c = await RawClient.connect(s.addr)
    try:
        await c.send(b"GET /delay/20000 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await in_flight(s)
        s.proc.send_signal(signal.SIGTERM)
        assert await c.closed(20)
    finally:
        await c.close()
    assert await s.stop() == 0
    records = [orjson.loads(line) for line in access.read_text().splitlines()]
    cut = [r for r in records if r["path"] == "/delay/20000"]
    assert len(cut) == 1, records
    assert cut[0]["status"] != 499 and cut[0]["error"] == "gateway stopped: drain timeout", cut[0]


async def in_flight(s: Serve) -> None:
    """The gateway has the request in flight (its /stats count the connection open)."""
    async def counted():
        return (await get(s.admin, "/stats")).json()["connections_open"] >= 1

    await eventually(counted, what="the request in flight")


# ---------------------------------------------------------------------- process plumbing
def notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid with each message
    sock.settimeout(30)
    return sock


async def receive(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """(sender pid, fields) of the next sd_notify datagram."""
    data, ancdata, _, _ = await asyncio.to_thread(sock.recvmsg, 4096, socket.CMSG_SPACE(12))
    pid = 0
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], sys.byteorder)
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    return pid, fields


async def test_sd_notify_and_process_titles_with_workers(serve, tmp_path):
    sock = notify_socket(str(tmp_path / "notify.sock"))
    try:
        s = await serve(config([mock("GET /v", {})], workers=2), env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        pid, fields = await receive(sock)
        assert pid == s.pid and fields["READY"] == "1" and fields["MAINPID"] == str(s.pid)

        cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes()
        assert cmdline.startswith(b"edgeplane: supervisor"), cmdline
        titles = sorted(Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
                        for p in await routes_by_worker(s.admin))
        assert titles == [b"edgeplane: worker 1/2", b"edgeplane: worker 2/2"]

        s.proc.send_signal(signal.SIGHUP)
        pid, fields = await receive(sock)
        assert pid == s.pid and fields["RELOADING"] == "1"
        assert 0 < int(fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        pid, fields = await receive(sock)
        assert pid == s.pid and fields["READY"] == "1"

        s.proc.send_signal(signal.SIGTERM)
        pid, fields = await receive(sock)
        assert pid == s.pid and fields == {"STOPPING": "1"}
        assert await s.stop() == 0
    finally:
        sock.close()


async def test_sd_notify_on_an_abstract_socket_single_process(serve, tmp_path):
    name = f"edgeplane-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = notify_socket("\0" + name)
    try:
        s = await serve(config([mock("GET /v", {})]), env={"NOTIFY_SOCKET": "@" + name})
        pid, fields = await receive(sock)
        assert pid == s.pid and fields["READY"] == "1"
        assert Path(f"/proc/{s.pid}/cmdline").read_bytes().startswith(b"edgeplane: gateway")
        s.proc.send_signal(signal.SIGHUP)
        assert (await receive(sock))[1]["RELOADING"] == "1"
        assert (await receive(sock))[1]["READY"] == "1"
        s.proc.send_signal(signal.SIGTERM)
        assert (await receive(sock))[1] == {"STOPPING": "1"}
        assert await s.stop() == 0
    finally:
        sock.close()
