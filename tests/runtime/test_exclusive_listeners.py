"""One owner per listen address, named bind errors, descriptor limits (runtime/ports.py).

Real `edgeplane serve` processes on fixed loopback ports (a second instance needs the
same port to collide with; the port is picked free just before), each with its own
XDG_RUNTIME_DIR so the lock files live in the test's tmp_path. Every process is started
in its own session and its whole group is killed at teardown, so no worker outlives a
test. Readiness and log lines are awaited by polling the process's stderr file against
a deadline.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import base_config
from edgeplane import Gateway
from edgeplane.http.tls import write_dev_cert
from edgeplane.runtime.ports import AddressInUse, DescriptorAlarm, ListenerLock, runtime_dir

pytestmark = pytest.mark.timeout(90)

DEADLINE = 20.0  # seconds for a process to become ready / exit / log a line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """One `python -m edgeplane serve` process; stderr goes to a file that is polled."""

    def __init__(self, tmp: Path, name: str, config: dict, *, limit: tuple[int, int] | None = None) -> None:
        self.config = config
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.err_path = tmp / f"{name}.err"
        env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp / "xdg"))

        def lower_limit() -> None:  # in the child, before exec
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)

        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeplane", "serve", "-c", str(path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                start_new_session=True, preexec_fn=lower_limit if limit else None,
            )
        self.pid = self.proc.pid

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str) -> str:
        """Wait until stderr contains `text` (returns stderr); fails if the process exits first."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            err = self.err
            if text in err:
                return err
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.err}")
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {DEADLINE}s:\n{self.err}")

    def ready(self) -> Serve:
        self.wait_for("edgeplane ready")
        return self

    def exit_code(self) -> int:
        """Wait for the process to exit on its own (a refused start)."""
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {DEADLINE}s (expected a refused start):\n{self.err}") from None

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(DEADLINE)

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group: workers that outlived a killed supervisor
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def serve(tmp_path) -> Iterator:
    started: list[Serve] = []

    def start(name: str, config: dict, **kw) -> Serve:
        s = Serve(tmp_path, name, config, **kw)
        started.append(s)
        return s

    (tmp_path / "xdg").mkdir()
    try:
        yield start
    finally:
        for s in started:
            s.kill_group()


def config(data: int, *, admin: int | None = None, tls: tuple[int, str, str] | None = None,
           workers: int = 1) -> dict:
    cfg = base_config(routes=[{"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}],
                      workers=workers, drain_timeout=2)
    cfg["listen"] = [f"127.0.0.1:{data}"]
    if admin is None:
        del cfg["admin"]
    else:
        cfg["admin"]["listen"] = f"127.0.0.1:{admin}"
    if tls is not None:
        port, cert, key = tls
        cfg["tls"] = {"listen": [f"127.0.0.1:{port}"], "certificates": [{"cert": cert, "key": key}]}
    return cfg


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def lock_file(tmp_path: Path, port: int) -> Path:
    return tmp_path / "xdg" / "edgeplane" / f"127.0.0.1_{port}.lock"


@pytest.fixture(scope="module")
def dev_cert(tmp_path_factory) -> tuple[str, str]:
    return write_dev_cert(str(tmp_path_factory.mktemp("certs")), ["localhost", "127.0.0.1"])


# ---------------------------------------------------------------------- a second instance
@pytest.mark.parametrize("workers", [1, 2])
def test_second_serve_on_the_same_config_is_refused_and_the_first_keeps_serving(serve, tmp_path, workers):
    port, admin = free_port(), free_port()
    cfg = config(port, admin=admin, workers=workers)
    first = serve("first", cfg).ready()
    assert lock_file(tmp_path, port).read_text().strip() == str(first.pid)

    second = serve("second", cfg)
    assert second.exit_code() != 0
    expected = (f"edgeplane: cannot start: data listener 127.0.0.1:{port} is in use by edgeplane "
                f"pid {first.pid} (lock {lock_file(tmp_path, port)})")
    assert expected in second.err
    assert "edgeplane ready" not in second.err
    assert ping(port).startswith(b"HTTP/1.1 200 ")
    assert first.proc.poll() is None
    # The refused instance did not take the first one's lock file away.
    assert lock_file(tmp_path, port).read_text().strip() == str(first.pid)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["admin", "TLS"])
def test_admin_and_tls_listeners_are_owned_too(serve, tmp_path, dev_cert, kind, workers):
    cert, key = dev_cert
    shared, first_data = free_port(), free_port()
    first_cfg = config(first_data, admin=shared if kind == "admin" else free_port(),
                       tls=(shared if kind == "TLS" else free_port(), cert, key), workers=workers)
    first = serve("first", first_cfg).ready()

    second_data = free_port()  # only the listener under test collides
    second_cfg = config(second_data, admin=shared if kind == "admin" else free_port(),
                        tls=(shared if kind == "TLS" else free_port(), cert, key), workers=workers)
    second = serve("second", second_cfg)
    assert second.exit_code() != 0
    assert (f"cannot start: {kind} listener 127.0.0.1:{shared} is in use by edgeplane pid {first.pid} "
            f"(lock {lock_file(tmp_path, shared)})") in second.err
    # Nothing the refused instance locked or bound before failing is left behind.
    assert not lock_file(tmp_path, second_data).exists()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", second_data))
    assert ping(first_data).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("kind", "workers"), [("data", 1), ("data", 2), ("admin", 2)])
def test_port_held_by_another_program_gives_a_named_bind_error(serve, tmp_path, kind, workers):
    foreign = socket.socket()
    try:
        if workers > 1:
            # The case SO_REUSEPORT used to hide: a same-user listener that allows sharing.
            foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        held = foreign.getsockname()[1]
        other = free_port()
        cfg = config(held if kind == "data" else other, admin=held if kind == "admin" else free_port(),
                     workers=workers)
        proc = serve("gw", cfg)
        assert proc.exit_code() != 0
        assert (f"edgeplane: cannot start: {kind} listener 127.0.0.1:{held}: "
                f"[Errno {errno.EADDRINUSE}] address already in use") in proc.err
        assert "edgeplane pid" not in proc.err  # no edgeplane owner to name
    finally:
        foreign.close()


# ---------------------------------------------------------------------- after the owner is gone
@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_instance_starts_after_the_first_exits(serve, tmp_path, workers):
    port = free_port()
    cfg = config(port, admin=free_port(), workers=workers)
    first = serve("first", cfg).ready()
    assert first.terminate() == 0
    assert not lock_file(tmp_path, port).exists()  # released and removed on a clean exit
    second = serve("second", cfg).ready()
    assert ping(port).startswith(b"HTTP/1.1 200 ")
    assert lock_file(tmp_path, port).read_text().strip() == str(second.pid)


def test_stale_lock_of_a_killed_instance_does_not_block(serve, tmp_path):
    port = free_port()
    cfg = config(port)
    first = serve("first", cfg).ready()
    first.proc.kill()  # SIGKILL: no cleanup, the lock file stays with a dead pid inside
    first.proc.wait()
    assert lock_file(tmp_path, port).read_text().strip() == str(first.pid)
    second = serve("second", cfg).ready()
    assert lock_file(tmp_path, port).read_text().strip() == str(second.pid)
    assert ping(port).startswith(b"HTTP/1.1 200 ")


def test_inherited_lock_stays_held_until_the_last_holder_exits(tmp_path, monkeypatch):
    """How workers share their supervisor's locks: the descriptor, not the pid, owns."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = free_port()
    lock = ListenerLock.acquire("data", "127.0.0.1", port)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=(lock.fileno(),))
    try:
        lock.detach()  # this process lets go; the child still holds the open file description
        with pytest.raises(AddressInUse) as refused:
            ListenerLock.acquire("data", "127.0.0.1", port)
        assert refused.value.pid == os.getpid()
        assert str(refused.value).startswith(f"data listener 127.0.0.1:{port} is in use by edgeplane pid ")
    finally:
        child.communicate(b"", timeout=10)
    ListenerLock.acquire("data", "127.0.0.1", port).release()


# ---------------------------------------------------------------------- embedded gateways
async def test_embedded_gateways_cannot_share_a_fixed_port(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = free_port()
    cfg = config(port)
    first = Gateway(cfg)
    await first.start()
    try:
        second = Gateway(cfg)
        with pytest.raises(AddressInUse) as refused:
            await second.start()
        assert str(refused.value) == (f"data listener 127.0.0.1:{port} is in use by edgeplane pid "
                                      f"{os.getpid()} (lock {tmp_path}/edgeplane/127.0.0.1_{port}.lock)")
        await second.stop()
    finally:
        await first.stop()
    assert not (tmp_path / "edgeplane" / f"127.0.0.1_{port}.lock").exists()


async def test_unusable_lock_directory_warns_and_the_bind_still_guards(tmp_path, monkeypatch, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "edgeplane").symlink_to(elsewhere)  # planted: never followed
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(PermissionError):
        runtime_dir()
    caplog.set_level(logging.WARNING, "edgeplane")
    port = free_port()
    gw = Gateway(config(port))
    await gw.start()
    try:
        assert any("cannot use the lock directory" in r.getMessage() and f"127.0.0.1:{port}" in r.getMessage()
                   for r in caplog.records)
        assert list(elsewhere.iterdir()) == []
        with pytest.raises(OSError) as refused:
            await Gateway(config(port)).start()
        assert str(refused.value).startswith(f"data listener 127.0.0.1:{port}: [Errno {errno.EADDRINUSE}]")
    finally:
        await gw.stop()


def test_runtime_dir_is_private(tmp_path, monkeypatch):
    (tmp_path / "edgeplane").mkdir(mode=0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = runtime_dir()
    assert path == str(tmp_path / "edgeplane")
    assert os.stat(path).st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------- descriptors
def _limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize("workers", [1, 2])
def test_soft_nofile_limit_is_raised_to_the_hard_limit(serve, workers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 128:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} leaves no room to lower the soft limit")
    low = 100  # below the hard limit, so the test fails unless the gateway raises it
    proc = serve("gw", config(free_port(), workers=workers), limit=(low, hard)).ready()
    expected = str(hard) if hard != resource.RLIM_INFINITY else Path("/proc/sys/fs/nr_open").read_text().strip()
    assert f"file descriptor limit raised to {expected} (the hard limit; was {low})" in proc.err
    pids = [proc.pid]
    if workers > 1:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == workers
        pids += [int(c) for c in children]
    for pid in pids:
        soft_now, hard_now = _limits(pid)
        assert soft_now == hard_now, pid


def test_running_out_of_descriptors_is_logged_and_the_listener_survives(serve):
    port = free_port()
    limit = 64
    proc = serve("gw", config(port), limit=(limit, limit)).ready()
    clients: list[socket.socket] = []
    try:
        # Idle connections until the gateway's descriptor table is full (uvloop then
        # accepts and drops the rest; the gateway's tick notices).
        deadline = time.monotonic() + DEADLINE
        while "out of file descriptors" not in proc.err:
            assert time.monotonic() < deadline, proc.err
            if len(clients) < 3 * limit:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            else:
                time.sleep(0.02)
        line = next(x for x in proc.err.splitlines() if "out of file descriptors" in x)
        assert " ERROR " in line and line.endswith(f"; limit {limit}"), line
    finally:
        for c in clients:
            c.close()
    # Once clients go away the same listener accepts again (it was not closed).
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            if ping(port).startswith(b"HTTP/1.1 200 "):
                break
        except OSError:
            pass  # a connection the full table made the gateway drop
        assert time.monotonic() < deadline, proc.err
        time.sleep(0.05)


EMBEDDED_ON_ASYNCIO = """
import asyncio, resource, sys
from edgeplane import Gateway
from edgeplane.runtime.logs import setup_logging

async def main():
    setup_logging("info")
    gw = Gateway({"listen": ["127.0.0.1:0"], "access_log": {"destination": "off"},
                  "routes": [{"route": "GET /ping", "integration": {"type": "mock"}}]})
    await gw.start()
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    print("ready", gw.addresses[0][1], file=sys.stderr, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_accept_emfile_on_asyncio_loop_is_reported_once_a_second_naming_the_listener(tmp_path):
    """Embedders on asyncio's own loop: its accept EMFILE reaches the alarm's handler."""
    err_path = tmp_path / "embedded.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", EMBEDDED_ON_ASYNCIO], stderr=err,
                                env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)), start_new_session=True)
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + DEADLINE
        while "ready" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.02)
        port = int(err_path.read_text().split("ready ")[1].split()[0])
        wanted = f"out of file descriptors: accept failed on data listener 127.0.0.1:{port}; limit 64"
        while wanted not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            if len(clients) < 200:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            else:
                time.sleep(0.02)
        # Hundreds of failed accepts (asyncio retries the whole backlog), a line a second at most.
        lines = [x for x in err_path.read_text().splitlines() if "out of file descriptors" in x]
        assert len(lines) <= 3, lines
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait()


def test_alarm_rate_limit_counts_what_it_suppressed(caplog):
    caplog.set_level(logging.ERROR, "edgeplane")
    alarm = DescriptorAlarm(interval=3600.0)  # nothing can leave the window during the test
    assert alarm.report("accept failed") is True
    assert alarm.report("accept failed") is False
    assert alarm.report("no descriptor free", sample=True) is False  # a failure was just logged
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["out of file descriptors: accept failed"]
    alarm.interval = 0.0  # window over: the next line carries the count
    assert alarm.report("accept failed") is True
    assert caplog.records[-1].getMessage().endswith("(1 more since the last report)")
