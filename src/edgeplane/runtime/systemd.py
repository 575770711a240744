"""What a service manager sees of an edgeplane process: sd_notify, process titles, pidfiles.

Owns three small, dependency-free pieces of process plumbing (stdlib, plus the optional
`setproctitle` package):

- `notify(...)`: the sd_notify protocol. With `NOTIFY_SOCKET` set (systemd `Type=notify`),
  one datagram of newline-separated `KEY=value` fields to that AF_UNIX socket; a leading
  `@` names an abstract-namespace socket. `ready()`, `reloading()` (with the
  `MONOTONIC_USEC` systemd wants since v253), `stopping()`. Without the variable every
  call is a no-op returning False, so callers never check first.
- `set_title(title)`: a readable process title (`edgeplane: supervisor`,
  `edgeplane: worker 1/4`) in ps, top and /proc/PID/cmdline, with `setproctitle`; without
  it, the 15-byte kernel name (/proc/PID/comm) through prctl(PR_SET_NAME).
- `PidFile`: `--pidfile PATH`, written at start and removed at exit.

Invariants: `notify` never raises (a service manager that went away must not stop the
gateway) and never blocks (datagrams; a full queue drops the message). Only the process
systemd knows as the main one notifies: the supervisor removes `NOTIFY_SOCKET` from its
workers' environment (`runtime.workers`). A `PidFile` refuses a file that names a live
process, is created exclusively (two starting instances cannot both win) and is
removed at exit only while it still names this process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import sys
import time

log = logging.getLogger("edgeplane")

ENV_NOTIFY = "NOTIFY_SOCKET"


# ---------------------------------------------------------------------- sd_notify
def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", ...) to the service manager; False when there is none or
    the message could not be sent."""
    address = os.environ.get(ENV_NOTIFY)
    if not address or not fields:
        return False
    if address.startswith("@"):  # abstract namespace: a leading NUL byte, no file
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("sd_notify: ignoring NOTIFY_SOCKET=%r (neither a path nor @abstract)", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", fields[0], exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Serving: every listener bound (under a supervisor: every worker up)."""
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """A reload starts; `ready()` follows when it is over (applied or refused)."""
    # CLOCK_MONOTONIC in microseconds: what systemd compares reload requests against.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    """The drain begins."""
    return notify("STOPPING=1")


# ---------------------------------------------------------------------- process titles
_PR_SET_NAME = 15
_COMM_MAX = 15  # TASK_COMM_LEN less the NUL


def set_title(title: str) -> None:
    """Show `title` for this process (ps, top, /proc/PID/cmdline; see the module docstring)."""
    try:
        import setproctitle  # optional: the fallback below is shorter but always there
    except ImportError:
        _set_comm(title)
        return
    # The command line stays after the title, as nginx's "master process /usr/sbin/nginx -c
    # ..." does: `pgrep -f "serve -c /etc/edgeplane.yaml"` still finds the process.
    args = " ".join(sys.argv[1:]) if sys.argv[1:2] == ["serve"] else ""
    setproctitle.setproctitle(f"{title} ({args})" if args else title)


def _set_comm(title: str) -> None:
    """The kernel's short name: "edgeplane: worker 1/4" becomes "edgeplane w1/4"."""
    short = title.replace("edgeplane: ", "edgeplane ").replace("worker ", "w").replace("supervisor", "sup")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(short.encode()[:_COMM_MAX]), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the title is a nicety
        pass


# ---------------------------------------------------------------------- pidfile
class PidFileError(OSError):
    """The pidfile names a live process, or cannot be written."""


class PidFile:
    """`--pidfile PATH`: `acquire()` at start, `release()` at exit (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid = 0

    def acquire(self) -> PidFile:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = read_pid(self.path)
                if holder is not None and holder != os.getpid() and alive(holder):
                    raise PidFileError(errno.EEXIST, f"pidfile {self.path} names a running process "
                                                     f"(pid {holder}); is edgeplane already running?") from None
                try:  # stale: its process is gone (or it is unreadable)
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as exc:
                raise PidFileError(exc.errno, f"cannot write pidfile {self.path}: {exc.strerror}") from None
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            self.pid = os.getpid()
            return self
        raise PidFileError(errno.EAGAIN, f"pidfile {self.path} keeps being recreated by another process")

    def replace(self) -> PidFile:
        """Name this process whoever the file named (`serve --takeover`: the predecessor
        leaves a file that no longer names it in place)."""
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)
        self.pid = os.getpid()
        return self

    def hand_over(self) -> None:
        """A takeover successor serves now and names itself in the file: leave it alone
        at exit (called when this process commits, before the successor writes it)."""
        self.pid = 0

    def release(self) -> None:
        """Remove the file if it still names this process. Idempotent."""
        if self.pid and read_pid(self.path) == self.pid:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.pid = 0


def read_pid(path: str) -> int | None:
    """The pid a pidfile holds, or None (missing, empty or not a number)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def alive(pid: int) -> bool:
    """A process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
