"""Real processes: `edgeplane serve` single and multi-worker, crash restart, SIGTERM drain,
and the in-process drain of the embedding API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import orjson
import pytest
import yaml

from conftest import RawClient, base_config
from edgeplane import Gateway

READY = re.compile(r"edgeplane ready: (\d+) workers? on ([0-9.]+):(\d+)(?:; admin ([0-9.]+):(\d+))?")


async def _start_serve(tmp_path, config: dict, *args: str):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeplane", "serve", "-c", str(path), *args,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    lines = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            if not line:
                raise AssertionError("serve exited before ready:\n" + "".join(lines))
            lines.append(line)
            m = READY.search(line)
            if m and m.group(4):
                break
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # never leave a server (and its workers) behind
            await proc.wait()
        raise
    # Keep draining stderr so the child never blocks on a full pipe.
    drain = asyncio.ensure_future(_drain(proc.stderr, lines))
    return proc, (m.group(2), int(m.group(3))), (m.group(4), int(m.group(5))), lines, drain


async def _drain(stream, lines):
    while True:
        line = await stream.readline()
        if not line:
            return
        lines.append(line.decode())


async def _get_json(addr, path):
    c = await RawClient.connect(addr)
    try:
        r = await c.request("GET", path)
        return r.status, orjson.loads(r.body)
    finally:
        await c.close()


async def _worker_pids(admin, n: int = 2) -> set[int]:
    """Pids of the workers answering the admin address (new connections spread over the
    SO_REUSEPORT workers); asserts all `n` were seen."""
    pids: set[int] = set()
    for _ in range(40):
        status, body = await _get_json(admin, "/healthz")
        assert status == 200
        pids.add(body["pid"])
        if len(pids) == n:
            break
    assert len(pids) == n, "SO_REUSEPORT should spread new connections over every worker"
    return pids


async def _statuses_on_new_connections(addr, n: int, path: str, headers: dict | None = None) -> list[int]:
    """`n` GETs, each on a new connection, so SO_REUSEPORT spreads them over the workers."""
    statuses = []
    for _ in range(n):
        c = await RawClient.connect(addr)
        statuses.append((await c.request("GET", path, headers=headers)).status)
        await c.close()
    return statuses


async def _stop(proc, drain_task):
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 20)
    await drain_task
    return code


@pytest.mark.timeout(60)
async def test_multi_worker_reuseport_spreads_and_restarts_crashed_worker(upstream, tmp_path):
    cfg = base_config(upstream.port, workers=2)
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        pids = await _worker_pids(admin)
        status, _ = await _get_json(addr, "/users/1")
        assert status == 200

        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        new_pids: set[int] = set()
        for _ in range(200):
            try:
                _, body = await _get_json(admin, "/healthz")
                new_pids.add(body["pid"])
            except (ConnectionError, OSError):
                pass
            if len(new_pids - {victim}) == 2:
                break
            await asyncio.sleep(0.05)
        assert victim not in new_pids or len(new_pids) >= 2
        assert len(new_pids - pids) >= 1, "a replacement worker should be serving"
        assert any("exited with" in ln and "restarting" in ln for ln in lines)
    finally:
        code = await _stop(proc, drain)
    assert code == 0


@pytest.mark.timeout(60)
async def test_sigterm_drains_in_flight_request_then_exits_zero(upstream, tmp_path):
    cfg = base_config(upstream.port, drain_timeout="5s")
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    c = await RawClient.connect(addr)
    idle = await RawClient.connect(addr)
    assert (await idle.request("GET", "/ping")).status == 200
    await c.send(b"GET /delay/400 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)  # the request is in flight at the upstream (the scenario)
    proc.send_signal(signal.SIGTERM)
    r = await c.read_response()
    assert r.status == 200 and r.json()["path"] == "/delay/400"
    assert r.header("connection") == "close"
    assert await idle.closed(5)  # idle keep-alive connections are closed by the drain
    code = await _stop(proc, drain)
    assert code == 0
    with pytest.raises(OSError):
        await RawClient.connect(addr)
    await c.close()
    await idle.close()


@pytest.mark.timeout(60)
async def test_supervisor_sigterm_drains_workers(upstream, tmp_path):
    cfg = base_config(upstream.port, workers=2, drain_timeout="5s")
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    c = await RawClient.connect(addr)
    await c.send(b"GET /delay/400 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    r = await c.read_response()
    assert r.status == 200
    assert await _stop(proc, drain) == 0
    await c.close()


async def test_embedded_gateway_stop_drains(upstream):
    gw = Gateway(base_config(upstream.port))
    await gw.start()
    c = await RawClient.connect(gw.addresses[0])
    idle = await RawClient.connect(gw.addresses[0])
    assert (await idle.request("GET", "/ping")).status == 200
    await c.send(b"GET /delay/200 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)
    stopper = asyncio.ensure_future(gw.stop(drain_timeout=5))
    r = await c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert await idle.closed(5)
    await stopper
    assert not gw._context.connections
    await c.close()
    await idle.close()


async def test_embedded_gateway_from_file_and_context_manager(upstream, tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(base_config(upstream.port)))
    async with Gateway(str(path)) as gw:
        status, body = await _get_json(gw.addresses[0], "/ping")
        assert status == 200 and body == {"ok": True}
        assert gw.url("/ping").startswith("http://127.0.0.1:")


@pytest.mark.timeout(60)
async def test_workers_exit_when_supervisor_is_killed(upstream, tmp_path):
    cfg = base_config(upstream.port, workers=2, drain_timeout="1s")
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    pids = await _worker_pids(admin)
    proc.kill()  # SIGKILL: the supervisor cannot forward anything
    await proc.wait()
    await drain
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} outlived its supervisor")
