"""The deployment store in Redis (`cluster:` set): every host reads the same pointers.

Keys, under the cluster's `key_prefix` then `deploy:`:

- `d:ID`: a hash (created, description, sha256, base_dir, content, api, api_sha256),
  never changed;
- `ids`: a list of every deployment id, oldest first;
- `stage:NAME`: a list of that stage's records (JSON), oldest first;
- `stages`: the set of stage names with records;
- `version`: incremented in the same transaction as every record.

Each write is one MULTI/EXEC transaction, so a reader never sees a record without
its deployment or a version without its record; a stage's record is appended under
WATCH of its list, so a racing writer makes it fail (`StoreConflict`), not interleave. Every call has the cluster's
timeout (at least 0.5 s); a failure raises `StoreError`, and the gateway keeps serving
what it has (`deploy.served`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, WatchError

from edgeplane.deploy.store import (
    Deployment,
    StageRecord,
    StoreError,
    api_json,
    checked_api,
    conflict,
    digest,
    new_id,
)


class RedisStore:
    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self.where = url
        self.prefix = prefix + "deploy:"
        self.client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     decode_responses=True)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"deployment store redis {self.where}: {exc}") from exc

    def record(self, content: str, api: dict[str, Any], base_dir: str, description: str) -> Deployment:
        served = api_json(api)
        for _ in range(8):
            d = Deployment(new_id(), time.time(), description, digest(content), base_dir, digest(served))
            mapping: dict[str | bytes, str] = {"created": repr(d.created), "description": description,
                                               "sha256": d.sha256, "base_dir": base_dir, "content": content,
                                               "api": served, "api_sha256": d.api_sha256}
            if not self._call(self.client.hsetnx, self._key("d", d.id), "sha256", d.sha256):
                continue  # the id is taken
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._key("d", d.id), mapping=mapping)  # type: ignore[arg-type]
            pipe.rpush(self._key("ids"), d.id)
            self._call(pipe.execute)
            return d
        raise StoreError("could not find a free deployment id")

    def deployment(self, deployment_id: str) -> Deployment | None:
        found = self._call(self.client.hmget, self._key("d", deployment_id),
                           ["created", "description", "sha256", "base_dir", "api_sha256"])
        if found[0] is None:
            return None
        return Deployment(deployment_id, float(found[0]), found[1] or "", found[2] or "", found[3] or "",
                          found[4] or "")

    def content(self, deployment_id: str) -> str:
        text = self._call(self.client.hget, self._key("d", deployment_id), "content")
        if text is None:
            raise StoreError(f"deployment {deployment_id}: not in the store {self.where}")
        return str(text)

    def api(self, deployment_id: str) -> dict[str, Any]:
        found = self.deployment(deployment_id)
        text = self._call(self.client.hget, self._key("d", deployment_id), "api")
        if found is None or text is None:
            raise StoreError(f"deployment {deployment_id}: not in the store {self.where}")
        return checked_api(found, str(text))

    def deployments(self) -> list[Deployment]:
        ids = self._call(self.client.lrange, self._key("ids"), 0, -1)
        found = [self.deployment(i) for i in ids]
        return [d for d in found if d is not None]

    def point(self, record: StageRecord, expected: int) -> StageRecord:
        key = self._key("stage", record.stage)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(key)
                if pipe.llen(key) != expected:
                    raise conflict(record.stage)
                pipe.multi()
                pipe.incr(self._key("version"))
                pipe.sadd(self._key("stages"), record.stage)
                pipe.rpush(key, json.dumps(record.to_json()))
                results = pipe.execute()
        except WatchError:
            raise conflict(record.stage) from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"deployment store redis {self.where}: {exc}") from exc
        return StageRecord(record.stage, record.deployment, record.action, record.at, record.variables,
                           record.canary_off, int(results[0]))

    @staticmethod
    def _parse(raw: str) -> StageRecord:
        r = json.loads(raw)
        return StageRecord(r["stage"], r["deployment"], r["action"], r["at"], r.get("variables") or {},
                           r.get("canary_off"), r.get("seq", 0))

    def history(self, stage: str) -> list[StageRecord]:
        return [self._parse(r) for r in self._call(self.client.lrange, self._key("stage", stage), 0, -1)]

    def current(self) -> dict[str, StageRecord]:
        stages = sorted(self._call(self.client.smembers, self._key("stages")))
        if not stages:
            return {}
        pipe = self.client.pipeline(transaction=True)
        for stage in stages:
            pipe.lindex(self._key("stage", stage), -1)
        last = self._call(pipe.execute)
        return {stage: self._parse(raw) for stage, raw in zip(stages, last, strict=True) if raw}

    def version(self) -> int:
        return int(self._call(self.client.get, self._key("version")) or 0)
