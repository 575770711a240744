"""Hostile and broken inputs to the access log and tracing, through real gateways: what a
reviewer broke once, kept broken-proof. Real sockets, FIFOs, pipes and a tmpfs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import orjson
import pytest
import yaml
from test_processes import READY
from test_tracing import OtlpReceiver

from authorizer_peer import AuthorizerPeer
from conftest import RawClient, base_config
from edgeplane import Gateway

pytestmark = pytest.mark.timeout(60)


def logged(cfg: dict, path) -> dict:
    cfg["access_log"] = {**cfg.get("access_log", {}), "destination": "file", "path": str(path)}
    return cfg


def lines_of(gw: Gateway, path) -> list[dict]:
    gw._access_log.flush(wait=2.0)
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


async def test_a_traceparent_with_a_non_ascii_tail_starts_a_new_trace(upstream, gateway, tmp_path):
    receiver = await OtlpReceiver().start()
    try:
        cfg = base_config(upstream.port, routes=[{"route": "GET /u", "integration": {"type": "http",
                                                                                     "upstream": "demo"}}])
        cfg["tracing"] = {"otlp": {"endpoint": receiver.endpoint}}
        gw = await gateway(logged(cfg, tmp_path / "a.log"))
        c = await RawClient.connect(gw.addresses[0])
        try:  # a later version's extra field that is not printable ASCII: invalid, so a new trace
            tp = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-\xff"
            await c.send(b"GET /u HTTP/1.1\r\nhost: gw.test\r\ntraceparent: " + tp + b"\r\n\r\n"
                         b"GET /u HTTP/1.1\r\nhost: gw.test\r\n\r\n")  # and a pipelined second request
            first, second = await c.read_response(), await c.read_response()
        finally:
            await c.close()
        assert first.status == second.status == 200
        sent = json.loads(first.body)["headers"]["traceparent"]
        assert not sent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736")
        assert [x["status"] for x in lines_of(gw, tmp_path / "a.log")] == [200, 200]
    finally:
        receiver.server.close()


async def test_refused_http_versions_are_logged_with_their_protocol(upstream, gateway, tmp_path):
    gw = await gateway(logged(base_config(upstream.port), tmp_path / "a.log"))
    for version in (b"HTTP/2.0", b"HTTP/0.9"):
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(b"GET /x " + version + b"\r\nhost: gw.test\r\n\r\n")
            assert (await c.read_response()).status in (400, 505)
        finally:
            await c.close()
    lines = lines_of(gw, tmp_path / "a.log")
    assert len(lines) == 2 and {x["status"] for x in lines} <= {400, 505}


# A custom authorizer whose context value is nested 300 levels (orjson writes 254).
DEEP = b'{"isAuthorized": true, "context": {"user": %s, "tenant": "t\\"1"}}' % (b"[" * 300 + b"]" * 300)


async def test_a_value_json_cannot_hold_is_logged_as_text_and_the_connection_goes_on(upstream, gateway, tmp_path):
    auth = await AuthorizerPeer(lambda event: DEEP).start()
    try:
        cfg = base_config(upstream.port, routes=[{"route": "GET /m", "auth": "deep",
                                                  "integration": {"type": "mock", "body": {}}}])
        cfg["authorizers"] = {"deep": {"type": "http", "result_ttl": 0,
                                       "url": auth.url}}
        cfg["access_log"] = {"format": {"user": "$context.authorizer.user", "tenant": "$context.authorizer.tenant"}}
        gw = await gateway(logged(cfg, tmp_path / "a.log"))
        c = await RawClient.connect(gw.addresses[0])
        try:
            statuses = [(await c.request("GET", "/m", headers={"authorization": "x"})).status for _ in range(2)]
            assert statuses == [200, 200]
        finally:
            await c.close()
        lines = lines_of(gw, tmp_path / "a.log")
        assert len(lines) == 2 and lines[0]["tenant"] == 't"1'
        assert isinstance(lines[0]["user"], str) and lines[0]["user"].startswith("[[[")  # its repr, cut
    finally:
        auth.close()


async def test_workers_sharing_a_stdout_pipe_never_interleave_lines(upstream, tmp_path):
    cfg = base_config(upstream.port, workers=2)
    cfg["access_log"] = {"destination": "stdout"}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edgeplane", "serve", "-c", str(path),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            m = READY.search((await asyncio.wait_for(proc.stderr.readline(), 20)).decode())
            if m:
                addr = (m.group(2), int(m.group(3)))
                break
        async def client(n: int) -> None:
            c = await RawClient.connect(addr)
            try:
                for i in range(n):
                    await c.request("GET", f"/users/{i}?pad={'x' * 300}")
            finally:
                await c.close()

        # Nobody reads the pipe during the load: it fills, both workers' writer threads
        # block in their writes, and resume together when it is read: the worst case.
        for _ in range(6):  # new connections each round, so both workers take a share
            await asyncio.gather(*(client(150) for _ in range(8)))
        proc.terminate()
        lines = (await asyncio.wait_for(proc.stdout.read(), 30)).splitlines()
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = [orjson.loads(x) for x in lines]  # each line whole: one JSON object
    assert len(records) == 6 * 8 * 150
    assert len({r["requestId"][:23] for r in records}) == 2  # both workers wrote (their id prefixes)


def _mount_tiny(path) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


async def test_a_full_disk_cuts_no_line_that_follows_and_counts_what_it_lost(upstream, gateway, tmp_path):
    tiny = tmp_path / "tiny"
    if os.geteuid() != 0 or not _mount_tiny(tiny):
        pytest.skip("needs to mount a 16 KiB tmpfs (root, and a kernel that allows it here)")
    try:
        (tiny / "filler").write_bytes(b"x" * 8192)  # what is deleted later, to make room again
        gw = await gateway(logged(base_config(upstream.port), tiny / "a.log"))
        c = await RawClient.connect(gw.addresses[0])
        try:
            for i in range(60):  # ~24 KiB of lines into the ~8 KiB left: a write ends half-way
                await c.request("GET", f"/users/{i}")
                if i % 7 == 6:
                    gw._access_log.flush(wait=2.0)
            gw._access_log.flush(wait=2.0)
            (tiny / "filler").unlink()  # room again
            await c.request("GET", "/users/last")
            gw._access_log.flush(wait=2.0)
        finally:
            await c.close()
        text = (tiny / "a.log").read_bytes().split(b"\n")
        assert text[-1] == b""
        whole = [orjson.loads(x) for x in text[:-3]]  # every line before the cut one is whole
        cut = text[-3]
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(cut)  # the line the full disk cut...
        assert orjson.loads(text[-2])["path"] == "/users/last"  # ...is ended: the next starts whole
        # the lines not written (the cut one among them) are counted
        assert gw.stats()["access_log_dropped"] == 60 - len(whole)
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)


async def test_a_fifo_nobody_reads_is_an_error_at_start_not_a_hang(upstream, tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    gw = Gateway(logged(base_config(upstream.port), fifo))
    with pytest.raises(OSError, match="access_log.path .* a FIFO nobody reads"):
        await asyncio.wait_for(gw.start(), 10)
    await gw.stop(drain_timeout=0.1)


async def test_a_reload_that_replaces_the_log_and_the_exporter_keeps_their_counts(upstream, gateway, tmp_path):
    receiver = await OtlpReceiver().start()
    try:
        cfg = logged(base_config(upstream.port), tmp_path / "a.log")
        cfg["tracing"] = {"flush_interval": "100ms", "otlp": {"endpoint": receiver.endpoint}}
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        try:
            for i in range(10):
                await c.request("GET", f"/users/{i}")
        finally:
            await c.close()
        await receiver.until(20)
        await asyncio.sleep(0.2)
        before = gw.stats()
        cfg["access_log"]["format"] = "$context.status"
        cfg["tracing"]["sample_ratio"] = 0.5
        await gw.reload(cfg)
        after = gw.stats()
        assert after["access_log_lines"] == before["access_log_lines"] == 10
        assert after["tracing"]["exported"] == before["tracing"]["exported"] == 20
    finally:
        receiver.server.close()
