"""Debian's `chromium`, headless, driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe`: the browser reads requests on its fd 3 and writes answers and
events on its fd 4, each a JSON text ended by a NUL byte. No Playwright, no WebSocket, no
port: a few lines of JSON over two pipes. `scripts/test` installs chromium; without it
the tests that need it skip, saying why.

- `Chromium(workdir)`: starts the browser; `page()` opens a tab; `close()`.
- `Page`: `navigate(url)`, `evaluate(js)` (the value, awaited when it is a promise),
  `wait_for(js, timeout)` (until the expression is truthy), `screenshot(width, height)`
  (PNG bytes). Each is blocking: from a test's event loop, call it through
  `asyncio.to_thread` so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SKIP_REASON = ("chromium is not installed (`scripts/test` installs it with apt-get; "
               "by hand: apt-get install --no-install-recommends chromium)")


class BrowserError(Exception):
    pass


class Chromium:
    def __init__(self, workdir: Path, width: int = 1400, height: int = 1000) -> None:
        if CHROMIUM is None:
            pytest.skip(SKIP_REASON)
        to_browser, self._send_fd = os.pipe()
        self._recv_fd, from_browser = os.pipe()
        args = [CHROMIUM, "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={workdir / 'profile'}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
                "--hide-scrollbars", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # as root chromium refuses to start with its sandbox
        # bash moves the pipe ends to the descriptors the protocol names, 3 and 4 (sh may be
        # dash, which knows no descriptor above 9).
        script = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.log = open(workdir / "chromium.log", "wb")  # closed by close()
        self.proc = subprocess.Popen(["bash", "-c", script, "bash", *args], pass_fds=(to_browser, from_browser),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(to_browser)
        os.close(from_browser)
        self._next = 0
        self._buffer = b""
        self._lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 15.0) -> dict[str, Any]:
        """Send one request and wait for its answer (events on the way are dropped)."""
        with self._lock:
            self._next += 1
            ident = self._next
            message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session is not None:
                message["sessionId"] = session
            os.write(self._send_fd, json.dumps(message).encode() + b"\0")
            deadline = time.monotonic() + timeout
            while True:
                while b"\0" in self._buffer:
                    raw, _, self._buffer = self._buffer.partition(b"\0")
                    found = json.loads(raw)
                    if found.get("id") == ident:
                        if "error" in found:
                            raise BrowserError(f"{method}: {found['error']}")
                        return found.get("result", {})
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                    raise BrowserError(f"{method}: no answer in {timeout}s (see chromium.log)")
                chunk = os.read(self._recv_fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"{method}: chromium exited ({self.proc.poll()}; see chromium.log)")
                self._buffer += chunk

    def page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._send_fd, self._recv_fd):
            os.close(fd)
        self.log.close()


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 15.0) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"navigate {url}: {answer['errorText']}")
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r}: {details.get('exception', {}).get('description', details)}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression[:120]!r} still falsy after {timeout}s")
            time.sleep(0.1)

    def screenshot(self, width: int, height: int) -> bytes:
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
