"""`edgeplane import openapi FILE [-o OUT]` and `edgeplane export openapi -c FILE [-o OUT]`.

Owns the two commands' parsers and what they do: read the input (YAML or JSON), convert
(`importer` / `exporter`), check the result (an imported config is loaded as `serve`
would load it; an exported document is validated with openapi-spec-validator when it is
installed), write it (stdout, or OUT), and print the report to stderr. Exit 0 when the
result is valid, 1 otherwise (the errors are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def add_parsers(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("import", help="convert an API definition into edgeplane config (import openapi)",
                       description="Convert an OpenAPI 3.0/3.1 definition, with Amazon API Gateway's "
                                   "x-amazon-apigateway-* extensions, into an edgeplane config. What is not "
                                   "carried over, and every placeholder to fill in, is reported on stderr.")
    kinds = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = kinds.add_parser("openapi", help="an OpenAPI 3 definition (YAML or JSON)",
                         description="Convert an OpenAPI 3 definition (YAML or JSON) into edgeplane config.")
    q.add_argument("file", metavar="FILE", help="the OpenAPI definition")
    q.add_argument("-o", "--output", metavar="OUT", help="write the config here (default: stdout)")
    q.add_argument("--handler-module", default="lambda_handlers", metavar="MODULE",
                   help="the Python module AWS_PROXY (Lambda) integrations become handlers of "
                        "(MODULE:FUNCTION; default: lambda_handlers)")
    p = sub.add_parser("export", help="write the config's API as an API definition (export openapi)",
                       description="Write the config's routes, authorizers, CORS, models and gateway "
                                   "responses as OpenAPI 3.0 with Amazon API Gateway's extensions.")
    kinds = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = kinds.add_parser("openapi", help="OpenAPI 3.0 (YAML, or JSON with --json)",
                         description="Write the config's API as an OpenAPI 3.0 document.")
    config_arg(q)
    q.add_argument("-o", "--output", metavar="OUT", help="write the document here (default: stdout)")
    q.add_argument("--json", action="store_true", help="JSON instead of YAML")
    q.add_argument("--title", default="edgeplane API", help="info.title (default: edgeplane API)")


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)


def cmd_import(args: argparse.Namespace) -> int:
    from edgeplane.config.loader import ConfigError, load_config
    from edgeplane.openapi.importer import ImportError_, import_openapi

    try:
        doc = yaml.safe_load(Path(args.file).read_text())
        config, report = import_openapi(doc, args.handler_module)
    except (OSError, yaml.YAMLError, ImportError_) as exc:
        print(f"edgeplane: cannot import {args.file}: {exc}", file=sys.stderr)
        return 1
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:  # a malformed definition
        print(f"edgeplane: cannot import {args.file}: a malformed definition ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    _write(text, args.output)
    for line in report:
        print(f"note: {line}", file=sys.stderr)
    try:
        load_config(config)
    except ConfigError as exc:
        print("edgeplane: the imported config does not load yet (fill in what the notes name):", file=sys.stderr)
        for error in exc.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print(f"edgeplane: imported {len(config['routes'])} routes; {len(report)} notes", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgeplane.config.loader import ConfigError, load_config
    from edgeplane.openapi.exporter import EXPORTED_TOP, export_openapi

    try:
        raw = yaml.safe_load(Path(args.config).read_text())
        load_config(args.config)  # only a valid config is exported
    except (OSError, yaml.YAMLError) as exc:
        print(f"edgeplane: cannot read {args.config}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"edgeplane: {args.config} is not a valid config:", file=sys.stderr)
        for error in exc.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    doc = export_openapi(raw, title=args.title)
    problems = validate_openapi(doc)
    if problems:  # JSON Schema 2020-12 models, `{proxy+}`: OpenAPI 3.1 says them
        doc["openapi"] = "3.1.0"
        problems = validate_openapi(doc)
    for key in sorted(set(raw) - EXPORTED_TOP):
        print(f"note: `{key}` is not part of the exported API definition (not exported)", file=sys.stderr)
    text = json.dumps(doc, indent=2) + "\n" if args.json else yaml.safe_dump(doc, sort_keys=False)
    _write(text, args.output)
    if problems:
        print(f"edgeplane: the exported document is not valid OpenAPI: {problems[0]}", file=sys.stderr)
        return 1
    return 0


def validate_openapi(doc: dict[str, Any]) -> list[str]:
    """Problems openapi-spec-validator finds ([] when valid, or when it is not installed)."""
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return []
    try:
        validate(doc)
    except Exception as exc:  # its ValidationError and friends
        return [str(exc).splitlines()[0]]
    return []
