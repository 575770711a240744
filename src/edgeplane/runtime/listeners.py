"""The listening sockets of `workers: N`: the supervisor owns them, each worker serves its slot.

Owns how a supervisor claims, keeps and hands out its listen addresses (data, TLS,
admin), and how a worker receives its share, the nginx `reuseport` model:

- `claim(kind, host, port, n)` locks the address (`ports.lock_listener`) and binds the
  first socket exclusively (SO_REUSEPORT is set only after the bind, so a port anyone
  holds, even a same-user SO_REUSEPORT listener, fails here, named), then binds the
  other n - 1 with SO_REUSEPORT and listens on all n. The kernel spreads connections
  over the group; slot j is served by worker j mod n.
- The supervisor keeps the sockets open while their workers live, so a reload or a
  takeover (`runtime.takeover`) hands the very same sockets on. When a worker exits (it
  closes its control channel), is stopped to restart on a new config, or fails to
  start, its slot is paused (`pause`), so the kernel sends that slot's share of new
  connections to the other workers instead of a queue nobody accepts from, and its
  next worker gets fresh sockets (`renew`). On stop the supervisor pauses every data
  slot once the workers stop accepting, so new connections are refused at once, not
  queued until the drain ends.
- A worker gets its slots at spawn (`worker_fds`: descriptors in `pass_fds`, described
  in `ENV_LISTEN_FDS`) and, for addresses a reload adds, over its control channel (a
  SOCK_SEQPACKET socketpair: one message per send, descriptors attached) before the
  reload's SIGHUP (`send_added` / `receive_added`). `Provided` is what the worker's
  `Gateway` takes sockets from (`take`, as `takeover.Inherited`); a socket it does not
  take is closed (the supervisor still holds it).

Invariants: a claim's sockets all listen on one resolved address; a slot that listens
has a live worker serving it (up to the moment the supervisor sees it exit); the supervisor closes a claim's
sockets only after every worker answered the reload that dropped it; nothing is paused
while it is shared with a predecessor or a successor (a takeover).
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import socket
from typing import Any

from edgeplane.runtime.ports import ListenerLock, bind_error, lock_listener

ENV_LISTEN_FDS = "EDGEPLANE_LISTEN_FDS"  # JSON: [[kind, host, port, [fd, ...]], ...]
_BACKLOG = 4096  # as the gateway's own create_server
_MAX_FDS = 250  # descriptors in one message (SCM_RIGHTS caps near 253)


@dataclasses.dataclass
class Claim:
    """One listen address of the supervisor: `port` as configured, `bound` as resolved."""

    kind: str
    host: str
    port: int
    bound: int
    sockets: list[socket.socket]
    lock: ListenerLock | None

    def close(self, *, keep_lock_file: bool = False) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        if self.lock is not None:  # a worker may hold its inherited copy: the file goes now
            self.lock.detach() if keep_lock_file else self.lock.release()
            self.lock = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reuseport_socket(kind: str, host: str, port: int, listen: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise bind_error(kind, host, port, exc) from exc
    return sock


def claim(kind: str, host: str, port: int, n: int) -> Claim:
    """Lock `host:port` and bind n listening sockets on it (port 0 resolved once)."""
    lock = lock_listener(kind, host, port) if port else None
    first = socket.socket(_family(host), socket.SOCK_STREAM)
    found = Claim(kind, host, port, port, [first], lock)
    try:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT on restart
        if first.family == socket.AF_INET6:
            first.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            first.bind((host, port))  # exclusive: SO_REUSEPORT comes after
        except OSError as exc:
            raise bind_error(kind, host, port, exc) from exc
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.listen(_BACKLOG)  # joins the reuseport group here, with the flag set
        found.bound = first.getsockname()[1]
        if not port:
            found.lock = lock_listener(kind, host, found.bound)
        grow(found, n)
    except BaseException:
        found.close()
        raise
    return found


def adopt(kind: str, host: str, port: int, sockets: list[socket.socket], lock: ListenerLock | None,
          n: int) -> Claim:
    """A claim made of sockets received from a predecessor (`serve --takeover`), grown
    to n slots; more than n are kept (the workers serve them all, `slots`). The slots
    added are bound but not listening: each joins the group when its worker serves it
    (its listen), so a successor that fails to start resets no connection on them."""
    found = Claim(kind, host, port, sockets[0].getsockname()[1], list(sockets), lock)
    for sock in sockets:
        # A single process bound its socket without SO_REUSEPORT; set now, it lets the
        # other slots bind, and the kernel makes one reuseport group of them all. (The
        # file status flags are shared with the predecessor: leave O_NONBLOCK alone.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        grow(found, n, listen=False)
    except BaseException:
        for sock in found.sockets[len(sockets):]:
            sock.close()
        raise
    return found


def grow(found: Claim, n: int, listen: bool = True) -> None:
    while len(found.sockets) < n:
        found.sockets.append(_reuseport_socket(found.kind, found.host, found.bound, listen))


def pause(socks: list[socket.socket]) -> None:
    """Stop these listening sockets taking connections, without closing them (HAProxy's
    pause): `shutdown(SHUT_RD)` on a listener unhashes it, so the kernel sends new
    connections to the rest of its reuseport group, or refuses them when none is left
    (those already queued on it are reset). The socket keeps its port. It is not
    listened on again: `renew` replaces it (a socket that allocated its reuseport group
    does not rejoin the group when it listens again, on Linux 6.x)."""
    for sock in socks:
        try:
            # Only a listener: shutdown() on a socket that is not listening marks it
            # read-shut for good, and once it listens again it takes no connection.
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RD)
        except OSError:  # closed meanwhile
            pass


def renew(found: Claim, i: int, n: int) -> None:
    """Worker i of n is about to start after its slot was paused: each of its sockets
    is replaced by a fresh one, bound but not listening (the worker listens), before
    the paused one closes, so the port is held throughout."""
    for j, old in enumerate(found.sockets):
        if j % n == i:
            found.sockets[j] = _reuseport_socket(found.kind, found.host, found.bound, listen=False)
            old.close()


def slots(found: Claim, i: int, n: int) -> list[socket.socket]:
    """The sockets worker i of n serves: slot j goes to worker j mod n, so every socket
    has a worker even when a takeover brought more sockets than workers."""
    return [sock for j, sock in enumerate(found.sockets) if j % n == i]


def _describe(claims: list[Claim], i: int, n: int) -> tuple[list[Any], list[int]]:
    described, fds = [], []
    for found in claims:
        mine = [sock.fileno() for sock in slots(found, i, n)]
        described.append([found.kind, found.host, found.bound, len(mine)])
        fds += mine
    return described, fds


def worker_fds(claims: list[Claim], i: int, n: int) -> tuple[str, list[int]]:
    """(the ENV_LISTEN_FDS value, the descriptors to pass) for worker i at its spawn."""
    described, fds = _describe(claims, i, n)
    it = iter(fds)
    return json.dumps([[kind, host, port, [next(it) for _ in range(count)]]
                       for kind, host, port, count in described]), fds


def send_added(channel: socket.socket, claims: list[Claim], i: int, n: int) -> None:
    """Before a reload's SIGHUP: worker i's slots of the addresses the reload added."""
    if not claims:
        return
    described, fds = _describe(claims, i, n)
    if len(fds) > _MAX_FDS:
        raise OSError(f"{len(fds)} listening sockets to pass to a worker (at most {_MAX_FDS})")
    socket.send_fds(channel, [b"L" + json.dumps(described).encode()], fds)


class Provided:
    """The listening sockets a worker was given, by (kind, host, resolved port)."""

    def __init__(self) -> None:
        self.sockets: dict[tuple[str, str, int], list[socket.socket]] = {}

    def add(self, described: list[Any], fds: list[int]) -> None:
        it = iter(fds)
        for kind, host, port, count in described:
            socks = [socket.socket(_family(host), socket.SOCK_STREAM, fileno=next(it)) for _ in range(count)]
            self.sockets.setdefault((kind, host, port), []).extend(socks)
        for fd in it:  # more than described: never ours to keep
            os.close(fd)

    def take(self, kind: str, host: str, port: int) -> tuple[list[socket.socket], None] | None:
        socks = self.sockets.pop((kind, host, port), None)
        return (socks, None) if socks else None

    def close_left(self) -> None:
        """Sockets nobody took: our copies close; the supervisor's stay."""
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()


def provided_from_env() -> Provided:
    provided = Provided()
    raw = os.environ.get(ENV_LISTEN_FDS)
    if raw:
        entries = json.loads(raw)
        provided.add([[k, h, p, len(fds)] for k, h, p, fds in entries],
                     [fd for *_, fds in entries for fd in fds])
    return provided


def receive_added(channel_fd: int, provided: Provided) -> None:
    """Take every listener message waiting on the control channel (non-blocking)."""
    channel = socket.socket(fileno=os.dup(channel_fd))  # our status lines keep the blocking fd
    try:
        while True:
            try:
                data, ancdata, _flags, _addr = channel.recvmsg(
                    65536, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            if not data:
                return
            if data.startswith(b"L"):
                provided.add(json.loads(data[1:]), list(fds))
            else:
                for fd in fds:
                    os.close(fd)
    finally:
        channel.close()
