"""OTLP/HTTP export of spans: protobuf encoding and a batching, bounded exporter.

Owns `OtlpExporter`, one per gateway with tracing on (the protobuf encoding is
`otlp_encode`'s, imported only then: the message classes cost ~6 MiB a worker):

- `submit(spans)` runs on the request path: it appends to a deque, or, when
  `max_queue` spans already wait, drops them and counts them (`dropped`). It never
  waits and never does I/O.
- A task on the loop wakes every `flush_interval` (or when `max_batch` spans wait),
  encodes up to `max_batch` spans and POSTs them to the collector
  (`content-type: application/x-protobuf`) through the gateway's own pooled client.
  One export is in flight at a time. A failed export (refused, timed out, a non-2xx
  answer) counts its spans in `failed` and is logged at most once a minute; its spans
  are not retried, and the next attempt waits `flush_interval`, doubling up to 30 s
  while the collector keeps failing (spans queued meanwhile past `max_queue` are
  dropped, counted). A collector that is down costs requests nothing.
- `close()` exports what is left within the export timeout in all, then stops.

`tracer_for(config.tracing, loop, version)` makes a gateway's `tracing.Tracer` with its
exporter (None when tracing is off).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from typing import Any

from edgeplane.config.model import PoolConfig, TracingConfig, UpstreamConfig
from edgeplane.observability.tracing import Tracer
from edgeplane.upstream.client import FetchError, fetch, split_url
from edgeplane.upstream.cluster import Upstream

log = logging.getLogger("edgeplane.tracing")
_MAX_BACKOFF = 30.0  # seconds between attempts while the collector keeps failing


class OtlpExporter:
    def __init__(self, cfg: Any, loop: asyncio.AbstractEventLoop, version: str) -> None:
        self.cfg = cfg
        target, self.path = split_url(cfg.endpoint)
        self.upstream = Upstream(UpstreamConfig(name="tracing:otlp", targets=(target,),
                                                pool=PoolConfig(connect_timeout=min(cfg.timeout, 5.0))), loop)
        self.headers = {"content-type": "application/x-protobuf", **dict(cfg.headers)}
        self.resource = {"service.name": cfg.service_name, "service.version": version,
                         "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                         "telemetry.sdk.name": "edgeplane", "telemetry.sdk.language": "python"}
        self.version = version
        self.queue: collections.deque[Any] = collections.deque()
        self.exported = 0
        self.dropped = 0  # the queue was full
        self.failed = 0  # their export failed
        self._logged_at = -1e9
        self._wake = asyncio.Event()
        self._closing = False
        self._task = loop.create_task(self._run())

    def submit(self, spans: list[Any]) -> None:
        queue = self.queue
        if len(queue) + len(spans) > self.cfg.max_queue or self._closing:
            self.dropped += len(spans)
            return
        queue.extend(spans)
        if len(queue) >= self.cfg.max_batch:
            self._wake.set()

    def telemetry(self) -> dict[str, Any]:
        return {"endpoint": self.cfg.endpoint, "queued": len(self.queue), "exported": self.exported,
                "dropped": self.dropped, "failed": self.failed}

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:  # the collector failed: wait, whatever is queued meanwhile
                await asyncio.sleep(backoff)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.cfg.flush_interval)
                except TimeoutError:
                    pass
            self._wake.clear()
            if await self._drain():
                backoff = 0.0
            else:  # flush_interval, doubling up to 30 s, until an export works again
                backoff = min(max(backoff * 2, self.cfg.flush_interval), _MAX_BACKOFF)

    async def _drain(self) -> bool:
        """Export what is queued, a batch at a time; False at the first failed batch
        (the rest waits for the next attempt)."""
        queue, n = self.queue, self.cfg.max_batch
        while queue:
            batch = [queue.popleft() for _ in range(min(n, len(queue)))]
            if not await self._export(batch):
                return False
        return True

    async def _export(self, batch: list[Any]) -> bool:
        from edgeplane.observability import otlp_encode  # first export only: see the docstring

        try:
            body = otlp_encode.encode(batch, self.resource, self.version)
            status, _, answer = await fetch(self.upstream.pick(), "POST", self.path, headers=self.headers,
                                            body=body, timeout=self.cfg.timeout, max_bytes=64 * 1024)
        except FetchError as exc:
            self._failed(batch, str(exc))
            return False
        except asyncio.CancelledError:  # stopped mid-export: these spans are lost, and counted
            self.failed += len(batch)
            raise
        if 200 <= status < 300:
            self.exported += len(batch)
            return True
        self._failed(batch, f"the collector answered {status}: {answer[:200]!r}")
        return False

    def _failed(self, batch: list[Any], why: str) -> None:
        self.failed += len(batch)
        now = time.monotonic()
        if now - self._logged_at >= 60:
            self._logged_at = now
            log.warning("tracing: exporting %d span(s) to %s failed: %s (%d failed in all; "
                        "logged at most once a minute; retrying with a backoff up to %.0f s)",
                        len(batch), self.cfg.endpoint, why, self.failed, _MAX_BACKOFF)

    async def close(self) -> None:
        """Export what is queued, within `otlp.timeout` in all; what is left then is
        counted as failed. Then stop."""
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await asyncio.wait_for(self._drain(), self.cfg.timeout)
        except TimeoutError:
            pass
        self.failed += len(self.queue)
        self.queue.clear()
        await self.upstream.close()


def tracer_for(cfg: TracingConfig | None, loop: asyncio.AbstractEventLoop, version: str,
               previous: Tracer | None = None) -> Tracer | None:
    """The gateway's tracer and its exporter, or None when `tracing` is not configured;
    the exporter's counts go on from `previous`'s (the tracer a reload replaces)."""
    if cfg is None:
        return None
    exporter = OtlpExporter(cfg, loop, version)
    if previous is not None:
        old = previous.exporter
        exporter.exported, exporter.dropped, exporter.failed = old.exported, old.dropped, old.failed
    return Tracer(cfg.sample_ratio, exporter, cfg.service_name)
