"""A WebSocket API route as the connections use it: its backend and how to call it.

Owns `WsRoute`: an HTTP upstream (a POST of the event with its context headers) or a
Python function (`integrations.function.websocket`), a timeout, and whether the answer
goes back to the client. Both backends answer `(status, headers, body)` or raise
`FetchError`, so the connection code does not care which it calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeplane.upstream.client import FetchError, fetch

if TYPE_CHECKING:
    from edgeplane.upstream.cluster import Upstream


class WsRoute:
    """A compiled route: its backend (upstream, path, timeout) and whether it answers."""

    __slots__ = ("key", "upstream", "path", "timeout", "return_response", "function")

    def __init__(self, key: str, upstream: Upstream | None, path: str, timeout: float,
                 return_response: bool, function: Any = None) -> None:
        self.key = key
        self.upstream = upstream
        self.path = path
        self.timeout = timeout
        self.return_response = return_response
        # `integrations.function.websocket.WsFunction` for `type: function` (no upstream)
        self.function = function

    @property
    def has_backend(self) -> bool:
        return self.upstream is not None or self.function is not None

    async def call(self, headers: dict[str, str], body: bytes, max_bytes: int,
                   connect: dict[str, Any] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """POST to the upstream, or call the function: (status, headers, body); raises
        FetchError (a function's failure included) when there is no answer."""
        if self.function is not None:
            from edgeplane.integrations.function.websocket import WsFunctionError

            try:
                return await self.function.call(headers, body, self.timeout, connect)
            except WsFunctionError as exc:
                raise FetchError(str(exc)) from None
        assert self.upstream is not None
        path = self.path + ("?" + connect["raw_query"] if connect and connect.get("raw_query") else "")
        return await fetch(self.upstream.pick(), "POST", path, headers=headers, body=body, timeout=self.timeout,
                           max_bytes=max_bytes)
