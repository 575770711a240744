"""The release commands: `deploy`, `deployments`, `rollback`, `canary promote|abort`.

Owns their arguments (`add_parsers`) and what each writes to the store. Every command
takes the gateway's config (`-c`): it names the stages, the store (`data_dir`, or
Redis with `cluster:`) and, for `deploy`, the API to record. A pointer is changed only
after the API it points to was checked against this config as the gateway will serve
it (`served.attach`), so a deployment that cannot be served is refused here, with its
errors, not in the running gateway. The gateway notices the change within a second
(`deploy.watch`) and reloads.

Exit status: 0 done, 1 refused (printed on stderr, nothing changed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from edgeplane.config.loader import ConfigError, load_config, load_config_text
from edgeplane.config.model import Config
from edgeplane.config.stages import DEPLOYMENT_ID
from edgeplane.deploy.served import api_for, api_of, attach, open_store, read_state
from edgeplane.deploy.store import Deployment, StageRecord, Store, StoreError


class Refused(Exception):
    """What to print (one problem per line) before exiting 1."""


def add_parsers(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("deploy", help="record a deployment of the config's API and point a stage at it",
                       description="Record an immutable deployment of the config file's API (its routes, "
                                   "authorizers and websocket_apis, resolved as the file is now) and point "
                                   "STAGE at it. "
                                   "The running gateway serves it within a second, live.")
    config_arg(p)
    p.add_argument("--stage", required=True, help="the stage to point at the new deployment")
    p.add_argument("-m", "--message", default="", metavar="TEXT", help="the deployment's description")

    p = sub.add_parser("deployments", help="list deployments, or one stage's history",
                       description="List the recorded deployments (and which stages serve each), or with "
                                   "--stage the stage's history of pointer changes, newest last.")
    config_arg(p)
    p.add_argument("--stage", help="this stage's history")
    p.add_argument("--format", choices=("text", "json"), default="text", help="json: one object on stdout")

    p = sub.add_parser("rollback", help="point a stage back at an earlier deployment",
                       description="Point STAGE at the deployment it served before its current one (or "
                                   "--to ID), with the stage variables it had then. Live.")
    config_arg(p)
    p.add_argument("--stage", required=True)
    p.add_argument("--to", metavar="ID", help="this deployment instead of the previous one")

    p = sub.add_parser("canary", help="promote or abort a stage's canary",
                       description="promote: the canary's deployment (and its variable_overrides) becomes "
                                   "the stage's; abort: the canary stops taking requests. Both are live "
                                   "and end the canary configured now (a changed `canary:` runs again).")
    actions = p.add_subparsers(dest="canary_command", metavar="ACTION", required=True)
    for name, text in (("promote", "make the canary the stage's deployment"), ("abort", "remove the canary")):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        config_arg(a)
        a.add_argument("--stage", required=True)


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args.config)
        store = open_store(config)
        handler = {"deploy": _deploy, "deployments": _list, "rollback": _rollback,
                   "canary": _canary}[args.command]
        return handler(args, config, store)
    except Refused as exc:
        print(f"edgeplane {args.command}: {exc}", file=sys.stderr)
    except StoreError as exc:
        print(f"edgeplane {args.command}: {exc}", file=sys.stderr)
    except ConfigError as exc:
        print(f"edgeplane {args.command}: refused ({len(exc.errors)} error(s)):", file=sys.stderr)
        for line in exc.located():
            print(line, file=sys.stderr)
    return 1


def _config(path: str) -> Config:
    if path == "-":
        text = sys.stdin.read()
        config = load_config_text(text, "<stdin>")
    else:
        config = load_config(path)
        text = _read(path)
    if config.stages is None:
        raise Refused(f"{config.source} has no `stages`: deployments are made to a stage")
    _texts[id(config)] = text
    return config


_texts: dict[int, str] = {}  # the config file as written, by its Config: what `deploy` records


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc}") from None


def _text(config: Config) -> str:
    return _texts[id(config)]


def _stage(config: Config, name: str) -> None:
    assert config.stages is not None
    if name not in config.stages.stages:
        raise Refused(f"unknown stage {name!r} (stages in {config.source}: {', '.join(config.stages.stages)})")


_PLACEHOLDER = "d-00000000"  # the id a deployment being checked goes by, before it is recorded


def _check(config: Config, store: Store, stage: str, record: StageRecord, new_api: Any = None) -> None:
    """Refuses unless the gateway can serve `record` on `stage` with this config."""
    state = read_state(config, store)
    if new_api is not None:
        state["apis"][record.deployment] = new_api
    elif record.deployment and record.deployment not in state["apis"]:
        state["apis"][record.deployment] = api_for(store, record.deployment)
    state["stages"][stage] = record.to_json()
    attach(config, state)  # raises ConfigError, located, naming the stage and deployment


def _now(store: Store, stage: str) -> tuple[StageRecord | None, list[StageRecord]]:
    """The stage's current record (None: it never had one) and its whole history, whose
    length the write is conditional on (`Store.point`)."""
    history = store.history(stage)
    return (history[-1] if history else None), history


def _deploy(args: argparse.Namespace, config: Config, store: Store) -> int:
    _stage(config, args.stage)
    text = _text(config)
    base_dir = os.path.dirname(os.path.abspath(args.config)) if args.config != "-" else os.getcwd()
    now, history = _now(store, args.stage)
    record = StageRecord(args.stage, _PLACEHOLDER, "deploy", time.time(),
                         now.variables if now else {}, now.canary_off if now else None)
    api = api_of(text, config.source, base_dir)
    _check(config, store, args.stage, record, api)
    d = store.record(text, api, base_dir, args.message)
    store.point(StageRecord(args.stage, d.id, "deploy", time.time(), record.variables, record.canary_off),
                len(history))
    was = now.deployment if now and now.deployment else "the config file's API"
    print(f"deployed {d.id} to stage {args.stage} (was {was}); sha256 {d.sha256[:12]}"
          + (f': "{d.description}"' if d.description else ""))
    print(f"store: {store.where}; a running gateway serves it within a second")
    return 0


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(args: argparse.Namespace, config: Config, store: Store) -> int:
    _text(config)
    found = {d.id: d for d in store.deployments()}
    current = store.current()
    if args.stage:
        _stage(config, args.stage)
        history = store.history(args.stage)
        if args.format == "json":
            print(json.dumps({"stage": args.stage, "history": [r.to_json() for r in history]}))
            return 0
        if not history:
            print(f"stage {args.stage} has no deployments: it serves the config file's API")
            return 0
        print(f"  {'AT':<20}  {'ACTION':<8}  {'DEPLOYMENT':<10}  DESCRIPTION")
        for i, r in enumerate(history):
            mark = "*" if i == len(history) - 1 else " "
            d = found.get(r.deployment or "")
            desc = d.description if d else "(the config file's API)"
            extra = f" [variables {r.variables}]" if r.variables else ""
            print(f"{mark} {_when(r.at):<20}  {r.action:<8}  {r.deployment or '-':<10}  {desc}{extra}")
        return 0
    serving: dict[str, list[str]] = {}
    for stage, r in sorted(current.items()):
        if r.deployment:
            serving.setdefault(r.deployment, []).append(stage)
    if args.format == "json":
        print(json.dumps({"deployments": [{**d.to_json(), "stages": serving.get(d.id, [])}
                                          for d in found.values()]}))
        return 0
    if not found:
        print(f"no deployments recorded yet ({store.where})")
        return 0
    print(f"{'ID':<10}  {'CREATED':<20}  {'SHA256':<12}  {'STAGES':<16}  DESCRIPTION")
    for d in found.values():
        print(f"{d.id:<10}  {_when(d.created):<20}  {d.sha256[:12]:<12}  "
              f"{','.join(serving.get(d.id, [])) or '-':<16}  {d.description}")
    return 0


def _rollback(args: argparse.Namespace, config: Config, store: Store) -> int:
    _text(config)
    _stage(config, args.stage)
    now, history = _now(store, args.stage)
    if args.to:
        if store.deployment(args.to) is None:
            raise Refused(f"no deployment {args.to} in {store.where} (`edgeplane deployments` lists them)")
        target = StageRecord(args.stage, args.to, "rollback", time.time(), now.variables if now else {},
                             now.canary_off if now else None)
    else:
        if now is None:
            raise Refused(f"stage {args.stage} has no deployments to roll back")
        # the state before the current one: what it served and with which promoted variables
        earlier = [r for r in history[:-1] if (r.deployment, r.variables) != (now.deployment, now.variables)]
        if not earlier:
            raise Refused(f"stage {args.stage} has served only {now.deployment or 'the config file'}: "
                          "nothing earlier to roll back to")
        back = earlier[-1]
        target = StageRecord(args.stage, back.deployment, "rollback", time.time(), back.variables, now.canary_off)
    _check(config, store, args.stage, target)
    store.point(target, len(history))
    was = (now.deployment or "the config file") if now else "the config file"
    extra = f" with variables {target.variables}" if target.variables else ""
    print(f"stage {args.stage}: {was} -> {target.deployment or 'the config file'}{extra} "
          "(rollback); a running gateway serves it within a second")
    return 0


def _canary(args: argparse.Namespace, config: Config, store: Store) -> int:
    text = _text(config)
    _stage(config, args.stage)
    assert config.stages is not None
    canary = config.stages.stages[args.stage].canary
    now, history = _now(store, args.stage)
    if canary is None or (now is not None and now.canary_off == canary.fingerprint()):
        raise Refused(f"stage {args.stage} has no running canary"
                      + (" (this one was promoted or aborted)" if canary is not None else ""))
    variables = dict(now.variables) if now else {}
    deployment = now.deployment if now else None
    if args.canary_command == "abort":
        store.point(StageRecord(args.stage, deployment, "abort", time.time(), variables, canary.fingerprint()),
                    len(history))
        print(f"stage {args.stage}: canary aborted; every request is served by "
              f"{deployment or 'the config file'}")
        return 0
    target = canary.deployment or deployment
    record = StageRecord(args.stage, target or _PLACEHOLDER, "promote", time.time(),
                         {**variables, **dict(canary.variable_overrides)}, canary.fingerprint())
    if target is not None and DEPLOYMENT_ID.fullmatch(target):
        _check(config, store, args.stage, record)
    else:
        # a config file (or the file's own API): recorded, so the stage points at
        # something immutable
        source = target or args.config
        content = text if target is None else _read(source)
        base_dir = os.path.dirname(os.path.abspath(source)) if source != "-" else os.getcwd()
        api = api_of(content, source, base_dir)
        _check(config, store, args.stage, record, api)
        made: Deployment = store.record(content, api, base_dir,
                                        f"canary of {args.stage}, promoted from {os.path.basename(source)}")
        target = made.id
    store.point(StageRecord(args.stage, target, "promote", record.at, record.variables, record.canary_off),
                len(history))
    print(f"stage {args.stage}: canary promoted; {target} serves every request"
          + (f" with variables {dict(canary.variable_overrides)}" if canary.variable_overrides else ""))
    return 0
