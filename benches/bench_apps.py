"""The application the in-process benches serve, three ways: a Lambda-style async
handler (`hello`), the same answer as a Starlette app (`app`), served in process by
edgeplane or by uvicorn (the peer). Small JSON, no I/O: the cost measured is the
serving, not the app."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = b'{"ok":true}'


async def hello(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": '{"ok":true}'}


async def _hello(request):
    return Response(BODY, media_type="application/json")


app = Starlette(routes=[Route("/{path:path}", _hello)])
