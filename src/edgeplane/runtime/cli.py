"""The `edgeplane` command line: a thin layer over `config`, `router`, `gateway`, `workers`.

Commands:
  serve          run the gateway (one process, or a supervisor over N workers)
  validate       check a config file; list every error by its location
  reload         make the running gateway reload its config (SIGHUP by pidfile, or the admin API)
  routes         print the compiled route table in match-priority order
  schema         print the JSON Schema of the config file
  demo-upstream  run the bundled demo upstream (echo, /status, /delay, /bytes, /stream)
  certs dev      write a self-signed development certificate and key
  deploy         record a deployment of the config's API and point a stage at it
  deployments    list deployments, or one stage's history
  rollback       point a stage back at an earlier deployment
  canary         promote or abort a stage's canary

Every command that reads a config takes `-c FILE`, or `-c -` for YAML on stdin (its
relative paths then resolve against the current directory). A refused config is printed
one problem per line, ``FILE:LINE:COLUMN: location: message``, the form editors and CI
annotate; `validate --format json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import IO, TYPE_CHECKING, Any, cast

from edgeplane import __version__
from edgeplane.http import native
from edgeplane.runtime.logs import ENV_LOG_FILE, setup_logging

if TYPE_CHECKING:
    import subprocess

DEFAULT_CONFIG = "conf/edgeplane.yaml"
STDIN = "<stdin>"  # how `-c -` names the config in messages and `Config.source`
LOG_LEVELS = ("debug", "info", "warning", "error")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeplane",
        description="edgeplane: an asyncio-native API gateway data plane (HTTP/1.1 and WebSocket).",
        epilog="Run 'edgeplane COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version",
                        version=f"edgeplane {__version__} ({native.describe()}; Python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"config file (YAML), or - to read it from stdin; default: {DEFAULT_CONFIG}")

    p = sub.add_parser("serve", help="run the gateway",
                       description="Run the gateway on a config file. SIGTERM or Ctrl-C drains "
                                   "in-flight requests (up to drain_timeout) and exits 0.")
    config_arg(p)
    p.add_argument("-w", "--workers", metavar="N",
                   help="worker processes: a number or 'auto' (one per CPU); overrides 'workers:'")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="overrides 'log_level:' (default info)")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="the gateway's own log as text lines or JSON objects; overrides 'log.format:'")
    p.add_argument("--parser", choices=("native", "httptools", "h11"), help="overrides 'http.parser:'")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="data listener 'host:port'; repeat for several; replaces 'listen:'")
    p.add_argument("--admin", metavar="ADDR",
                   help="admin listener 'host:port'; replaces 'admin.listen:' (auth and tls stay)")
    p.add_argument("--demo-upstream", type=int, metavar="PORT",
                   help="also run the bundled demo upstream on 127.0.0.1:PORT (a child process "
                        "stopped with the gateway); for trying the default config")
    p.add_argument("--pidfile", metavar="PATH",
                   help="write the pid of the gateway (the supervisor with workers) here; removed at "
                        "exit; refuses to start while it names a running process")
    p.add_argument("--log-file", metavar="PATH",
                   help="append the gateway's own log here instead of stderr (SIGUSR1 reopens it)")
    p.add_argument("--strict", action="store_true",
                   help="refuse to start when an upstream's hostname does not resolve (default: a "
                        "warning, and 503 from that upstream until it resolves)")
    p.add_argument("--takeover", action="store_true",
                   help="zero-downtime upgrade: take the listening sockets of the running instance "
                        "that owns this config's first listener (it then drains and exits); "
                        "any workers: on either side. SIGUSR2 to the running instance (the "
                        "supervisor with workers) does the same")

    p = sub.add_parser("validate", help="check a config file",
                       description="Load and validate a config file. Exit 0 when it is valid; "
                                   "otherwise exit 1 and print every error as "
                                   "'FILE:LINE:COLUMN: location: message'.")
    config_arg(p)
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: one object on stdout, {ok, file, errors, warnings}, each problem "
                        "{location, path, line, column, message}; the exit code is the same")

    p = sub.add_parser("routes", help="print the compiled route table (and WebSocket APIs)",
                       description="Print the compiled route table in match-priority order.")
    config_arg(p)

    p = sub.add_parser("usage", help="print quota usage per API key and period",
                       description="Print the quota counters "
                                   "(usage plans), per API key and period: from DATA_DIR/edgeplane.db, or from Redis "
                                   "when the config has a `cluster` section.")
    config_arg(p)
    p.add_argument("--key", metavar="ID", help="only this API key id")

    p = sub.add_parser("reload", help="reload the running gateway's config",
                       description="Make a running gateway reload its config file: SIGHUP to the pid in "
                                   "--pidfile (the result goes to the gateway's log), or POST "
                                   "/config/reload on --admin (the result is printed). Exit 1 when the "
                                   "new config is refused (422: every error is printed) or the call fails.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--pidfile", metavar="PATH", help="the pidfile given to 'serve --pidfile'")
    target.add_argument("--admin", metavar="ADDR",
                        help="admin listener: 'host:port', 'http://host:port' or 'https://host:port'")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the admin bearer token (default: $EDGEPLANE_ADMIN_TOKEN)")
    p.add_argument("--cafile", metavar="FILE", help="CA certificate(s) to verify an https admin listener")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")

    from edgeplane.deploy.commands import add_parsers as add_release_parsers

    add_release_parsers(sub, config_arg)  # deploy, deployments, rollback, canary

    from edgeplane.openapi.commands import add_parsers as add_openapi_parsers

    add_openapi_parsers(sub, config_arg)  # import openapi, export openapi

    sub.add_parser("schema", help="print the config JSON Schema",
                   description="Print the JSON Schema (draft 2020-12) of the config file, "
                               "for editor completion and CI checks.")

    p = sub.add_parser("demo-upstream", help="run the bundled demo upstream",
                       description="Run the demo upstream: echoes requests as JSON; "
                                   "/status/{code}, /delay/{ms}, /bytes/{n}, /stream/{n}, /2b.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9001, help="port to bind (default 9001; 0 = any)")

    p = sub.add_parser("certs", help="certificate helpers (certs dev)",
                       description="Certificate helpers for TLS listeners.")
    certs = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    p = certs.add_parser("dev", help="write a self-signed development certificate",
                         description="Write a self-signed development certificate (EC P-256, "
                                     "90 days, the hosts as subjectAltName) and its key as "
                                     "DIR/dev.pem and DIR/dev-key.pem. Not for production.")
    p.add_argument("--out", default="conf/certs", metavar="DIR",
                   help="output directory (default conf/certs; created if missing)")
    p.add_argument("--hosts", default="localhost,127.0.0.1,::1", metavar="LIST",
                   help="comma-separated DNS names and IP addresses (default localhost,127.0.0.1,::1)")
    p.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _read(path: str, overrides: dict | None = None):
    """The config at `path` (`-`: YAML from stdin, paths relative to the current
    directory); raises `ConfigError`."""
    from edgeplane.config.loader import load_config, load_config_text
    from edgeplane.deploy.served import attach, read_served

    if path == "-":
        config = load_config_text(sys.stdin.read(), STDIN, overrides=overrides)
    else:
        config = load_config(path, overrides=overrides)
    return attach(config, read_served(config))  # each stage's deployment (`edgeplane deploy`)


def _load(path: str, overrides: dict | None = None):
    """The config, or None after printing every error, one per line, as
    ``FILE:LINE:COLUMN: location: message``."""
    from edgeplane.config.loader import ConfigError

    try:
        return _read(path, overrides)
    except ConfigError as exc:
        source = STDIN if path == "-" else path
        n = len(exc.entries)
        print(f"{source}: invalid configuration ({n} error{'s' if n != 1 else ''}):", file=sys.stderr)
        for problem in exc.entries:
            print(located(source, problem), file=sys.stderr)
        return None


def located(source: str, problem: Any, kind: str = "") -> str:
    """One problem as `FILE:LINE:COLUMN: [kind: ]where: message` (`config.errors.located`)."""
    from edgeplane.config.errors import located as _located

    return _located(source, problem, kind)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What `serve`'s options set over the file (dotted keys: `load_config(overrides=)`);
    a reload of the same file applies them again."""
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers if args.workers == "auto" else _int(args.workers)
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.log_format:
        overrides["log.format"] = args.log_format
    if args.parser:
        overrides["http.parser"] = args.parser  # the rest of `http:` stays
    if args.listen:
        overrides["listen"] = list(args.listen)
    if args.admin:
        overrides["admin.listen"] = args.admin
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from edgeplane.runtime.serving import ignore_quiet_signals

    ignore_quiet_signals()  # a SIGHUP or SIGUSR1 before the loop handles them must not kill us
    overrides = serve_overrides(args)
    if args.strict:
        os.environ["EDGEPLANE_STRICT"] = "1"  # `Gateway.strict`, here and in the workers
    config = _load(args.config, overrides)
    if config is None:
        return 1
    setup_logging(config.log_level, args.log_file, config.log_format)
    if args.log_file:  # the workers append to the same file
        os.environ[ENV_LOG_FILE] = os.path.abspath(args.log_file)
    import logging

    source = STDIN if args.config == "-" else args.config
    for warning in config.warnings:  # once, by the supervisor, before any worker starts
        logging.getLogger("edgeplane").warning("config %s", located(source, _problem(warning)))
    from edgeplane.runtime.systemd import PidFile
    from edgeplane.runtime.workers import resolve_workers, run_single, run_supervisor

    n = resolve_workers(config)
    pidfile = None
    demo = None
    try:
        if args.pidfile and not args.takeover:
            pidfile = PidFile(args.pidfile).acquire()
        elif args.pidfile:  # named us only once we serve: a failed successor leaves it alone
            pidfile = PidFile(args.pidfile)
        demo = _start_demo_upstream(args.demo_upstream) if args.demo_upstream is not None else None
        on_takeover = pidfile.replace if pidfile is not None else None
        on_handover = pidfile.hand_over if pidfile is not None else None
        if n <= 1:
            return run_single(config, overrides=overrides, takeover=args.takeover, on_takeover=on_takeover,
                              on_handover=on_handover)
        return run_supervisor(config, n, overrides=overrides, takeover=args.takeover, on_takeover=on_takeover,
                              on_handover=on_handover)
    except OSError as exc:
        print(f"edgeplane: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait()
        if pidfile is not None:
            pidfile.release()


def _problem(warning: str) -> Any:
    """The `Problem` of a `Config.warnings` entry (a `LocatedStr`)."""
    from edgeplane.config.errors import Problem

    found = getattr(warning, "problem", None)
    if found is not None:
        return found
    location, _, message = warning.partition(": ")
    return Problem(location, message)


def _start_demo_upstream(port: int) -> subprocess.Popen[bytes]:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeplane.runtime.demo_upstream", "--port", str(port)],
        stderr=subprocess.PIPE,
    )
    stderr = cast(IO[bytes], proc.stderr)  # set: stderr=PIPE
    line = stderr.readline().decode().strip()  # "demo upstream listening on ..."
    print(line or "demo upstream failed to start", file=sys.stderr, flush=True)
    return proc


def _int(value: str) -> object:
    try:
        return int(value)
    except ValueError:
        return value  # validation reports it by location


def cmd_validate(args: argparse.Namespace) -> int:
    if args.format == "json":
        return _validate_json(args.config)
    config = _load(args.config)
    if config is None:
        return 1
    source = STDIN if args.config == "-" else args.config
    for warning in config.warnings:
        print(located(source, _problem(warning), "warning"))
    print(f"{source}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return 0


def _validate_json(path: str) -> int:
    """`validate --format json`: one JSON object on stdout, whatever the outcome."""
    import json

    from edgeplane.config.loader import ConfigError

    out: dict[str, Any] = {"ok": True, "file": STDIN if path == "-" else path, "errors": [], "warnings": []}
    try:
        config = _read(path)
    except ConfigError as exc:
        out.update(ok=False, errors=[p.as_dict() for p in exc.entries])
    else:
        out["warnings"] = [_problem(w).as_dict() for w in config.warnings]
        out.update(routes=len(config.routes), upstreams=len(config.upstreams))
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


def cmd_routes(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from edgeplane.routing.chain import describer
    from edgeplane.routing.router import format_table

    if config.stages is None:
        print(format_table(config.routes, describer(config)))
        _print_websocket_apis(config, "\nWebSocket APIs (checked before the routes above):")
        return 0
    from edgeplane.config.stages import views
    from edgeplane.deploy.served import summary

    served = summary(config)
    for i, (stage, canary, view) in enumerate(views(config)):
        entry = served[stage]
        side = entry["canary"] if canary else entry
        what = f"deployment {side['deployment']}" if side["deployment"] else "this file's routes"
        share = f", {side['percent']:g}% of requests" if canary else ""
        print(("\n" if i else "") + f"stage {stage}{' (canary)' if canary else ''}: {what}{share}")
        print(format_table(view.routes, describer(view)).rstrip("\n"))
        _print_websocket_apis(view, "WebSocket APIs of this stage (checked before its routes):")
    return 0


def _print_websocket_apis(config: Any, title: str) -> None:
    if not config.websocket_apis:
        return
    print(title)
    for name, api in config.websocket_apis.items():
        print(f"  {api.host or '(any)'}  {api.path}  websocket_apis.{name}  selection {api.route_selection}")
        for key, route in api.routes.items():
            integ = route.integration
            target = (f"http -> {integ.upstream} POST {integ.path} timeout={integ.timeout:g}s"
                      if integ is not None else "no integration")
            extra = (f"  auth={route.auth}" if route.auth else "") + (
                "  return_response" if route.return_response else "")
            print(f"      {key:<14} {target}{extra}")


def cmd_usage(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    if config.cluster is not None:  # cluster mode: the counts live in Redis
        import asyncio

        from edgeplane.policies.throttle.cluster import REDIS_ERRORS, redis_usage

        try:
            rows = [{"key": r["key_id"], "period": r["period"], "used": r["used"]} for r in
                    asyncio.run(redis_usage(config.cluster.redis, config.cluster.key_prefix, args.key))]
        except REDIS_ERRORS as exc:
            print(f"edgeplane: cannot read usage from redis {config.cluster.redis}: {exc}", file=sys.stderr)
            return 1
    else:
        from edgeplane.policies.quota.store import usage_report

        db = os.path.join(config.data_dir, "edgeplane.db")
        try:
            rows = usage_report(db, args.key)
        except FileNotFoundError:
            print(f"no usage recorded yet ({db} does not exist)")
            return 0
    width = max([len("KEY")] + [len(r["key"]) for r in rows])
    print(f"{'KEY':<{width}}  {'PERIOD':<10}  USED")
    for r in rows:
        print(f"{r['key']:<{width}}  {r['period']:<10}  {r['used']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from edgeplane.config.schema import schema_json

    print(schema_json())
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from edgeplane.runtime.demo_upstream import main as demo_main

    return demo_main(["--host", args.host, "--port", str(args.port)])


def cmd_certs(args: argparse.Namespace) -> int:
    from edgeplane.http.tls import write_dev_cert

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        print("edgeplane certs dev: --hosts is empty", file=sys.stderr)
        return 2
    if args.days < 1:
        print("edgeplane certs dev: --days must be >= 1", file=sys.stderr)
        return 2
    try:
        cert, key = write_dev_cert(args.out, hosts, force=args.force, days=args.days)
    except (OSError, ValueError) as exc:
        print(f"edgeplane certs dev: {exc}", file=sys.stderr)
        return 1
    print(f"certificate: {cert}")
    print(f"key:         {key}")
    print(f"hosts:       {', '.join(hosts)} (self-signed, {args.days} days; for development only)")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    import signal

    from edgeplane.runtime.systemd import alive, read_pid

    if args.pidfile:
        pid = read_pid(args.pidfile)
        if pid is None or not alive(pid):
            print(f"edgeplane reload: {args.pidfile} names no running process"
                  f"{f' (pid {pid})' if pid else ''}", file=sys.stderr)
            return 1
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to pid {pid}: the gateway logs the result (and counts it in /stats reloads)")
        return 0
    return _reload_by_admin(args)


def _reload_by_admin(args: argparse.Namespace) -> int:
    import http.client
    import json
    import ssl
    from urllib.parse import urlsplit

    url = urlsplit(args.admin if "://" in args.admin else f"http://{args.admin}")
    token = os.environ.get("EDGEPLANE_ADMIN_TOKEN", "")
    try:
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read()
        if url.scheme not in ("http", "https") or not url.hostname or not url.port:
            raise ValueError(f"--admin {args.admin!r}: expected host:port or http(s)://host:port")
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            context = ssl.create_default_context(cafile=args.cafile)
            conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=args.timeout, context=context)
        else:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.timeout)
        headers = {"Content-Length": "0"}
        if token.strip():
            headers["Authorization"] = f"Bearer {token.strip()}"
        try:
            conn.request("POST", "/config/reload", headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"edgeplane reload: {exc}", file=sys.stderr)
        return 1
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"message": raw.decode("utf-8", "replace")}
    if status == 200:
        print(json.dumps(body, indent=2))
        return 0
    print(f"edgeplane reload: {status}: {body.get('message', '') if isinstance(body, dict) else body}",
          file=sys.stderr)
    for error in body.get("errors", []) if isinstance(body, dict) else []:
        print(f"  {error}", file=sys.stderr)
    return 1


def release_command(args: argparse.Namespace) -> int:
    from edgeplane.deploy.commands import run

    setup_logging("warning", None)
    return run(args)


COMMANDS = {
    "serve": cmd_serve,
    "validate": cmd_validate,
    "reload": cmd_reload,
    "routes": cmd_routes,
    "schema": cmd_schema,
    "usage": cmd_usage,
    "demo-upstream": cmd_demo_upstream,
    "certs": cmd_certs,
    "deploy": release_command,
    "deployments": release_command,
    "rollback": release_command,
    "canary": release_command,
    "import": lambda args: _openapi("cmd_import", args),
    "export": lambda args: _openapi("cmd_export", args),
}


def _openapi(name: str, args: argparse.Namespace) -> int:
    from edgeplane.openapi import commands

    return int(getattr(commands, name)(args))


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
