"""Real ASGI applications for the asgi-integration tests: a Starlette app (JSON,
streaming, request body echo, state, lifespan), a FastAPI app, and raw ASGI apps that
misbehave."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

EVENTS: list[str] = []  # lifespan events seen, in order


@contextlib.asynccontextmanager
async def lifespan(app):
    EVENTS.append("startup")
    yield {"db": "connected"}
    EVENTS.append("shutdown")


async def hello(request: Request):
    return JSONResponse({"path": request.url.path, "root_path": request.scope["root_path"],
                         "route_path": request.scope["path"][len(request.scope["root_path"]):],
                         "query": dict(request.query_params), "db": request.state.db,
                         "authorizer": request.state.authorizer, "request_id": request.state.request_id,
                         "item": request.path_params.get("item")})


async def echo(request: Request):
    body = await request.body()
    return PlainTextResponse(f"{len(body)}:{body[:10].decode('latin-1')}", headers={"x-app": "starlette"})


async def stream(request: Request):
    n = int(request.query_params.get("n", "3"))

    async def chunks():
        for i in range(n):
            yield f"chunk {i}\n"
            await asyncio.sleep(0)
    return StreamingResponse(chunks(), media_type="text/plain")


async def fail(request: Request):
    raise ValueError("the app failed on purpose")


app = Starlette(routes=[Route("/hello", hello), Route("/items/{item}", hello), Route("/echo", echo, methods=["POST"]),
                        Route("/stream", stream), Route("/fail", fail)], lifespan=lifespan)


async def silent(scope, receive, send):
    """Never starts a response."""
    if scope["type"] == "http":
        await asyncio.sleep(10)


async def bad_header(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-evil", b"a\r\nset-cookie: stolen=1")]})
        await send({"type": "http.response.body", "body": b"x"})


try:
    from fastapi import FastAPI

    fast = FastAPI()

    @fast.get("/users/{user_id}")
    async def read_user(user_id: int, q: str | None = None):
        return {"user_id": user_id, "q": q}
except ImportError:  # FastAPI is optional: its test skips
    fast = None


def _raw(status: int, headers: list, chunks: list[bytes]):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    return app


longer = _raw(200, [(b"content-length", b"2")], [b"AAAAAAAAAA"])
shorter = _raw(200, [(b"content-length", b"10")], [b"AA"])
bad_length = _raw(200, [(b"content-length", b"abc")], [b"AA"])
no_content = _raw(204, [], [b"BODYBYTES"])


async def exits(scope, receive, send):
    if scope["type"] == "http":
        raise SystemExit(1)


from starlette.routing import WebSocketRoute  # noqa: E402
from starlette.websockets import WebSocket  # noqa: E402


async def ws_echo(websocket: WebSocket):
    if websocket.query_params.get("deny"):
        await websocket.close(code=1008)
        return
    await websocket.accept(subprotocol="chat" if "chat" in websocket.scope["subprotocols"] else None)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await websocket.close(code=4000)
            return
        if message.get("text") is not None:
            await websocket.send_text(f"{websocket.state.request_id[:4] and 'echo'}: {message['text']}")
        else:
            await websocket.send_bytes(message["bytes"][::-1])


ws_app = Starlette(routes=[WebSocketRoute("/echo", ws_echo)])
