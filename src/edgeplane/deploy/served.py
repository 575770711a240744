"""What each stage serves: the deployment store's pointers, read and attached to a config.

Owns three steps, run on every load of a config with `stages` (start, reload, the
worker spec):

1. `read_served(config)`: the store's state as JSON: each stage's last record, and the
   API of every deployment a stage or a canary names (a deployment's routes and
   authorizers, read from the content it was recorded with; a canary's config file
   read as it is now). A store that cannot be read (Redis down, a locked file) is not an
   error: the last state this process or this host read is used again
   (`DATA_DIR/deployments-served.json`), and a warning says so; with none, the config
   file's own API is served.
2. `attach(config, served)`: a config whose `apis` give each such stage its API: the
   host's config (listeners, upstreams, stage settings) with the deployment's `routes`
   and `authorizers` in place of the file's, loaded and checked as one config, so every
   reference of the deployment is checked against this host (an upstream it needs, a
   stage variable). A deployment that does not fit is a located error naming the stage
   and the deployment. Authorizers that differ from the file's are renamed
   `NAME@DEPLOYMENT`, so each deployment keeps its own JWKS source and cache.
3. `load_served(...)`: `load_config` then both steps.

Invariants: a stage with no record and no deployed canary is served exactly as before
(the file's routes, its canary by variable overrides). The served state is plain JSON,
so a supervisor reads the store once and every worker builds the same thing from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from edgeplane.config.loader import ConfigError, load_config, load_config_text
from edgeplane.config.model import Config, StageApi
from edgeplane.config.stages import DEPLOYMENT_ID, for_stage, views
from edgeplane.deploy.store import SqliteStore, Store, StoreError

log = logging.getLogger("edgeplane.deploy")

API_KEYS = ("routes", "authorizers", "websocket_apis")  # what a deployment holds; the rest is the host's
CACHE_FILE = "deployments-served.json"

_apis: dict[str, dict[str, Any]] = {}  # deployment id -> its API: immutable, read once per process


def open_store(config: Config) -> Store:
    """The store `config` names: Redis with `cluster:`, else SQLite in `data_dir`."""
    if config.cluster is not None:
        from edgeplane.deploy.redis_store import RedisStore  # redis-py: ~20 MiB, only with `cluster:`

        return RedisStore(config.cluster.redis, config.cluster.key_prefix, max(config.cluster.timeout, 0.5))
    return SqliteStore(config.data_dir)


def api_of(text: str, source: str, base_dir: str | None) -> dict[str, Any]:
    """The API sections of a config file's text, loaded and checked as a whole config
    (paths resolved, `${VAR}` substituted)."""
    raw = load_config_text(text, source, base_dir=base_dir).raw
    return {key: raw[key] for key in API_KEYS if key in raw}


def api_for(store: Store, ref: str) -> dict[str, Any]:
    if DEPLOYMENT_ID.fullmatch(ref) is None:  # a canary's config file, as it is now
        try:
            with open(ref, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError([f"canary deployment: cannot read {ref}: {exc}"], ref) from None
        return api_of(text, ref, os.path.dirname(os.path.abspath(ref)))
    if ref not in _apis:  # recorded resolved, checked against its digest (`store.checked_api`)
        _apis[ref] = store.api(ref)
    return _apis[ref]


def read_state(config: Config, store: Store) -> dict[str, Any]:
    """The served state from `store` (raises `StoreError` or `ConfigError`)."""
    assert config.stages is not None
    version = store.version()
    stages = {name: rec.to_json() for name, rec in store.current().items() if name in config.stages.stages}
    refs = {rec["deployment"] for rec in stages.values() if rec["deployment"]}
    for name, s in config.stages.stages.items():
        canary = s.canary
        if canary is None or not canary.deployment or stages.get(name, {}).get("canary_off") == canary.fingerprint():
            continue  # none, or promoted or aborted: not read
        if DEPLOYMENT_ID.fullmatch(canary.deployment) and store.deployment(canary.deployment) is None:
            raise ConfigError([f"stages.{name}.canary.deployment: no deployment {canary.deployment} in "
                               f"{store.where} (`edgeplane deployments` lists them)"], config.source)
        refs.add(canary.deployment)
    return {"version": version, "store": store.where, "stages": stages,
            "apis": {ref: api_for(store, ref) for ref in sorted(refs)}}


def read_served(config: Config) -> dict[str, Any] | None:
    """The state to attach (see the module docstring); None without `stages`."""
    if config.stages is None:
        return None
    store = open_store(config)
    cache = os.path.join(config.data_dir, CACHE_FILE)
    try:
        state = read_state(config, store)
    except StoreError as exc:
        try:
            with open(cache, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            log.warning("%s; no deployments read before on this host: serving the config file's own API", exc)
            return None
        log.warning("%s; serving the deployments last read (store version %s)", exc, state.get("version"))
        return state
    if state["stages"] or config.cluster is not None:
        try:  # what this host serves if the store is out of reach at its next load
            os.makedirs(config.data_dir, exist_ok=True)
            with open(cache + ".tmp", "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(cache + ".tmp", cache)
        except OSError as exc:
            log.warning("cannot keep the deployments read in %s: %s", cache, exc)
    return state


def attach(config: Config, served: dict[str, Any] | None, plugins: Sequence[Any] = ()) -> Config:
    """`config` with each stage's deployment (see the module docstring)."""
    if not served or config.stages is None:
        return config
    # The authorizers and upstreams every served side needs, by name: the file's, then
    # each side's that differ from them, as `NAME@STAGE` (`NAME@STAGE:canary` on a canary side).
    authorizers = dict(config.authorizers)
    upstreams = dict(config.upstreams)
    built: list[tuple[str, str | None, Config, str | None, Config | None]] = []
    errors: list[str] = []  # every stage's, not only the first's
    for name, stage in config.stages.stages.items():
        rec = served["stages"].get(name)
        canary = stage.canary
        canary_on = canary is not None and (rec is None or rec.get("canary_off") != canary.fingerprint())
        if rec is None and not (canary_on and canary is not None and canary.deployment):
            continue
        for shared in (authorizers, upstreams):  # the file's own copies for this stage: not served now
            for own in [n for n in shared if n.endswith((f"@{name}", f"@{name}:canary"))]:
                del shared[own]
        deployment = rec["deployment"] if rec is not None else None
        variables = {**dict(stage.variables), **(rec["variables"] if rec is not None else {})}
        try:
            main = _compose(config, name, deployment, served, variables, plugins, (authorizers, upstreams))
            side_ref, side = None, None
            if canary_on and canary is not None:
                side_ref = canary.deployment or deployment
                side = _compose(config, name, side_ref, served, {**variables, **dict(canary.variable_overrides)},
                                plugins, (authorizers, upstreams), canary=True)
        except ConfigError as exc:
            errors += exc.errors
            continue
        built.append((name, deployment, main, side_ref, side))
    if errors:
        raise ConfigError(errors, config.source)
    # every side compiles against the one set of authorizers and upstreams the gateway starts
    apis = {name: StageApi(deployment, dataclasses.replace(main, authorizers=authorizers, upstreams=upstreams),
                           side_ref, dataclasses.replace(side, authorizers=authorizers, upstreams=upstreams)
                           if side is not None else None)
            for name, deployment, main, side_ref, side in built}
    attached = dataclasses.replace(config, apis=apis, authorizers=authorizers, upstreams=upstreams, deployed=served)
    # Only the authorizers some stage serves are started (a file's own authorizer no stage
    # uses any more would still fetch its JWKS): what the routes and $connect routes of
    # every stage and canary side name, resolved per stage.
    used = {name for _, _, view in views(attached) for name in _authorizers_named(view)}
    if used >= set(authorizers):
        return attached
    kept = {name: a for name, a in authorizers.items() if name in used}
    return dataclasses.replace(attached, authorizers=kept, apis={
        name: StageApi(api.deployment, dataclasses.replace(api.config, authorizers=kept), api.canary_deployment,
                       dataclasses.replace(api.canary, authorizers=kept) if api.canary is not None else None)
        for name, api in apis.items()})


def _authorizers_named(view: Config) -> set[str]:
    """The authorizers `view`'s routes and WebSocket routes name (resolved for its stage)."""
    return {rc.auth for rc in view.routes if rc.auth} | {
        r.auth for api in view.websocket_apis.values() for r in api.routes.values() if r.auth}


def _compose(config: Config, stage: str, ref: str | None, served: dict[str, Any], variables: dict[str, str],
             plugins: Sequence[Any], shared: tuple[dict[str, Any], dict[str, Any]], canary: bool = False) -> Config:
    """What `stage` (its canary side) serves: the host config with `ref`'s API (None: the
    file's own) on `stage` alone, its references resolved (`for_stage`); the authorizers
    and upstreams it uses are added to `shared`, renamed where they differ."""
    raw = copy.deepcopy(config.raw)
    if ref is not None:
        api = served["apis"].get(ref)
        if api is None:  # a worker given a state without it: a bug, said as a refusal
            raise ConfigError([f"stage {stage!r}: deployment {ref} is not in the state read from the store"],
                              config.source)
        for key in API_KEYS:
            if key in api:
                raw[key] = copy.deepcopy(api[key])
            else:
                raw.pop(key, None)
    spec = {k: v for k, v in raw["stages"][stage].items() if k != "canary"}
    spec["variables"] = variables
    raw["stages"] = {stage: spec}
    raw.pop("domains", None)
    raw.pop("stage_routing", None)
    what = f"stage {stage!r}{' (its canary)' if canary else ''} serving " + (
        f"deployment {ref}" if ref is not None else "this file's API")
    try:
        resolved = for_stage(load_config(raw, plugins=plugins), stage)
    except ConfigError as exc:
        raise ConfigError([f"{what}: {e}" for e in exc.errors], config.source) from None
    suffix = f"@{stage}{':canary' if canary else ''}"
    authorizers, upstreams = shared
    used_auth = {rc.auth for rc in resolved.routes if rc.auth} | {
        r.auth for api in resolved.websocket_apis.values() for r in api.routes.values() if r.auth}
    used_up = {n for rc in resolved.routes for n in (rc.integration.upstream, *(s for s, _ in rc.integration.split))
               if n} | {r.integration.upstream for api in resolved.websocket_apis.values()
                        for r in api.routes.values() if r.integration is not None and r.integration.upstream}
    auth = _share(resolved.authorizers, used_auth, authorizers, suffix)
    up = _share(resolved.upstreams, used_up, upstreams, suffix)
    if not auth and not up:
        return resolved
    routes = tuple(dataclasses.replace(
        rc, auth=auth.get(rc.auth, rc.auth) if rc.auth else None,
        integration=dataclasses.replace(rc.integration, upstream=up.get(rc.integration.upstream or "",
                                                                        rc.integration.upstream),
                                        split=tuple((up.get(n, n), w) for n, w in rc.integration.split)))
        for rc in resolved.routes)
    websockets = {name: dataclasses.replace(api, routes={
        key: dataclasses.replace(
            r, auth=auth.get(r.auth, r.auth) if r.auth else None,
            integration=dataclasses.replace(r.integration, upstream=up.get(r.integration.upstream,
                                                                           r.integration.upstream))
            if r.integration is not None and r.integration.upstream is not None else r.integration)
        for key, r in api.routes.items()}) for name, api in resolved.websocket_apis.items()}
    return dataclasses.replace(resolved, routes=routes, websocket_apis=websockets)


def _share(defined: dict[str, Any], used: set[str], shared: dict[str, Any], suffix: str) -> dict[str, str]:
    """Add the `used` ones of `defined` to `shared`: under their own name when it holds
    the same thing (one runtime, one pool), else as `BASE` + `suffix`. Returns the renames."""
    renamed: dict[str, str] = {}
    for name in sorted(used):
        item = defined[name]
        if shared.get(name) == item:
            continue
        new = name.split("@", 1)[0] + suffix
        shared[new] = dataclasses.replace(item, name=new)
        if new != name:
            renamed[name] = new
    return renamed


def summary(config: Config) -> dict[str, dict[str, Any]]:
    """Stage -> what it serves: `deployment` (None: the config file's API) and, with a
    canary, `canary: {deployment, percent}` (logged at start and reload, in /routes)."""
    if config.stages is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, stage in config.stages.stages.items():
        api = config.apis.get(name)
        entry: dict[str, Any] = {"deployment": api.deployment if api is not None else None}
        running = stage.canary is not None and (api is None or api.canary is not None)
        if running and stage.canary is not None:
            side = api.canary_deployment if api is not None else None
            entry["canary"] = {"deployment": side, "percent": stage.canary.percent}
        out[name] = entry
    return out


def describe(config: Config) -> str:
    """`summary` as one log line: `prod=d-1a2b3c4d (canary d-5e6f7a8b 10%), dev=file`."""
    parts = []
    for name, entry in summary(config).items():
        text = f"{name}={entry['deployment'] or 'file'}"
        if "canary" in entry:
            text += f" (canary {entry['canary']['deployment'] or 'file'} {entry['canary']['percent']:g}%)"
        parts.append(text)
    return ", ".join(parts)


def load_served(source: str | os.PathLike[str] | dict[str, Any], *, overrides: dict[str, Any] | None = None,
                plugins: Sequence[Any] = ()) -> Config:
    """`load_config`, then the deployments its stages serve."""
    config = load_config(source, overrides=overrides, plugins=plugins)
    return attach(config, read_served(config), plugins)
