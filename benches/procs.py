"""Process plumbing for the bench runner: owns starting, pinning, probing and killing
the processes of a run, and reading their CPU time and memory from /proc.

- `cpu_plan(workers)`: which cores the server under test gets and which the load
  generator and upstream get (separate cores when the machine has at least 2).
- `Procs`: a registry of started processes; every process is started in its own
  session (process group) with its CPU affinity set before exec, so its children
  (gateway workers, nginx workers) inherit the pinning.  `Procs.close()` terminates
  every group it started (SIGTERM, then SIGKILL) and is called from `finally`, so no
  process outlives the runner, on error or Ctrl-C alike; each child also gets SIGTERM
  from the kernel if the runner is killed outright (PR_SET_PDEATHSIG).
- `cpu_seconds(pid)` / `rss_bytes(pid)`: utime+stime / VmRSS summed over a process and
  all its descendants (supervisor + workers, nginx master + workers).
- `free_port()`, `Ports` (from a `--ports LO-HI` range), `wait_http(...)`: ports and
  readiness probes.
- `guarded(...)`: a controller's run: Ctrl-C and SIGTERM as KeyboardInterrupt, the
  controller on the load cores, and whatever happens every process stopped and the
  work dir removed.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- pinning


@dataclass(frozen=True)
class CpuPlan:
    server: frozenset[int] | None  # gateway and peers; None = not pinned
    load: frozenset[int] | None  # load generator and upstream
    note: str


def cpu_plan(workers: int = 1, pin: bool = True) -> CpuPlan:
    """Server on the first core(s), load generator + upstream on the rest."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cores) < 2:
        why = "pinning disabled" if not pin else f"only {len(cores) or 'unknown'} core(s) available"
        return CpuPlan(None, None, f"not pinned ({why}): figures are noisier")
    n_server = max(1, min(workers, len(cores) - 1))
    server, load = frozenset(cores[:n_server]), frozenset(cores[n_server:])
    note = f"server on cores {_fmt(server)}; load generator + upstream on cores {_fmt(load)}"
    if workers > n_server:
        note += f" ({workers} workers share {n_server} core(s))"
    return CpuPlan(server, load, note)


def _fmt(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


# --------------------------------------------------------------------------- processes


class Procs:
    """Starts processes (own session, pinned) and guarantees they are all stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], cores: frozenset[int] | None,
              stdout=None, env: dict | None = None) -> subprocess.Popen:
        """Starts `argv`; stderr (and stdout unless given) go to log_dir/name.log."""
        log = open(self.log_dir / f"{name}.log", "ab")
        def pin() -> None:  # runs in the child, before exec
            if cores:
                os.sched_setaffinity(0, cores)
            _die_with_parent()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else log,
                stderr=log, start_new_session=True, preexec_fn=pin, env=env,
            )
        finally:
            log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def start_ready(self, name: str, argv: list[str], cores: frozenset[int] | None, port: int,
                    path: str | None = "/2b", timeout: float = 30.0) -> subprocess.Popen:
        """`start`, then wait until GET `path` on `port` answers 200 (`path` None: until
        `port` accepts a connection). One that does not get there is stopped, and the
        RuntimeError says why with the tail of its log."""
        proc = self.start(name, argv, cores)
        try:
            if path is None:
                wait_listen(port, proc, timeout)
            else:
                wait_http(port, path, proc, timeout=timeout)
        except RuntimeError as exc:
            self.stop(proc)
            raise RuntimeError(f"{name} did not start: {exc}\n{self.log_tail(name)}") from None
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout`."""
        if proc in self._procs:
            self._procs.remove(proc)
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5)
        _signal_group(proc, signal.SIGKILL)  # stragglers of the group (orphaned workers)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc, timeout=3.0)
            except Exception:  # noqa: BLE001 - best effort, keep stopping the others
                pass


def _die_with_parent() -> None:
    """SIGTERM this process when the runner dies, even by SIGKILL (e.g. a test timeout)."""
    try:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):
        pass


_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from `state` on (comm may hold spaces)


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime (all threads) of `root` and its descendants."""
    ticks = 0
    for pid in descendants(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_bytes(root: int) -> dict[int, int]:
    """VmRSS per process of `root` and its descendants."""
    out = {}
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


# --------------------------------------------------------------------------- network


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before (the kernel may
    return the same ephemeral port to two binds in a row once the first is closed)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = 15.0,
              expect: int = 200) -> None:
    """Waits until GET path on 127.0.0.1:port answers `expect`; raises if proc dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == expect:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"not answering GET {path} on port {port} within {timeout:.0f}s ({last})")


def edgeplane_argv() -> list[str]:
    """The `edgeplane` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "edgeplane"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgeplane"]


def wait_line(path: Path, text: str, proc: subprocess.Popen, timeout: float, who: str | None = None) -> None:
    """Wait until the log at `path` holds `text`; raise if `proc` exits or time runs out."""
    who = who or path.stem
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{who} exited with {proc.returncode} before printing '{text}'")
        time.sleep(0.05)
    raise RuntimeError(f"{who} did not print '{text}' within {timeout:.0f}s")


def write_json(data: dict, path: str | None, prefix: str) -> Path:
    """Write a run's JSON to `path`, or to benches/out/<prefix>-<timestamp>.json."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(path) if path else Path(__file__).resolve().parent / "out" / f"{prefix}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def guarded(script: str, run: Callable[[], Any], stop: Callable[[], None], workdir: Path, *,
            keep_workdir: bool = False, cores: frozenset[int] | None = None,
            errors: dict[type[BaseException], tuple[int, str]] | None = None) -> tuple[Any, int | None]:
    """`run()`'s result and None, or None and the exit code: 130 on Ctrl-C or SIGTERM, 1
    with the message on a RuntimeError, or `errors[type]` = (code, message prefix). Runs
    the controller on `cores`; at the end, in every case, `stop()` (every process the
    bench started) and the work dir removed unless `keep_workdir`."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        return run(), None
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process started", file=sys.stderr)
        return None, 130
    except Exception as exc:
        for kind, (code, prefix) in (errors or {}).items():
            if isinstance(exc, kind):
                print(f"{script}: {prefix}{exc}", file=sys.stderr)
                return None, code
        if isinstance(exc, RuntimeError):
            print(f"{script}: {exc}", file=sys.stderr)
            return None, 1
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        stop()
        if keep_workdir:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class Ports:
    """Loopback ports: from `lo`-`hi` when given (each checked free, never handed out
    twice), else `procs.free_port()`."""

    def __init__(self, spec: str | None) -> None:
        self.range = None
        if spec:
            lo, _, hi = spec.partition("-")
            self.range = iter(range(int(lo), int(hi or lo) + 1))

    def get(self) -> int:
        if self.range is None:
            return free_port()
        for port in self.range:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError("--ports: no free port left in the range")


def wait_listen(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Waits until `port` accepts a TCP connection; raises if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} within {timeout:.0f}s")
