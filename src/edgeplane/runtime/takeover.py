"""Zero-downtime upgrade: a running instance hands its listening sockets to a successor.

Owns both sides of the hand-over, over a Unix stream socket in the lock directory
(`runtime_dir()/takeover-<pid>.sock`, mode 0600 in a 0700 directory: only this user can
ask):

- `HandoverServer` runs in a single serving process (asyncio), `SupervisorHandover` in
  the supervisor of `workers: N` (its select loop). A successor connects; it receives
  one message: a JSON line describing every listener (kind, host, configured and bound
  port, how many sockets) with the listening sockets' descriptors and their lock
  files' descriptors attached (SCM_RIGHTS). A single process has one socket per
  listener; a supervisor has one per worker slot (SO_REUSEPORT, `runtime.listeners`).
  When the successor answers `READY`, the old instance commits (`on_ready`: it stops
  accepting and drains) and answers `OK`; only then does the successor write its pid
  into the lock files. A successor that disconnects, or is slower than
  `_READY_TIMEOUT`, changes nothing: the old instance keeps serving and the lock files
  keep naming it. One successor at a time: a second one is turned away while a
  hand-over is in progress.
- `receive_listeners(config)` runs in the successor (`serve --takeover`): it finds the
  running instance through the lock file of the config's first listener (which holds
  its pid), takes the sockets, and returns them with a `confirm()` to call once serving.
  Either kind of instance can take over from either kind: every socket received is
  served (a socket of a reuseport group nobody accepts on would hold its share of new
  connections forever), so a single process serves all of a supervisor's slots, and a
  supervisor spreads what it received over its workers and binds any slots missing.

Invariants:
- The exclusive-listener rule holds: a takeover is asked for by the running instance's
  own user through its private socket; a stray second `serve` still gets AddressInUse.
- Listening sockets are shared, not re-bound: the kernel queue never closes, so no
  connection attempt is refused or reset while both instances run, and none queued is
  lost when the old one closes its copies. Locks travel with the
  sockets (an flock belongs to the open file, which the successor now shares), and the
  old instance closes its descriptors without removing the lock files (`detach`).
- WebSocket connections, the in-process throttle buckets and quota deltas do not move:
  the old instance keeps its WebSockets until they close or its drain ends, and flushes
  quota counts to the store the successor loads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from edgeplane.runtime.ports import ListenerLock, lock_name, runtime_dir
from edgeplane.runtime.systemd import alive

log = logging.getLogger("edgeplane.takeover")

_MAX_FDS = 250  # listeners and their locks in one message (SCM_RIGHTS caps near 253)
_READY = b"READY\n"
_OK = b"OK\n"
_READY_TIMEOUT = 60.0  # a successor's start, from receiving the sockets to READY
Listener = tuple[str, str, int, list[socket.socket], Any]  # kind, host, configured port, sockets, lock


class TakeoverError(OSError):
    """No instance to take over from, or the hand-over failed (nothing changed)."""


def socket_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"takeover-{pid}.sock")


class HandoverServer:
    """The serving side. `listeners()` returns [(kind, host, configured port, sockets,
    lock or None)]; `on_ready()` is called once a successor serves on them."""

    def __init__(self, listeners: Callable[[], list[Listener]],
                 on_ready: Callable[[], None]) -> None:
        self._listeners = listeners
        self._on_ready = on_ready
        self._server: asyncio.AbstractServer | None = None
        self.path = socket_path(os.getpid())
        self.handed_over = False
        self._busy = False  # a successor is starting on our sockets

    async def start(self) -> None:
        remove_stale_sockets()
        try:
            os.unlink(self.path)  # a predecessor with our pid (recycled) left it
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # 0600 from the start: no window for other users
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.handed_over or self._busy:
            writer.close()  # one successor at a time
            return
        described = describe(self._listeners())
        if described is None:
            writer.close()
            return
        self._busy = True
        try:
            await self._hand_over(reader, writer, *described)
        except asyncio.CancelledError:  # the loop stops (our own drain): nothing was handed over
            writer.close()
        finally:
            self._busy = False

    async def _hand_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         message: bytes, fds: list[int]) -> None:
        try:
            # The transport's socket object offers no sendmsg (uvloop's is a stand-in): a
            # socket object on a duplicate descriptor sends the message (small: one call on
            # the empty, non-blocking socket), then only the duplicate is closed.
            fileno = writer.get_extra_info("socket").fileno()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(fileno)) as raw:
                socket.send_fds(raw, [message], fds)
            answer = await asyncio.wait_for(reader.readline(), _READY_TIMEOUT)
        except TimeoutError:
            log.warning("takeover abandoned: the successor was not ready in %.0fs; still serving",
                        _READY_TIMEOUT)
            writer.close()
            return
        except OSError as exc:
            log.warning("takeover abandoned: %s; still serving", exc)
            writer.close()
            return
        if answer != _READY:
            writer.close()
            log.warning("takeover abandoned by the successor; still serving")
            return
        self.handed_over = True  # committed: from here on the successor serves
        log.info("takeover: the successor serves on the listeners; draining")
        self._on_ready()  # before the OK: the successor then writes the pidfile, never we after it
        try:
            writer.write(_OK)
            await writer.drain()
        except OSError:
            pass  # the successor is gone already; so is everything it would have served
        writer.close()


def describe(entries: list[Listener]) -> tuple[bytes, list[int]] | None:
    """The hand-over message for `entries` and the descriptors it carries, in order
    (each listener's sockets, then its lock's); None (logged) when too many."""
    described, fds = [], []
    for kind, host, port, socks, lock in entries:
        described.append({"kind": kind, "host": host, "port": port, "sockets": len(socks),
                          "bound": socks[0].getsockname()[1], "lock": lock is not None})
        fds += [sock.fileno() for sock in socks]
        if lock is not None:
            fds.append(lock.fd)
    if len(fds) > _MAX_FDS:
        log.error("takeover refused: %d descriptors to pass (at most %d)", len(fds), _MAX_FDS)
        return None
    return json.dumps({"pid": os.getpid(), "listeners": described}).encode() + b"\n", fds


class SupervisorHandover:
    """The supervisor's side, driven by its select loop: `fileno()` goes into the read
    set and `on_readable()` runs when it is readable. `listeners()` and `on_ready()` as
    for `HandoverServer`. One successor at a time; nothing here blocks for long (the
    message is small, the answer is awaited in the loop)."""

    def __init__(self, listeners: Callable[[], list[Listener]], on_ready: Callable[[], None]) -> None:
        self._listeners = listeners
        self._on_ready = on_ready
        self.path = socket_path(os.getpid())
        self._server: socket.socket | None = None
        self._peer: socket.socket | None = None
        self._peer_since = 0.0
        self.handed_over = False

    def start(self) -> None:
        remove_stale_sockets()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from the start: no window for other users
        try:
            server.bind(self.path)
        except OSError:
            server.close()
            raise
        finally:
            os.umask(old_umask)
        server.listen(4)
        server.setblocking(False)
        self._server = server

    @property
    def busy(self) -> bool:
        """A successor has our sockets and has not answered yet."""
        return self._peer is not None

    def filenos(self) -> list[int]:
        return [s.fileno() for s in (self._server, self._peer) if s is not None]

    def on_readable(self, readable: list[int], now: float) -> None:
        if self._peer is not None and (self._peer.fileno() in readable
                                       or now - self._peer_since > _READY_TIMEOUT):
            self._answer()
        if self._server is not None and self._server.fileno() in readable:
            try:
                peer, _ = self._server.accept()
            except BlockingIOError:
                return
            if self._peer is not None or self.handed_over:
                peer.close()  # one successor at a time
                return
            described = describe(self._listeners())
            if described is None:
                peer.close()
                return
            try:
                peer.settimeout(5)
                socket.send_fds(peer, [described[0]], described[1])
                peer.setblocking(False)
            except OSError as exc:
                log.warning("takeover abandoned: %s; still serving", exc)
                peer.close()
                return
            self._peer, self._peer_since = peer, now

    def _answer(self) -> None:
        peer, self._peer = self._peer, None
        assert peer is not None
        try:
            answer = peer.recv(64)
        except OSError:
            answer = b""
        if answer != _READY:
            peer.close()
            log.warning("takeover abandoned by the successor (or not ready in %.0fs); still serving",
                        _READY_TIMEOUT)
            return
        self.handed_over = True  # committed: from here on the successor serves
        log.info("takeover: the successor serves on the listeners; draining the workers")
        self._on_ready()  # before the OK: the successor then writes the pidfile, never we after it
        try:
            peer.setblocking(True)
            peer.settimeout(5)
            peer.sendall(_OK)
        except OSError:
            pass
        peer.close()

    def close(self) -> None:
        for sock in (self._server, self._peer):
            if sock is not None:
                sock.close()
        self._server = self._peer = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def remove_stale_sockets() -> None:
    """Unlink the hand-over sockets of instances that are gone (killed with SIGKILL)."""
    directory = runtime_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith("takeover-") and name.endswith(".sock")):
            continue
        pid = name[len("takeover-"):-len(".sock")]
        if not pid.isdigit() or alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def successor_argv() -> list[str]:
    """SIGUSR2 (nginx's binary upgrade): this process's own command line with `--takeover`."""
    argv = [sys.executable, "-m", "edgeplane", *sys.argv[1:]]
    if "--takeover" not in argv:
        argv.append("--takeover")
    return argv


class Inherited:
    """What the successor received: sockets by (kind, host, configured port), locks."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._control = sock
        self.pid = pid
        self.sockets: dict[tuple[str, str, int], list[socket.socket]] = {}
        self.bound: dict[tuple[str, str, int], int] = {}
        self.locks: dict[tuple[str, str, int], ListenerLock] = {}
        self.taken: list[ListenerLock] = []  # locks of the listeners we serve on

    def take(self, kind: str, host: str, port: int) -> tuple[list[socket.socket], ListenerLock | None] | None:
        """The inherited listener for a configured address, if any (a port-0 listener
        matches its bound port, and the other way round)."""
        for key in list(self.sockets):
            k, h, p = key
            if k == kind and h == host and (p == port or self.bound[key] == port):
                lock = self.locks.pop(key, None)
                if lock is not None:
                    self.taken.append(lock)
                return self.sockets.pop(key), lock
        return None

    def confirm(self) -> None:
        """We serve: the predecessor stops accepting and drains. TakeoverError when it
        did not commit (gone, or gave up waiting): then nothing is ours, not even the lock
        files, and the caller stops."""
        try:
            self._control.settimeout(10)
            self._control.sendall(_READY)
            answer = self._control.recv(16)
        except OSError as exc:
            answer = b""
            reason = str(exc)
        else:
            reason = "it closed the hand-over"
        finally:
            self._control.close()
        if answer != _OK:
            raise TakeoverError(f"pid {self.pid} did not hand over ({reason}); it keeps serving")
        for lock in self.taken:
            lock.write_pid()  # the lock files name us only once the predecessor committed
        self._close_left()
        for lock in self.locks.values():
            lock.release()

    def abandon(self) -> None:
        self._control.close()
        self._close_left()
        for lock in [*self.locks.values(), *self.taken]:
            lock.detach()  # the predecessor still holds it

    def _close_left(self) -> None:
        """Close the sockets nobody took (listeners the new config dropped)."""
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()


def receive_listeners(host: str, port: int) -> Inherited:
    """Connect to the instance that owns `host:port` (its lock file names its pid)."""
    path = os.path.join(runtime_dir(), lock_name(host, port))
    try:
        with open(path, "rb") as fh:
            pid = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise TakeoverError(f"no running instance owns {host}:{port} (lock {path}: {exc})") from None
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.settimeout(30)
    try:
        control.connect(socket_path(pid))
        message, fds, _flags, _addr = socket.recv_fds(control, 65536, _MAX_FDS)
    except OSError as exc:
        control.close()
        raise TakeoverError(f"cannot take over from pid {pid}: {exc}") from None
    if not message:
        control.close()
        raise TakeoverError(f"pid {pid} turned the hand-over away: another successor is taking over, "
                            "or it is stopping") from None
    try:
        described = json.loads(message)["listeners"]
    except (ValueError, KeyError) as exc:
        for fd in fds:
            os.close(fd)
        control.close()
        raise TakeoverError(f"pid {pid} answered an unreadable hand-over: {exc}") from None
    inherited = Inherited(control, pid)
    it = iter(fds)
    for entry in described:
        key = (entry["kind"], entry["host"], entry["port"])
        family = socket.AF_INET6 if ":" in entry["host"] else socket.AF_INET
        inherited.sockets[key] = [socket.socket(family, socket.SOCK_STREAM, fileno=next(it))
                                  for _ in range(entry.get("sockets", 1))]
        inherited.bound[key] = entry["bound"]
        if entry["lock"]:
            lock_fd = next(it)
            lock = ListenerLock(entry["kind"], entry["host"], entry["bound"],
                                os.path.join(runtime_dir(), lock_name(entry["host"], entry["bound"])), lock_fd)
            inherited.locks[key] = lock
    return inherited
