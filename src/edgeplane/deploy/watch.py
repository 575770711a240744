"""Noticing a deploy, rollback, promotion or abort: the store's version, polled.

Owns `StoreWatch`: `changed()` reads the store's version (one small query or one Redis
GET) and says whether it moved since the config being served was read; the caller then
reloads (`runtime.serving` in one process, the supervisor with workers), which reads
the store again (`deploy.served`), so the gateway serves the new pointer through the
ordinary reload: validated first, live, nothing dropped.

Invariants: only a config with `stages` is watched. A store out of reach is logged once
(and once when it is back) and changes nothing: the gateway keeps serving what it has.
`POLL_INTERVAL` is how long a change may take to be served.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgeplane.deploy.served import open_store
from edgeplane.deploy.store import Store, StoreError

if TYPE_CHECKING:
    from edgeplane.config.model import Config

log = logging.getLogger("edgeplane.deploy")

POLL_INTERVAL = 1.0  # seconds


class StoreWatch:
    def __init__(self, config: Config) -> None:
        self.store: Store | None = open_store(config) if config.stages is not None else None
        self.seen = (config.deployed or {}).get("version", 0)
        self.down = False
        self.config = config

    def serving(self, config: Config) -> None:
        """The config now served: after a reload, its store version is the one seen. A
        refused reload leaves the old config, and the version that was refused stays
        seen: it is not tried again each second (the next change is)."""
        if config is self.config:
            return
        self.config = config
        self.store = open_store(config) if config.stages is not None else None
        if config.deployed is not None:
            self.seen = config.deployed.get("version", self.seen)

    def changed(self) -> bool:
        if self.store is None:
            return False
        try:
            version = self.store.version()
        except StoreError as exc:
            if not self.down:
                log.warning("%s: serving what was deployed before; retrying every %.0f s", exc, POLL_INTERVAL)
                self.down = True
            return False
        if self.down:
            log.info("deployment store %s is reachable again", self.store.where)
            self.down = False
        if version == self.seen:
            return False
        if version < self.seen:
            log.warning("deployment store %s went back from version %s to %s: it lost records (a Redis "
                        "without persistence, a restored file?); each stage now serves what the store "
                        "holds", self.store.where, self.seen, version)
        log.info("deployment store %s changed (version %s -> %s): reloading", self.store.where, self.seen, version)
        self.seen = version
        return True
