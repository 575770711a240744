"""The deployment store: immutable deployments, and each stage's pointer with its history.

Owns the records and the two places they live:

- `Deployment`: an id (`d-` and 8 hex digits), the time, a description, the SHA-256 of
  the content, and the folder its relative paths resolve against. The content is the
  config file as it was deployed (for people), and the API it defined, resolved at
  deploy time (`${VAR}` substituted, paths absolute), as JSON: what is served, checked
  against its own SHA-256 at every read (`CorruptDeployment` when it changed).
- `StageRecord`: one change of a stage's pointer: the deployment it serves (None: the
  config file's own API), the stage variables a canary promotion added, the canary it
  switched off (`CanaryConfig.fingerprint`), the action (deploy, rollback, promote,
  abort) and the time.
- `SqliteStore`: DATA_DIR/deployments.db and the content in DATA_DIR/deployments/ID.yaml.
- `RedisStore` (`deploy.redis_store`): the same records in Redis, with `cluster:`, so
  every host serves the same deployment.

Invariants: a deployment is never changed or deleted; a pointer change appends a
record, and a stage's state is its last record, so the history is kept and a rollback
is one more record. A record is appended only if the stage's history is still the
length its writer read (`point(record, expected)`, in one transaction): two commands
racing on one stage cannot undo each other; the second gets `StoreConflict`.
`version()` is cheap and grows with every pointer change: it is what a running gateway
polls (`deploy.watch`). Content is written whole (a temporary file renamed) before the
row that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    created: float  # epoch seconds
    description: str
    sha256: str  # of the content
    base_dir: str  # relative paths in the content resolve against this folder
    api_sha256: str = ""  # of the API (canonical JSON)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "description": self.description,
                "sha256": self.sha256, "base_dir": self.base_dir, "api_sha256": self.api_sha256}


@dataclass(frozen=True, slots=True)
class StageRecord:
    stage: str
    deployment: str | None  # None: the config file's own API
    action: str  # deploy | rollback | promote | abort
    at: float
    variables: dict[str, str] = field(default_factory=dict)  # promoted from a canary
    canary_off: str | None = None  # the fingerprint of the canary switched off
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "deployment": self.deployment, "action": self.action, "at": self.at,
                "variables": self.variables, "canary_off": self.canary_off, "seq": self.seq}


class StoreError(Exception):
    """The store cannot be read or written (a file, a lock, Redis): the message says which."""


class StoreConflict(StoreError):
    """Another command changed the stage between this command's read and its write."""


class CorruptDeployment(StoreError):
    """A deployment's API no longer matches the SHA-256 it was recorded with."""


class Store(Protocol):
    where: str  # for messages: the file or the Redis URL

    def record(self, content: str, api: dict[str, Any], base_dir: str, description: str) -> Deployment: ...
    def deployment(self, deployment_id: str) -> Deployment | None: ...
    def content(self, deployment_id: str) -> str: ...
    def api(self, deployment_id: str) -> dict[str, Any]: ...  # checked (`CorruptDeployment`)
    def deployments(self) -> list[Deployment]: ...  # oldest first
    def point(self, record: StageRecord, expected: int) -> StageRecord: ...  # `StoreConflict`
    def history(self, stage: str) -> list[StageRecord]: ...  # oldest first
    def current(self) -> dict[str, StageRecord]: ...
    def version(self) -> int: ...


def new_id() -> str:
    return "d-" + secrets.token_hex(4)


def digest(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def api_json(api: dict[str, Any]) -> str:
    """The API as stored: canonical JSON (sorted keys), so its digest is stable."""
    return json.dumps(api, sort_keys=True, separators=(",", ":"), default=str)


def checked_api(deployment: Deployment, text: str) -> dict[str, Any]:
    if digest(text) != deployment.api_sha256:
        raise CorruptDeployment(f"deployment {deployment.id}: its API does not match the sha256 it was "
                                "recorded with (changed after it was recorded)")
    api: dict[str, Any] = json.loads(text)
    return api


def conflict(stage: str) -> StoreConflict:
    return StoreConflict(f"stage {stage} changed while this command ran (another deploy, rollback or canary "
                         "command): nothing was changed; run it again")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments(
    id TEXT PRIMARY KEY, created REAL NOT NULL, description TEXT NOT NULL,
    sha256 TEXT NOT NULL, base_dir TEXT NOT NULL, api_sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stage_records(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, stage TEXT NOT NULL, deployment TEXT,
    action TEXT NOT NULL, at REAL NOT NULL, variables TEXT NOT NULL, canary_off TEXT);
"""


class SqliteStore:
    """DATA_DIR/deployments.db (WAL, busy timeout), DATA_DIR/deployments/ID.yaml (the
    file) and ID.api.json (the API served), both 0600.
    Reading a store that was never written creates nothing: it is empty."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.where = os.path.join(data_dir, "deployments.db")
        self.content_dir = os.path.join(data_dir, "deployments")

    def _connect(self, create: bool = False) -> sqlite3.Connection | None:
        if not create and not os.path.exists(self.where):
            return None
        try:
            if create:
                os.makedirs(self.content_dir, mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.where, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            return db
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"deployment store {self.where}: {exc}") from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = self._connect()
        if db is None:
            return []
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"deployment store {self.where}: {exc}") from exc
        finally:
            db.close()

    def _write(self, path: str, text: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def record(self, content: str, api: dict[str, Any], base_dir: str, description: str) -> Deployment:
        db = self._connect(create=True)
        assert db is not None
        served = api_json(api)
        try:
            for _ in range(8):  # a random id: retried on the unlikely collision
                d = Deployment(new_id(), time.time(), description, digest(content), base_dir, digest(served))
                path = os.path.join(self.content_dir, d.id)
                if os.path.exists(path + ".yaml"):
                    continue
                self._write(path + ".yaml", content)
                self._write(path + ".api.json", served)
                try:
                    db.execute("INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?)",
                               (d.id, d.created, d.description, d.sha256, d.base_dir, d.api_sha256))
                except sqlite3.IntegrityError:
                    continue
                return d
            raise StoreError("could not find a free deployment id")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"deployment store {self.where}: {exc}") from exc
        finally:
            db.close()

    def deployment(self, deployment_id: str) -> Deployment | None:
        rows = self._query("SELECT id, created, description, sha256, base_dir, api_sha256 FROM deployments "
                           "WHERE id = ?", (deployment_id,))
        return Deployment(*rows[0]) if rows else None

    def _read(self, deployment_id: str, suffix: str) -> str:
        path = os.path.join(self.content_dir, deployment_id + suffix)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"deployment {deployment_id}: cannot read {path}: {exc}") from exc

    def content(self, deployment_id: str) -> str:
        return self._read(deployment_id, ".yaml")

    def api(self, deployment_id: str) -> dict[str, Any]:
        found = self.deployment(deployment_id)
        if found is None:
            raise StoreError(f"deployment {deployment_id}: not in the store {self.where}")
        return checked_api(found, self._read(deployment_id, ".api.json"))

    def deployments(self) -> list[Deployment]:
        rows = self._query("SELECT id, created, description, sha256, base_dir, api_sha256 FROM deployments "
                           "ORDER BY created, rowid")
        return [Deployment(*r) for r in rows]

    def point(self, record: StageRecord, expected: int) -> StageRecord:
        db = self._connect(create=True)
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")  # the check and the append: one writer at a time
            (length,) = db.execute("SELECT count(*) FROM stage_records WHERE stage = ?", (record.stage,)).fetchone()
            if length != expected:
                db.execute("ROLLBACK")
                raise conflict(record.stage)
            cur = db.execute("INSERT INTO stage_records(stage, deployment, action, at, variables, canary_off) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (record.stage, record.deployment, record.action, record.at,
                              json.dumps(record.variables), record.canary_off))
            seq = cur.lastrowid or 0
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"deployment store {self.where}: {exc}") from exc
        finally:
            db.close()
        return StageRecord(record.stage, record.deployment, record.action, record.at, record.variables,
                           record.canary_off, seq)

    _RECORD = "SELECT stage, deployment, action, at, variables, canary_off, seq FROM stage_records"

    @staticmethod
    def _row(row: tuple[Any, ...]) -> StageRecord:
        stage, deployment, action, at, variables, canary_off, seq = row
        return StageRecord(stage, deployment, action, at, json.loads(variables), canary_off, seq)

    def history(self, stage: str) -> list[StageRecord]:
        return [self._row(r) for r in self._query(self._RECORD + " WHERE stage = ? ORDER BY seq", (stage,))]

    def current(self) -> dict[str, StageRecord]:
        rows = self._query(self._RECORD + " WHERE seq IN (SELECT max(seq) FROM stage_records GROUP BY stage)")
        return {r[0]: self._row(r) for r in rows}

    def version(self) -> int:
        rows = self._query("SELECT max(seq) FROM stage_records")
        return int(rows[0][0] or 0) if rows else 0
