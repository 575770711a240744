"""Value parsers shared by every config section: durations, sizes, addresses, hosts.

Owns the formats users write (durations "500ms"/"30s", sizes "10KiB", listen addresses,
target URLs, route hosts) and the small predicates the sections share. Each parser
returns the model value or raises ValueError with a message fit for a located error.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from edgeplane.config import model
from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short

# "500ms", "30s", "1.5s", "5m", "2h", or a bare number of seconds ("30").
DURATION_RE = r"^\s*([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)?\s*$"
# "10240", "512B", "10KiB", "10MiB", "1GiB", "10kB"/"10KB" (x1000), "1MB", "1GB".
SIZE_RE = r"^\s*[0-9]+\s*([bB]|[kKmMgG][iI]?[bB])?\s*$"

INTEGRATION_TIMEOUT_MIN = 0.05
INTEGRATION_TIMEOUT_MAX = 30.0  # Amazon API Gateway's (WebSocket APIs keep it)
HTTP_INTEGRATION_TIMEOUT_MAX = 86_400.0  # an http integration may go past it (streaming), with a warning
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_PATTERN = re.compile(DURATION_RE)
_SIZE_PATTERN = re.compile(SIZE_RE)
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
TEMPLATE_PARAM_RE = re.compile(r"\{([^{}]*)\}")
# Headers the gateway writes itself; a mock may not set them.
MANAGED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive",
                    "upgrade", "te", "trailer", "date"}
BODYLESS_STATUSES = {204, 205, 304}

# Hand-written expectations for titled schema definitions (see schema.py).
EXPECTED = {
    "duration": "a duration: seconds as a number, or a string like '500ms', '30s', '5m', '2h'",
    "size": "a size: bytes as an integer, or a string like '10240', '10KiB', '10MiB', '1MB'",
    "listen address": "a listen address 'host:port' (IPv6 as '[::1]:8080')",
    "listen": "a listen address 'host:port' or a non-empty list of them",
    "workers": "an integer >= 1 or 'auto'",
    "optional listen address": "a listen address 'host:port' or null",
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or "500ms" / "30s" / "1.5m" / "2h" / "30"; ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {EXPECTED['duration']}, got {_describe(value)}")
    if isinstance(value, str):
        m = _DURATION_PATTERN.match(value)
        if m is None:
            raise ValueError(
                f"invalid duration {value!r}: use seconds as a number, or a string like "
                "'500ms', '30s', '5m', '2h'"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(3)]
    else:
        seconds = float(value)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number >= 0, got {_short(value)}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an int or "10240" / "10KiB" / "10MiB" / "1MB"; ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected {EXPECTED['size']}, got {_describe(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if not _SIZE_PATTERN.match(value):
        raise ValueError(
            f"invalid size {value!r}: use bytes as an integer, or a string like "
            "'10240', '10KiB', '10MiB', '1MB'"
        )
    m = re.match(r"\s*([0-9]+)\s*([A-Za-z]*)\s*$", value)
    assert m is not None
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_listen(text: Any) -> model.ListenAddress:
    """"host:port" or "[v6]:port" -> ListenAddress; ValueError with the reason if bad."""
    if not isinstance(text, str):
        raise ValueError(f"expected {EXPECTED['listen address']}, got {_describe(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid listen address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"invalid listen address {text!r}: expected '[host]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {text!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"invalid listen address {text!r}: write IPv6 addresses in brackets, e.g. '[::1]:8080'"
            )
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid listen address {text!r}: missing ':port' (e.g. '127.0.0.1:8080')")
        if not host:
            raise ValueError(
                f"invalid listen address {text!r}: missing host "
                "(use '0.0.0.0:PORT' for every IPv4 interface, '[::]:PORT' for every interface)"
            )
        check_host(host, f"invalid listen address {text!r}")
    port = _parse_port(port_text, f"invalid listen address {text!r}", allow_zero=True)
    return model.ListenAddress(host, port)


def parse_target(text: Any) -> model.Target:
    """"http://host:port" or "https://host:port" -> Target; ValueError with the reason if bad."""
    if not isinstance(text, str):
        raise ValueError(f"expected a target URL 'http://host:port', got {_describe(text)}")
    what = f"invalid target {text!r}"
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or "\x00" in path or len(path.encode()) > 107:
            raise ValueError(f"{what}: a Unix socket target is 'unix:/absolute/path.sock' (at most 107 bytes)")
        return model.Target("unix", path, 0)
    if "://" not in text:
        raise ValueError(f"{what}: expected 'http://host:port'")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{what}: unsupported scheme {scheme!r} (expected 'http://host:port')")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what}: credentials in target URLs are not supported")
    if parts.path not in ("", "/"):
        raise ValueError(f"{what}: a target has no path (rewrite paths with integration.path)")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"{what}: a target has no query or fragment")
    netloc = parts.netloc
    host = parts.hostname
    if not host:
        raise ValueError(f"{what}: missing host")
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        check_host(host, what)
    port_text = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    if ":" in port_text:
        port = _parse_port(port_text.rpartition(":")[2], what, allow_zero=False)
    else:
        port = 80 if scheme == "http" else 443
    return model.Target(scheme, host, port)


def check_host(host: str, what: str) -> None:
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv4 address") from None
        return
    if not _HOSTNAME_RE.match(host.lower()):
        raise ValueError(f"{what}: {host!r} is not a valid host name")


def _parse_port(text: str, what: str, *, allow_zero: bool) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{what}: port must be a number, got {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what}: port must be {low}..65535, got {port}")
    return port


def normalize_route_host(text: str) -> str:
    host = text.strip().lower().rstrip(".")
    what = f"invalid host {text!r}"
    if ":" in host:
        raise ValueError(f"{what}: route hosts have no port (the Host header's port is ignored)")
    bare = host[2:] if host.startswith("*.") else host
    if "*" in bare:
        raise ValueError(f"{what}: a wildcard is only allowed as a leading '*.' ('*.example.com')")
    if not bare or not _HOSTNAME_RE.match(bare):
        raise ValueError(f"{what}: expected a host name like 'api.example.com' or '*.example.com'")
    return host


MAX_THROTTLE = 1_000_000_000  # requests/s and bucket size
WS_MAX_MESSAGE = 16 * 1024 * 1024


def hosts_overlap(a: str | None, b: str | None) -> bool:
    """Whether some Host header can match both route hosts (None = any host)."""
    if a is None or b is None or a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if x.startswith("*.") and y.removeprefix("*.").endswith(x[1:]):
            return True
    return False



def collides(a: model.ListenAddress, b: model.ListenAddress) -> bool:
    """Two listeners that cannot both bind: same non-zero port and overlapping hosts."""
    if a.port == 0 or a.port != b.port:
        return False
    ha, hb = a.host.lower(), b.host.lower()
    return ha == hb or "::" in (ha, hb) or (
        "0.0.0.0" in (ha, hb) and ":" not in ha + hb  # IPv4 wildcard vs an IPv4/name host
    )


def fmt_addr(addr: model.ListenAddress) -> str:
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port}"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def is_header_value(value: str) -> bool:
    """Printable ASCII and tabs: no CR, LF, NUL or other control characters."""
    return all(ch == "\t" or " " <= ch <= "~" for ch in value)
