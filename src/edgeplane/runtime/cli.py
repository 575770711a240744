"""The `edgeplane` command line: a thin layer over `config`, `router`, `gateway`, `workers`.

Commands:
  serve          run the gateway (one process, or a supervisor over N workers)
  validate       check a config file; list every error by its location
  routes         print the compiled route table in match-priority order
  schema         print the JSON Schema of the config file
  demo-upstream  run the bundled demo upstream (echo, /status, /delay, /bytes, /stream)
  certs dev      write a self-signed development certificate and key
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, TYPE_CHECKING, cast

from edgeplane import __version__
from edgeplane.runtime.logs import setup_logging

if TYPE_CHECKING:
    import subprocess

DEFAULT_CONFIG = "conf/edgeplane.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeplane",
        description="edgeplane: an asyncio-native API gateway data plane (HTTP/1.1 and WebSocket).",
        epilog="Run 'edgeplane COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"edgeplane {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"config file (YAML); default: {DEFAULT_CONFIG}")

    p = sub.add_parser("serve", help="run the gateway",
                       description="Run the gateway on a config file. SIGTERM or Ctrl-C drains "
                                   "in-flight requests (up to drain_timeout) and exits 0.")
    config_arg(p)
    p.add_argument("-w", "--workers", metavar="N",
                   help="worker processes: a number or 'auto' (one per CPU); overrides 'workers:'")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="overrides 'log_level:' (default info)")
    p.add_argument("--parser", choices=("httptools", "h11"), help="overrides 'http.parser:'")
    p.add_argument("--demo-upstream", type=int, metavar="PORT",
                   help="also run the bundled demo upstream on 127.0.0.1:PORT (a child process "
                        "stopped with the gateway); for trying the default config")

    p = sub.add_parser("validate", help="check a config file",
                       description="Load and validate a config file. Exit 0 when it is valid; "
                                   "otherwise exit 1 and print every error as 'location: message'.")
    config_arg(p)

    p = sub.add_parser("routes", help="print the compiled route table (and WebSocket APIs)",
                       description="Print the compiled route table in match-priority order.")
    config_arg(p)

    p = sub.add_parser("usage", help="print quota usage per API key and period",
                       description="Print the quota counters "
                                   "(usage plans), per API key and period: from DATA_DIR/edgeplane.db, or from Redis "
                                   "when the config has a `cluster` section.")
    config_arg(p)
    p.add_argument("--key", metavar="ID", help="only this API key id")

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


def _load(path: str, overrides: dict | None = None):
    from edgeplane.config.loader import ConfigError, load_config

    try:
        return load_config(path, overrides=overrides)
    except ConfigError as exc:
        print(f"{path}: invalid configuration ({len(exc.errors)} error(s)):", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.workers is not None:
        overrides["workers"] = args.workers if args.workers == "auto" else _int(args.workers)
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.parser:
        overrides["http"] = {"parser": args.parser}
    config = _load(args.config, overrides)
    if config is None:
        return 1
    setup_logging(config.log_level)
    import logging

    for warning in config.warnings:  # once, by the supervisor, before any worker starts
        logging.getLogger("edgeplane").warning("config %s: %s", args.config, warning)
    from edgeplane.runtime.workers import resolve_workers, run_single, run_supervisor

    n = resolve_workers(config)
    demo = _start_demo_upstream(args.demo_upstream) if args.demo_upstream is not None else None
    try:
        if n <= 1:
            return run_single(config)
        return run_supervisor(config, n)
    except OSError as exc:
        print(f"edgeplane: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait()


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
    config = _load(args.config)
    if config is None:
        return 1
    for warning in config.warnings:
        print(f"{args.config}: warning: {warning}")
    print(f"{args.config}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from edgeplane.routing.chain import describer
    from edgeplane.routing.router import format_table

    print(format_table(config.routes, describer(config)))
    if config.websocket_apis:
        print("\nWebSocket APIs (checked before the routes above):")
        for name, api in config.websocket_apis.items():
            print(f"  {api.host or '(any)'}  {api.path}  websocket_apis.{name}  "
                  f"selection {api.route_selection}")
            for key, route in api.routes.items():
                integ = route.integration
                target = (f"http -> {integ.upstream} POST {integ.path} timeout={integ.timeout:g}s"
                          if integ is not None else "no integration")
                extra = (f"  auth={route.auth}" if route.auth else "") + \
                        ("  return_response" if route.return_response else "")
                print(f"      {key:<14} {target}{extra}")
    return 0


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


COMMANDS = {
    "serve": cmd_serve,
    "validate": cmd_validate,
    "routes": cmd_routes,
    "schema": cmd_schema,
    "usage": cmd_usage,
    "demo-upstream": cmd_demo_upstream,
    "certs": cmd_certs,
}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
