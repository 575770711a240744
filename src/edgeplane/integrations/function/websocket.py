"""A Python handler as a WebSocket API route's backend, with AWS's WebSocket event.

Owns `WsFunction.call(context_headers, body, ...)`: what `websocket.connections` and
`websocket.api` call instead of an HTTP POST for a route of `integration: {type:
function}`. It builds the event a Lambda behind an AWS WebSocket API receives from the
same context the HTTP backend gets as headers (`requestContext.connectionId`,
`eventType`, `routeKey`, `messageId`, `connectedAt`, `stage`, `identity.sourceIp`,
`authorizer`; the upgrade request's `headers` and `queryStringParameters` on $connect;
`body` and `isBase64Encoded`), calls the handler (async on the loop, sync in the
functions' pool) and answers `(status, headers, body)` as the HTTP backend would: the
handler's `statusCode` (200 when it returns no dict) and `body`. A non-2xx `$connect`
answer refuses the upgrade, as a Lambda's does. Failures raise `WsFunctionError` (the
callers' `FetchError` handling applies: 502/504 on $connect, an error message on a
message route).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import orjson

from edgeplane.integrations.function.event import LambdaContext
from edgeplane.integrations.function.invoke import FunctionPool, _guarded
from edgeplane.integrations.function.plugin import resolve

log = logging.getLogger("edgeplane.function")


class WsFunctionError(Exception):
    """The handler failed (raised, timed out, or answered something unreadable)."""


class WsFunction:
    __slots__ = ("handler", "name", "is_async", "pool")

    def __init__(self, handler_ref: str, pool: Any) -> None:
        self.handler = resolve(handler_ref)
        self.name = handler_ref
        self.is_async = asyncio.iscoroutinefunction(self.handler)
        self.pool = pool  # the gateway's FunctionPool (or None before start: a fallback of 1 thread)

    def event(self, headers: dict[str, str], body: bytes, connect: dict[str, Any] | None) -> dict[str, Any]:
        now = time.time()
        context: dict[str, Any] = {
            "routeKey": headers.get("x-route-key"), "eventType": headers.get("x-event-type", "MESSAGE"),
            "messageDirection": "IN", "stage": headers.get("x-stage", "$default"),
            "connectedAt": int(headers.get("x-connected-at", "0") or 0),
            "requestTimeEpoch": int(now * 1000),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "identity": {"sourceIp": headers.get("x-source-ip")}, "requestId": headers.get("x-request-id"),
            "extendedRequestId": headers.get("x-request-id"), "connectionId": headers.get("x-connection-id"),
            "apiId": headers.get("x-api-id"), "domainName": (connect or {}).get("host", "")}
        if "x-message-id" in headers:
            context["messageId"] = headers["x-message-id"]
        if "x-disconnect-status-code" in headers:
            context["disconnectStatusCode"] = int(headers["x-disconnect-status-code"])
            context["disconnectReason"] = headers.get("x-disconnect-reason", "")
        if "x-authorizer-claims" in headers:
            context["authorizer"] = {"claims": json.loads(headers["x-authorizer-claims"])}
        event: dict[str, Any] = {"requestContext": context, "isBase64Encoded": False}
        if connect is not None:  # $connect: the upgrade request's headers and query
            event["headers"] = connect["headers"]
            event["multiValueHeaders"] = {k: [v] for k, v in connect["headers"].items()}
            if connect["query"]:
                event["queryStringParameters"] = connect["query"]
        if body:
            try:
                event["body"] = body.decode("utf-8")
            except UnicodeDecodeError:
                event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode("ascii"), True
        return event

    async def call(self, headers: dict[str, str], body: bytes, timeout: float,
                   connect: dict[str, Any] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        event = self.event(headers, body, connect)
        context = LambdaContext(self.name, headers.get("x-request-id", ""), time.monotonic() + timeout)
        try:
            if self.is_async:
                result = await asyncio.wait_for(_guarded(self.handler(event, context)), timeout)
            else:
                pool = self.pool() if callable(self.pool) else self.pool
                if not isinstance(pool, FunctionPool):
                    pool = FunctionPool(1)
                result = await asyncio.wait_for(pool.submit(asyncio.get_running_loop(), self.handler, event,
                                                            context), timeout)
        except TimeoutError:
            raise WsFunctionError(f"no complete response within {timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("websocket function %s raised (connection %s)", self.name, headers.get("x-connection-id"),
                      exc_info=(type(exc), exc, exc.__traceback__))
            raise WsFunctionError(f"the handler raised {type(exc).__name__}") from None
        return _answer(result)


def _answer(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    if not isinstance(result, dict) or "statusCode" not in result:
        return 200, [], b"" if result is None else orjson.dumps(result)
    status = result.get("statusCode")
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise WsFunctionError(f"statusCode {status!r} is not a final HTTP status")
    body = result.get("body")
    if body is None:
        return status, [], b""
    if not isinstance(body, str):
        raise WsFunctionError("body must be a string")
    raw = base64.b64decode(body) if result.get("isBase64Encoded") is True else body.encode("utf-8")
    return status, [], raw
