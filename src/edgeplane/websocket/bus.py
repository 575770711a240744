"""@connections across hosts through Redis pub/sub (`cluster:` configured).

Owns `RedisBus`: one per worker. It subscribes to the worker's own channel and carries
@connections operations to the worker that holds a connection on another host, with the
answer coming back on the caller's channel. The registry (`ws_connections`) decides
when a call must travel; this module only moves it and bounds the wait.

Invariants: a call is published once; no subscriber on the owner's channel means the
owner is gone (410), no answer within the timeout is a 504; a dropped Redis connection
is retried every `retry_interval` and never blocks a local @connections call.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from edgeplane.websocket.connections import ConnectionRegistry

log = logging.getLogger("edgeplane.websocket")

class RedisBus:
    """@connections across hosts: each worker subscribes to its own channel,
    ``PREFIX ws:<host tag hex>:<worker index>``; a call is published to the owner's
    channel with this worker's channel to answer on. No subscriber (`PUBLISH` returns
    0) means the owner is gone: 410. No answer within `timeout`: 504."""

    def __init__(self, registry: ConnectionRegistry, url: str, prefix: str, timeout: float = 2.0,
                 retry_interval: float = 1.0) -> None:
        from redis.asyncio import Redis

        self.registry = registry
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.client = Redis.from_url(url, socket_connect_timeout=timeout, health_check_interval=0,
                                     decode_responses=False)
        self.channel = self.channel_of(registry.host_tag, registry.index)
        self.waiting: dict[int, asyncio.Future] = {}
        self._seq = 0
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.errors = 0

    def channel_of(self, tag: bytes, index: int) -> bytes:
        return f"{self.prefix}ws:{tag.hex()}:{index}".encode()

    async def start(self, timeout: float = 2.0) -> None:
        self._task = self.registry.loop.create_task(self._listen())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            log.warning("websocket @connections: redis not reachable yet; retrying in the background")

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._ready.set()
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        self._on_message(msg["data"])
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except (RedisError, OSError) as exc:
                self.errors += 1
                log.warning("websocket @connections: redis subscription lost (%s); retrying", exc)
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass
            await asyncio.sleep(self.retry_interval)

    def _on_message(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            kind = msg["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if kind == "a":
            fut = self.waiting.pop(msg.get("n"), None)
            if fut is not None and not fut.done():
                fut.set_result((int(msg["s"]), base64.b64decode(msg.get("b", ""))))
        elif kind == "q" and isinstance(msg.get("r"), str):
            status, body = self.registry.local(str(msg.get("m")), str(msg.get("c")),
                                               base64.b64decode(msg.get("b", "")))
            answer = orjson.dumps({"t": "a", "n": msg.get("n"), "s": status,
                                   "b": base64.b64encode(body).decode()})
            self.registry.track(self.registry.loop.create_task(self._publish(msg["r"].encode(), answer)))

    async def _publish(self, channel: bytes, data: bytes) -> int:
        from redis.exceptions import RedisError

        try:
            return await asyncio.wait_for(self.client.publish(channel, data), self.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            self.errors += 1
            log.warning("websocket @connections: redis publish failed: %s", exc)
            return -1

    async def call(self, tag: bytes, index: int, method: str, conn_id: str,
                   body: bytes) -> tuple[int, bytes]:
        self._seq += 1
        seq = self._seq
        fut = self.registry.loop.create_future()
        self.waiting[seq] = fut
        data = orjson.dumps({"t": "q", "n": seq, "r": self.channel.decode(), "m": method, "c": conn_id,
                             "b": base64.b64encode(body).decode()})
        try:
            receivers = await self._publish(self.channel_of(tag, index), data)
            if receivers == 0:
                return 410, orjson.dumps({"message": "Gone"})
            if receivers < 0:
                return 503, orjson.dumps({"message": "Service Unavailable"})
            return await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            return 504, orjson.dumps({"message": "Endpoint request timed out"})
        finally:
            self.waiting.pop(seq, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()
