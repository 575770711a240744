"""Listener ownership and file-descriptor limits: what a process needs before it serves.

Owns three things.

1. One owner per listen address. A running instance (the single process of `workers: 1`,
   the supervisor of `workers: N`) owns each of its listen addresses (data, TLS, admin)
   through a lock file, `<runtime dir>/<host>_<port>.lock` (`[::1]_8080.lock` for IPv6),
   held with an exclusive `flock` for the life of the owner and holding its pid. The
   runtime directory is `$XDG_RUNTIME_DIR/edgeplane`, else `/tmp/edgeplane-<uid>`; it is
   created 0700 and refused when another user owns it or it is not a plain directory.
   A second instance fails to take the lock and refuses to start, naming the listener,
   the address, the owner's pid and the lock (`AddressInUse`).

   Invariants:
   - A fixed port is locked before it is bound, so two instances never both bind it,
     even where SO_REUSEPORT would let them share it. Port 0 has no address to lock in
     advance (nobody can start a second instance "on port 0"); its lock is taken on the
     port the kernel chose, right after the bind, so a later instance configured with
     that port explicitly is refused like any other. (An instance that locked that very
     port in the microseconds before binding it makes the port-0 start fail, not retry:
     the ephemeral range makes it too rare to be worth a loop.)
   - The kernel drops a flock when its holder dies, so a lock file left by a crashed
     owner (a dead pid inside) never blocks a start. A clean release unlinks the file
     while still holding the lock; an acquirer that locked a file since unlinked sees
     the inode change and retries on the fresh path, so two holders never coexist.
   - Workers never lock (they would fight each other): they inherit the supervisor's
     lock descriptors (`ListenerLock.fileno()` goes into `pass_fds`). flock ownership
     belongs to the open file description, so the lock stays held while any process
     serving the port lives: the workers of a SIGKILLed supervisor drain holding it.
   - Hand-over (`serve --takeover`, `runtime.takeover`): a lock is one descriptor. Sent
     over SCM_RIGHTS beside the listening socket it makes the receiver a holder too;
     the receiver rewrites the pid (`ListenerLock(...)` around the received fd, then
     `write_pid()`), the old process closes its copy with `detach()` (no unlink).

   Owners without an edgeplane lock (another program, an older edgeplane) are caught by
   the bind itself: a single process binds without SO_REUSEPORT, and the supervisor's
   first socket (`listeners.claim`) is bound *before* SO_REUSEPORT is set on it, so
   that bind fails on a port anyone holds, even a same-user SO_REUSEPORT listener;
   setting SO_REUSEPORT right after lets its other worker slots join.

2. Named bind errors: every `ListenerError` says the listener kind and address,
   `data listener 127.0.0.1:8080: [Errno 98] address already in use`, and when an
   edgeplane instance holds the same port on an overlapping address, names it too.

3. Descriptors: `raise_nofile_limit()` lifts the soft RLIMIT_NOFILE to the hard limit;
   `DescriptorAlarm` logs running out (EMFILE/ENFILE) at most once per second.
   asyncio's own loop hands an accept EMFILE to the loop's exception handler (and
   retries every 0.1 s); uvloop never does: libuv accepts and closes the pending
   connections itself (its reserve-descriptor trick) and tells nobody. So the alarm
   both wraps the loop's exception handler and offers `probe()`, which the gateway's
   one-second tick calls: one open/close of /dev/null that fails only when the
   descriptor table is full.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import resource
import stat
import time
from typing import Any

from edgeplane.runtime.systemd import alive

log = logging.getLogger("edgeplane")

FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


def fmt_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _strerror(exc: OSError) -> str:
    # The OS text, not the loop's wrapper ("error while attempting to bind on address
    # ('127.0.0.1', 8080): ..."): the listener and address are already in the message.
    if exc.errno is None:
        return str(exc)
    text = os.strerror(exc.errno)
    return f"[Errno {exc.errno}] {text[:1].lower()}{text[1:]}"


class ListenerError(OSError):
    """A listener that cannot be bound or owned; `str()` names its kind and address."""

    def __init__(self, kind: str, host: str, port: int, detail: str, err: int | None) -> None:
        super().__init__(err, detail)
        self.kind = kind
        self.host = host
        self.port = port
        self.detail = detail  # follows "<kind> listener <address>"

    def __str__(self) -> str:
        return f"{self.kind} listener {fmt_address(self.host, self.port)}{self.detail}"


class AddressInUse(ListenerError):
    """The address is locked by another edgeplane instance (`pid`, None if unreadable)."""

    def __init__(self, kind: str, host: str, port: int, pid: int | None, path: str) -> None:
        if pid is None:
            owner = "edgeplane (pid not yet written)"
        else:
            owner = f"edgeplane pid {pid}" + ("" if alive(pid) else " (exited; its workers still serve)")
        super().__init__(kind, host, port, f" is in use by {owner} (lock {path})", errno.EADDRINUSE)
        self.pid = pid
        self.path = path


def bind_error(kind: str, host: str, port: int, exc: OSError) -> ListenerError:
    """`exc` from binding a listener, as a `ListenerError` naming it (passed through if
    it already is one). EADDRINUSE also names an edgeplane owner of the same port on an
    overlapping address (0.0.0.0 vs 127.0.0.1), found through the lock files."""
    if isinstance(exc, ListenerError):
        return exc
    detail = f": {_strerror(exc)}"
    if exc.errno == errno.EADDRINUSE:
        owners = [f"edgeplane pid {pid} listens on {addr} (lock {path})"
                  for addr, pid, path in _port_owners(port)]
        if owners:
            detail += f"; {', '.join(owners)}"
    return ListenerError(kind, host, port, detail, exc.errno)


# ---------------------------------------------------------------------- lock files
def runtime_dir() -> str:
    """The lock directory: `$XDG_RUNTIME_DIR/edgeplane` or `/tmp/edgeplane-<uid>`, 0700.

    Not `tempfile.gettempdir()`: every instance of this user must find the same
    directory whatever its TMPDIR, or the locks would not exclude each other."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base) and os.path.isdir(base):
        path = os.path.join(base, "edgeplane")
    else:
        path = f"/tmp/edgeplane-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    # In a shared /tmp another user could have made the directory first: never trust it.
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(errno.EACCES, f"{path} is not a directory")
    if st.st_uid != uid:
        raise PermissionError(errno.EACCES, f"{path} belongs to uid {st.st_uid}, not {uid}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def lock_name(host: str, port: int) -> str:
    try:
        host = ipaddress.ip_address(host).compressed  # one file per address, however spelt
    except ValueError:
        host = host.lower()  # a host name: locked by name (the bind still catches overlaps)
    return f"[{host}]_{port}.lock" if ":" in host else f"{host}_{port}.lock"


class ListenerLock:
    """The exclusive lock on one listen address; see the module docstring."""

    __slots__ = ("kind", "host", "port", "path", "fd")

    def __init__(self, kind: str, host: str, port: int, path: str, fd: int) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, kind: str, host: str, port: int) -> ListenerLock:
        """Lock `host:port` for this process or raise `AddressInUse` (held by another
        instance) or `ListenerError` (the lock directory or file is unusable)."""
        try:
            path = os.path.join(runtime_dir(), lock_name(host, port))
        except OSError as exc:
            raise ListenerError(kind, host, port, f": cannot use the lock directory: {exc}", exc.errno) from exc
        for _ in range(8):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise ListenerError(kind, host, port, f": cannot open lock {path}: {_strerror(exc)}",
                                    exc.errno) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AddressInUse(kind, host, port, pid, path) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                lock = cls(kind, host, port, path, fd)
                lock.write_pid()
                return lock
            os.close(fd)  # its holder unlinked it while releasing: lock the new file
        raise ListenerError(kind, host, port, f": lock {path} keeps being replaced", errno.EAGAIN)

    def fileno(self) -> int:
        return self.fd

    def write_pid(self) -> None:
        # One write, then the cut: a reader never sees an empty file (its first token is
        # the pid, old or new; a shorter pid leaves a tail the truncate then removes).
        data = f"{os.getpid()}\n".encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock. Idempotent."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.detach()

    def detach(self) -> None:
        """Close this process's descriptor without removing the file (the lock stays
        held by whoever else has it: inheriting workers, a takeover successor)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_listener(kind: str, host: str, port: int) -> ListenerLock | None:
    """`ListenerLock.acquire`, except that an unusable lock directory or file (a
    read-only /tmp, a directory another user made) costs only the pid in a conflict
    message: it is logged and None returned, since the exclusive bind still refuses a
    taken port. `AddressInUse` is raised."""
    try:
        return ListenerLock.acquire(kind, host, port)
    except AddressInUse:
        raise
    except ListenerError as exc:
        log.warning("%s; starting without the lock (the bind still refuses a port in use)", exc)
        return None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _port_owners(port: int) -> list[tuple[str, int, str]]:
    """(address, pid, lock path) of other live edgeplane owners of `port`, any address: a
    hint for an EADDRINUSE, read without locking (a probe lock could make a starting
    instance believe its address is taken)."""
    try:
        directory = runtime_dir()
        names = os.listdir(directory)
    except OSError:
        return []
    suffix = f"_{port}.lock"
    out = []
    for name in sorted(names):
        if not name.endswith(suffix):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            pid = _read_pid(fd)
        finally:
            os.close(fd)
        # Our own lock (taken just before this bind) is not the owner.
        if pid is not None and pid != os.getpid() and alive(pid):
            out.append((f"{name[:-len(suffix)]}:{port}", pid, path))
    return out


# ---------------------------------------------------------------------- descriptors
def raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; (before, after). Logged at info.

    Each client connection and each upstream connection is one descriptor; distributions
    still default the soft limit to 1024, a few hundred concurrent proxied requests."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # the kernel refuses an infinite NOFILE; nr_open is its ceiling
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    new = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (OSError, ValueError) as exc:
            log.warning("file descriptor limit stays %d: cannot raise it to %d (%s)", soft, target, exc)
            return soft, soft
    if new != soft:
        log.info("file descriptor limit raised to %d (the hard limit; was %d)", new, soft)
    else:
        log.info("file descriptor limit %d (the hard limit)", new)
    return soft, new


class DescriptorAlarm:
    """Reports running out of file descriptors, at most one error line per `interval`.

    `install(loop)` wraps the loop's exception handler: accept errors EMFILE/ENFILE
    (what asyncio's loop reports) are logged here, everything else goes to the previous
    handler. `probe()` (from a periodic tick) catches what uvloop swallows.
    `listeners` maps a bound address to its description for the accept message."""

    __slots__ = ("interval", "listeners", "_last_failure", "_last_sample", "_missed", "_loop", "_previous")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.listeners: dict[tuple[Any, ...], str] = {}
        self._last_failure = self._last_sample = -interval
        self._missed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def report(self, what: str, *, sample: bool = False) -> bool:
        """Log `out of file descriptors: <what>; limit N` unless a line was written less
        than `interval` ago; True when one is written.

        A failure (an accept that failed) has its own window and is counted when
        suppressed; a `sample` (the probe) is written only when neither kind was in the
        window, so where the loop reports failures (asyncio) the probe adds no lines."""
        now = time.monotonic()
        if sample:
            if now - max(self._last_failure, self._last_sample) < self.interval:
                return False
            self._last_sample = now
            missed = 0
        elif now - self._last_failure < self.interval:
            self._missed += 1
            return False
        else:
            missed, self._missed, self._last_failure = self._missed, 0, now
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.error("out of file descriptors: %s; limit %d%s", what, soft,
                  f" ({missed} more since the last report)" if missed else "")
        return True

    def probe(self) -> None:
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in FD_EXHAUSTED:
                self.report("no descriptor free (new connections are dropped, upstream connects fail)",
                            sample=True)
            return
        os.close(fd)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        loop, self._loop = self._loop, None
        # Only when still on top: a handler installed after ours keeps delegating to us.
        if loop is not None and loop.get_exception_handler() == self._handle:
            loop.set_exception_handler(self._previous)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in FD_EXHAUSTED:
            where = ""
            sock = context.get("socket")
            if sock is not None:
                try:
                    addr = tuple(sock.getsockname()[:2])
                except OSError:
                    addr = ()
                where = f" on {self.listeners[addr]}" if addr in self.listeners else ""
            self.report(f"accept failed{where}")
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
