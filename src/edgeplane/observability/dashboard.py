"""The dashboard of the admin listener (`GET /`), for a person who would rather look than read.

Owns the two pages, package data in `static/` read once, and the headers they go out with:
- `dashboard.html`: the config hash and the last reload; routes with their policies
  (authorizer, throttle, CORS); upstreams with target health and pool state; live charts
  of request rate, p50/p99 latency and error rate, overall and per route; throttle and
  authorizer refusals; open connections and WebSockets. Vanilla JS polls `stats`,
  `metrics`, `routes` and `upstreams` of the admin API every 2 s and draws SVG by hand:
  no build step, nothing loaded from anywhere else.
- `signin.html`: the body of the 401 that `GET /` answers when the admin API wants a
  bearer token. It asks for the token, keeps it in `sessionStorage` (this tab, this
  origin), fetches the dashboard with it and shows it; the dashboard sends it with every
  poll. No cookie: nothing the browser would send by itself (no cross-site request
  forgery), nothing shared with the data listeners of the same host (cookies ignore
  ports), gone when the tab closes.

Both go out with a Content-Security-Policy that runs only their own inline scripts and
styles (by hash) and lets the page talk to the admin listener only, and are never cached.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

HTML_TYPE = b"text/html; charset=utf-8"
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


class Pages:
    __slots__ = ("dashboard", "signin", "headers")

    def __init__(self, dashboard: bytes, signin: bytes) -> None:
        self.dashboard = dashboard
        self.signin = signin
        self.headers = security_headers(dashboard, signin)


@cache
def pages() -> Pages:
    """The pages, read from the package once per process."""
    folder = resources.files("edgeplane.observability").joinpath("static")
    return Pages(folder.joinpath("dashboard.html").read_bytes(), folder.joinpath("signin.html").read_bytes())


def security_headers(*html: bytes) -> bytes:
    """Header lines for the pages: the sign-in page replaces itself with the dashboard
    (`document.write`), so one policy names the inline code of both."""
    allowed: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for page in html:
        for kind, code in _INLINE.findall(page):
            allowed[kind].append(f"'sha256-{base64.b64encode(hashlib.sha256(code).digest()).decode()}'")
    csp = (f"default-src 'none'; script-src {' '.join(allowed[b'script'])}; "
           f"style-src {' '.join(allowed[b'style'])}; connect-src 'self'; img-src data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return (f"content-security-policy: {csp}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n"
            "x-frame-options: DENY\r\nreferrer-policy: no-referrer\r\n").encode()


class DashboardIntegration:
    """`GET /`: the dashboard (behind the admin API's credential stage)."""

    __slots__ = ()

    def __init__(self) -> None:
        pages()  # read when the admin app is built: a broken install fails at start

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        found = pages()
        proto.send_local(req, 200, found.dashboard, HTML_TYPE, extra=found.headers)
