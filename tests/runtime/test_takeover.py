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


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


async def _steady_load(addr, failures: list[str], stop: asyncio.Event, counts: list[int]) -> None:
    """New connections one after another: any refused, reset or non-200 is a failure."""
    while not stop.is_set():
        try:
            c = await RawClient.connect(addr)
            r = await c.request("GET", "/users/1")
            await c.close()
            if r.status != 200:
                failures.append(f"status {r.status}")
            counts[0] += 1
        except (TimeoutError, OSError, ConnectionError) as exc:
            failures.append(repr(exc))


@pytest.mark.parametrize("old_workers,new_workers", [(2, 2), (1, 2), (2, 1), (2, 3)])
async def test_takeover_between_supervisors_and_single_processes(upstream, tmp_path, old_workers, new_workers):
    """Every socket of every worker slot moves: nothing queued is reset, nothing in flight
    is cut, and each side may have any number of workers."""
    cfg = base_config(upstream.port)
    cfg["drain_timeout"] = "10s"
    cfg["workers"] = old_workers
    cfg["throttle"] = {"rate": 100000, "burst": 100000}  # shared tables with workers: cleaned up
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg)
    successor = None
    try:
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        cfg["workers"] = new_workers
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
        slow = await RawClient.connect(addr)
        await slow.send(b"GET /delay/1500 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        failures: list[str] = []
        counts = [0]
        stop = asyncio.Event()
        loads = [asyncio.ensure_future(_steady_load(addr, failures, stop, counts)) for _ in range(4)]
        await asyncio.sleep(0.3)
        successor, new_lines, new_drain = await _start_successor(str(tmp_path / "gw.yaml"))
        assert (await slow.read_response(timeout=10)).status == 200  # the old side finished it
        await slow.close()
        assert await asyncio.wait_for(old.wait(), 20) == 0
        before = counts[0]
        await asyncio.sleep(0.5)  # load on the successor alone
        stop.set()
        await asyncio.gather(*loads)
        assert failures == [] and counts[0] > before > 0
        # every answer now comes from the successor's processes
        for _ in range(6):
            _, body = await _get_json(admin, "/healthz")
            assert body["pid"] == successor.pid if new_workers == 1 else _parent(body["pid"]) == successor.pid
        assert not any("ERROR" in line for line in old_lines), old_lines
        assert any("handed over to a successor" in line for line in old_lines), old_lines
        # the old supervisor removed its own shared tables; the lock files name the successor
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"edgeplane-{old.pid}")]
        stray = subprocess.run([sys.executable, "-m", "edgeplane", "serve", "-c", str(tmp_path / "gw.yaml")],
                               capture_output=True, text=True, timeout=30)
        assert stray.returncode != 0 and f"pid {successor.pid}" in stray.stderr
        await _stop(successor, new_drain)
    finally:
        for proc in (old, successor):
            if proc is not None and proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is successor else proc.kill()
                await proc.wait()
        await old_drain


async def test_sigusr2_to_a_supervisor_upgrades_it_in_place(upstream, tmp_path):
    """nginx's binary upgrade: SIGUSR2 makes the supervisor start `serve --takeover` with
    its own command line; the successor takes over and the old supervisor exits 0."""
    cfg = base_config(upstream.port)
    cfg["workers"] = 2
    pidfile, log_path = tmp_path / "gw.pid", tmp_path / "gw.log"
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Its log goes to a file: the successor inherits stderr, and would hold a pipe open.
    with open(log_path, "wb") as log_file:
        old = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeplane", "serve", "-c", str(path), "--pidfile", str(pidfile),
            stdout=subprocess.DEVNULL, stderr=log_file)
    successor_pid = None
    try:
        for _ in range(400):
            m = READY.search(log_path.read_text())
            if m:
                break
            await asyncio.sleep(0.05)
        assert m, log_path.read_text()
        addr, admin = (m.group(2), int(m.group(3))), (m.group(4), int(m.group(5)))
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]  # the successor re-reads the file: fixed ports
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        path.write_text(yaml.safe_dump(cfg))
        old.send_signal(signal.SIGUSR2)
        assert await asyncio.wait_for(old.wait(), 30) == 0
        successor_pid = int(pidfile.read_text())
        assert successor_pid != old.pid
        status, body = await _get_json(admin, "/healthz")
        assert status == 200 and _parent(body["pid"]) == successor_pid
        assert (await _get_json(addr, "/users/1"))[0] == 200
        text = log_path.read_text()
        assert "SIGUSR2: started a successor" in text and f"took over the listeners of pid {old.pid}" in text
        assert "ERROR" not in text, text
    finally:
        if successor_pid is None and pidfile.exists() and pidfile.read_text().strip() != str(old.pid):
            successor_pid = int(pidfile.read_text())  # the test failed after the successor started
        if successor_pid is not None:
            os.kill(successor_pid, signal.SIGTERM)
            for _ in range(200):
                if not os.path.exists(f"/proc/{successor_pid}"):
                    break
                await asyncio.sleep(0.05)
        if old.returncode is None:
            old.kill()
            await old.wait()


async def test_a_proxied_websocket_outlives_the_takeover(tmp_path):
    """The old instance keeps a proxied WebSocket after handing over, until the client
    closes it (nginx's old workers do the same); then it exits 0."""
    from ws_peers import WsClient, WsUpstream

    up = await WsUpstream("echo").start()
    cfg = base_config(up.port, routes=[{"route": "GET /ws", "integration": {"type": "http", "upstream": "demo"}}])
    cfg["drain_timeout"] = "20s"
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg)
    successor = None
    try:
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
        ws = await WsClient.connect(addr, "/ws")
        assert ws.status == 101
        successor, _, new_drain = await _start_successor(str(tmp_path / "gw.yaml"))
        for _ in range(100):  # the old instance has handed over and is draining
            if any("handed over to a successor" in line for line in old_lines):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(old_lines)
        await asyncio.sleep(0.5)
        assert old.returncode is None  # still here: the WebSocket is open
        for i in range(3):
            ws.send_text(f"after {i}")
            assert await ws.recv() == f"after {i}"
        fresh = await WsClient.connect(addr, "/ws")  # a new one is the successor's
        fresh.send_text("new")
        assert await fresh.recv() == "new"
        await fresh.aclose()
        await ws.aclose()
        assert await asyncio.wait_for(old.wait(), 10) == 0
        assert not any("ERROR" in line for line in old_lines), old_lines
        await _stop(successor, new_drain)
    finally:
        for proc in (old, successor):
            if proc is not None and proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is successor else proc.kill()
                await proc.wait()
        await old_drain
        await up.stop()


async def test_a_drain_answers_a_request_sent_on_an_idle_kept_alive_connection(upstream, gateway):
    """Closing idle connections at once would fail any request already on its way: the
    drain gives them a grace for one more request, answered with `Connection: close`."""
    gw = await gateway(base_config(upstream.port))
    busy = await RawClient.connect(gw.addresses[0])
    quiet = await RawClient.connect(gw.addresses[0])
    for c in (busy, quiet):
        assert (await c.request("GET", "/users/1")).status == 200  # now idle, kept alive
    stopping = asyncio.ensure_future(gw.stop(drain_timeout=5.0))
    while not gw.draining:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    r = await busy.request("GET", "/users/2")
    assert r.status == 200 and r.header("connection") == "close"
    assert await busy.reader.read() == b""  # and then it closes
    # the quiet one is closed quietly once the grace ends; the stop does not wait longer
    assert await asyncio.wait_for(quiet.reader.read(), 3) == b""
    await asyncio.wait_for(stopping, 5)
    await busy.close()
    await quiet.close()



async def test_two_successors_at_once_one_takes_over_and_the_lock_files_name_it(upstream, tmp_path):
    """One hand-over at a time: the second successor is turned away before it gets any
    socket, and nothing it does leaves the lock files naming it."""
    cfg = base_config(upstream.port)
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg)
    procs = []
    try:
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        cfg["workers"] = 2  # a slower start: the two overlap
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
        for _ in range(2):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgeplane", "serve", "-c", str(tmp_path / "gw.yaml"), "--takeover",
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
        assert await asyncio.wait_for(old.wait(), 30) == 0
        await asyncio.sleep(0.5)
        alive = [p for p in procs if p.returncode is None]
        assert len(alive) == 1, [p.returncode for p in procs]
        winner = alive[0]
        from edgeplane.runtime.ports import lock_name, runtime_dir
        lock = os.path.join(runtime_dir(), lock_name("127.0.0.1", addr[1]))
        assert open(lock).read().split()[0] == str(winner.pid)
        assert (await _get_json(addr, "/users/1"))[0] == 200
        winner.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(winner.wait(), 30) == 0
    finally:
        for p in procs:
            if p.returncode is None:
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        if old.returncode is None:
            old.kill()
            await old.wait()
        await old_drain


async def test_a_successor_that_adds_slots_and_fails_resets_no_connection(upstream, tmp_path):
    """1 -> 3 workers where a successor's worker cannot start: the slots it added never
    listened, so closing them drops nothing queued, and the old instance serves on."""
    cfg = base_config(upstream.port)
    old, addr, admin, old_lines, old_drain = await _start_serve(tmp_path, cfg)
    try:
        cfg["listen"] = [f"127.0.0.1:{addr[1]}"]
        cfg["admin"]["listen"] = f"127.0.0.1:{admin[1]}"
        not_a_dir = tmp_path / "afile"
        not_a_dir.write_text("")
        bad = dict(cfg, workers=3, access_log={"destination": "file", "path": str(not_a_dir / "x.log")})
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        failures: list[str] = []
        counts = [0]
        stop = asyncio.Event()
        loads = [asyncio.ensure_future(_steady_load(addr, failures, stop, counts)) for _ in range(4)]
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeplane", "serve", "-c", str(tmp_path / "bad.yaml"), "--takeover",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(done.communicate(), 60)
        assert done.returncode != 0, err
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*loads)
        assert failures == [] and counts[0] > 0
        assert old.returncode is None
        assert (await _get_json(addr, "/users/1"))[0] == 200
        await _stop(old, old_drain)
    finally:
        if old.returncode is None:
            old.kill()
            await old.wait()
