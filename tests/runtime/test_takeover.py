"""Zero-downtime upgrade: `edgeplane serve --takeover` inherits a running instance's
listening sockets (SCM_RIGHTS), serves, and the old instance drains and exits.

Real processes on loopback: a request in flight on the old instance finishes, a steady
stream of new connections sees no failure across the switch, and a stray second `serve`
without `--takeover` is still refused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import yaml
from test_processes import READY, _drain, _get_json, _start_serve, _stop

from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(90)


async def _start_successor(path: str, *args: str):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeplane", "serve", "-c", path, "--takeover", *args,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        if not line:
            raise AssertionError("the successor exited before ready:\n" + "".join(lines))
        lines.append(line)
        if READY.search(line):
            break
    return proc, lines, asyncio.ensure_future(_drain(proc.stderr, lines))


async def test_takeover_with_requests_in_flight(upstream, tmp_path):
    cfg = base_config(upstream.port)
    cfg["drain_timeout"] = "10s"
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg)
    successor = None
    try:
        _, body = await _get_json(admin, "/healthz")
        old_pid = body["pid"]
        # the successor's config names the ports the first instance got
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
        # a slow request in flight on the old instance across the switch
        slow = await RawClient.connect(addr)
        await slow.send(b"GET /delay/1500 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        failures: list[str] = []
        served = 0
        stop = asyncio.Event()

        async def steady() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    c = await RawClient.connect(addr)
                    r = await c.request("GET", "/users/1")
                    await c.close()
                    if r.status != 200:
                        failures.append(f"status {r.status}")
                    served += 1
                except (TimeoutError, OSError, ConnectionError) as exc:
                    failures.append(repr(exc))

        load = asyncio.ensure_future(steady())
        successor, new_lines, new_drain = await _start_successor(str(tmp_path / "gw.yaml"))
        r = await slow.read_response(timeout=10)
        assert r.status == 200  # finished by the old instance while it drained
        await slow.close()
        assert await asyncio.wait_for(old.wait(), 20) == 0  # drained and exited cleanly
        await asyncio.sleep(0.3)  # the scenario: load keeps going on the successor alone
        stop.set()
        await load
        assert failures == [] and served > 0
        _, body = await _get_json(admin, "/healthz")  # the admin listener moved too
        assert body["pid"] == successor.pid != old_pid
        # the successor owns the ports: a stray second serve is still refused
        stray = subprocess.run([sys.executable, "-m", "edgeplane", "serve", "-c", str(tmp_path / "gw.yaml")],
                               capture_output=True, text=True, timeout=30)
        assert stray.returncode != 0 and f"pid {successor.pid}" in stray.stderr
        assert not any("ERROR" in line for line in old_lines), old_lines
        await _stop(successor, new_drain)
    finally:
        for proc in (old, successor):
            if proc is not None and proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is successor else proc.kill()
                await proc.wait()
        await old_drain


async def test_takeover_without_a_running_instance_says_so(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(base_config(None, routes=[
        {"route": "GET /p", "integration": {"type": "mock"}}], listen=["127.0.0.1:1"])))
    done = subprocess.run([sys.executable, "-m", "edgeplane", "serve", "-c", str(path), "--takeover"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "no running instance owns 127.0.0.1:1" in done.stderr


async def test_a_successor_that_fails_leaves_the_running_instance_as_it_was(upstream, tmp_path):
    cfg = base_config(upstream.port)
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg, "--pidfile",
                                                                str(tmp_path / "gw.pid"))
    try:
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        good = tmp_path / "good.yaml"
        good.write_text(yaml.safe_dump(cfg))
        # the successor's config adds a listener on a port that is taken: it cannot start
        bad = dict(cfg, listen=[f"127.0.0.1:{addr[1]}", f"127.0.0.1:{upstream.port}"])
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        failed = subprocess.run([sys.executable, "-m", "edgeplane", "serve", "-c", str(tmp_path / "bad.yaml"),
                                 "--takeover", "--pidfile", str(tmp_path / "gw.pid")],
                                capture_output=True, text=True, timeout=30)
        assert failed.returncode != 0 and "cannot start" in failed.stderr
        # the running instance still serves, owns the pidfile and its lock files
        assert (await _get_json(addr, "/users/1"))[0] == 200
        assert int((tmp_path / "gw.pid").read_text()) == old.pid
        stray = subprocess.run([sys.executable, "-m", "edgeplane", "serve", "-c", str(good)],
                               capture_output=True, text=True, timeout=30)
        assert stray.returncode != 0 and f"pid {old.pid}" in stray.stderr
        # and it can still be taken over
        successor, _, new_drain = await _start_successor(str(good), "--pidfile", str(tmp_path / "gw.pid"))
        assert await asyncio.wait_for(old.wait(), 20) == 0
        assert int((tmp_path / "gw.pid").read_text()) == successor.pid
        await _stop(successor, new_drain)
    finally:
        if old.returncode is None:
            old.kill()
            await old.wait()
        await old_drain
