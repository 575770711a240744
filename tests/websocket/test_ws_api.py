"""WebSocket APIs (AWS model) end to end: real loopback sockets, a real wsproto client, a
real recording HTTP backend, real signed JWTs, real worker processes and a real Redis."""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import tempfile
import time

import orjson
import pytest
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from conftest import RawClient, base_config
from edgeplane import Gateway
from edgeplane.websocket.selection import parse_selection
from wsutil import OP_TEXT, build_frame

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_logged_exceptions")]


# ---------------------------------------------------------------------------- test peers

class Backend:
    """An HTTP/1.1 server (keep-alive) that records every request and answers from
    `answers[path]` = (status, body, extra headers) or, by default, 200 with an echo."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: dict[str, tuple[int, bytes, dict]] = {}
        self.delay: dict[str, float] = {}
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self._waiters: list[tuple[callable, asyncio.Future]] = []
        self._writers: set = set()
        self._tasks: set = set()

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def of(self, event: str) -> list[dict]:
        return [r for r in self.requests if r["headers"].get("x-event-type") == event]

    async def wait_for(self, pred, timeout: float = 5.0) -> dict:
        for r in self.requests:
            if pred(r):
                return r
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        return await asyncio.wait_for(fut, timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                req = await self._read(reader)
                if req is None:
                    return
                self.requests.append(req)
                for pred, fut in list(self._waiters):
                    if not fut.done() and pred(req):
                        fut.set_result(req)
                        self._waiters.remove((pred, fut))
                path = req["path"].split("?")[0]
                if path in self.delay:
                    await asyncio.sleep(self.delay[path])
                answer = self.answers.get(path, (200, b"echo:" + req["body"], {}))
                status, body, extra = answer(req) if callable(answer) else answer
                head = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
                head += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> dict | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return {"method": method, "path": path, "headers": headers, "body": body}


class Ws:
    """A WebSocket client: handshake over a raw socket, then frames through wsproto."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.ws = Connection(ConnectionType.CLIENT)
        self.status = 0
        self.head = b""
        self.body = b""
        self.events: list = []
        self.auto_pong = True

    @classmethod
    async def connect(cls, addr, path: str = "/chat", headers: dict | None = None,
                      host: str = "gw.test", key: bytes | None = None, version: str = "13",
                      upgrade: bool = True) -> Ws:
        reader, writer = await asyncio.open_connection(*addr)
        c = cls(reader, writer)
        key = key if key is not None else base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        if upgrade:
            lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Version: {version}"]
            lines.append("Sec-WebSocket-Key: " + key.decode())
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        c.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        c.status = int(c.head.split(b" ", 2)[1])
        n = c.header("content-length")
        if c.status != 101 and n:
            c.body = await asyncio.wait_for(reader.readexactly(int(n)), 10)
        return c

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode("latin-1")
        return None

    def json(self):
        return orjson.loads(self.body)

    def send(self, data: str | bytes) -> None:
        self.writer.write(self.ws.send(Message(data=data)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0):
        """The next whole message (str/bytes) or CloseConnection (code 1006 on a bare EOF)."""
        async with asyncio.timeout(timeout):
            return await self._recv()

    async def _recv(self):
        parts: list = []
        while True:
            while self.events:
                ev = self.events.pop(0)
                if isinstance(ev, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        self.writer.write(self.ws.send(ev.response()))
                    return ev
                if isinstance(ev, Ping):
                    if self.auto_pong:
                        self.writer.write(self.ws.send(ev.response()))
                elif isinstance(ev, (TextMessage, BytesMessage)):
                    parts.append(ev.data)
                    if ev.message_finished:
                        return ("" if isinstance(ev, TextMessage) else b"").join(parts)
            try:
                data = await self.reader.read(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return CloseConnection(code=1006, reason="EOF")
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())

    async def recv_json(self, timeout: float = 5.0):
        msg = await self.recv(timeout)
        assert isinstance(msg, str), msg
        return orjson.loads(msg)

    def close(self, code: int = 1000) -> None:
        self.writer.write(self.ws.send(CloseConnection(code=code)))

    def abort(self) -> None:
        self.writer.transport.abort()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def chat_config(backend_port: int, **api_extra) -> dict:
    cfg = base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}])
    cfg["upstreams"]["chat"] = {"targets": [f"http://127.0.0.1:{backend_port}"]}
    api = {
        "path": "/chat",
        "route_selection": "$request.body.action",
        "routes": {
            "$connect": {"integration": {"type": "http", "upstream": "chat", "path": "/connect"}},
            "$disconnect": {"integration": {"type": "http", "upstream": "chat", "path": "/disconnect"}},
            "sendMessage": {"integration": {"type": "http", "upstream": "chat", "path": "/message"},
                            "return_response": True},
            "$default": {"integration": {"type": "http", "upstream": "chat", "path": "/default"}},
        },
    }
    api.update(api_extra)
    cfg["websocket_apis"] = {"chat": api}
    return cfg


@pytest.fixture
async def backend():
    async with Backend() as b:
        yield b


@pytest.fixture
async def clients():
    opened: list[Ws] = []

    async def connect(*args, **kw) -> Ws:
        c = await Ws.connect(*args, **kw)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        await c.aclose()


async def admin(gw: Gateway, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    c = await RawClient.connect(gw.admin_address)
    try:
        return await c.request(method, path, body=body, headers=headers)
    finally:
        await c.close()


# ---------------------------------------------------------------------------- selection

def test_selection_expressions():
    s = parse_selection("$request.body.action")
    assert s.select('{"action": "sendMessage"}') == "sendMessage"
    assert s.select('{"action": 7}') == "7"
    assert s.select('{"nope": 1}') is None
    assert s.select("not json") is None
    assert s.select("[1, 2]") is None
    assert s.select('{"action": {"x": 1}}') is None
    assert s.select('{"action": "$connect"}') is None  # a client cannot pick $connect
    s = parse_selection("${request.body.service}/${request.body.action}")
    assert s.select('{"service": "chat", "action": "send"}') == "chat/send"
    assert s.select('{"service": "chat"}') is None
    assert parse_selection("$request.body.meta.kind").select('{"meta": {"kind": "k"}}') == "k"
    for bad in ["action", "$request.header.x", "${request.body.a", "${request.query.a}/x",
                "$request.body.", "${request.body.a}$x"]:
        with pytest.raises(ValueError):
            parse_selection(bad)


# ---------------------------------------------------------------------------- connect

async def test_connect_routes_headers_return_response_and_disconnect(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0], "/chat?room=7", headers={"Cookie": "a=1", "User-Agent": "t/1",
                                                                 "X-Connection-Id": "spoofed"})
    assert c.status == 101, c.head
    connect = backend.of("CONNECT")[0]
    h = connect["headers"]
    conn_id = h["x-connection-id"]
    assert connect["method"] == "POST" and connect["path"] == "/connect?room=7"
    assert len(conn_id) == 16 and conn_id != "spoofed"
    assert h["x-route-key"] == "$connect" and h["x-source-ip"] == "127.0.0.1"
    assert h["cookie"] == "a=1" and h["x-api-id"] == "chat"

    c.send(json.dumps({"action": "sendMessage", "text": "hi"}))
    assert await c.recv() == 'echo:{"action": "sendMessage", "text": "hi"}'  # return_response
    msg = backend.of("MESSAGE")[0]
    assert msg["path"] == "/message" and msg["body"] == b'{"action": "sendMessage", "text": "hi"}'
    assert msg["headers"]["x-connection-id"] == conn_id
    assert msg["headers"]["x-route-key"] == "sendMessage"
    assert msg["headers"]["x-message-id"] and msg["headers"]["x-source-ip"] == "127.0.0.1"

    c.send("not json at all")            # -> $default, no answer (return_response unset)
    c.send('{"other": 1}')               # missing field -> $default
    c.send(b"\x00\x01binary")            # binary -> $default
    c.send('{"action": "unknownKey"}')   # no such route -> $default
    for _ in range(4):
        await backend.wait_for(lambda r: r["path"] == "/default" and r["body"] == b'{"action": "unknownKey"}')
    defaults = [r for r in backend.requests if r["path"] == "/default"]
    assert [r["body"] for r in defaults] == [b"not json at all", b'{"other": 1}', b"\x00\x01binary",
                                             b'{"action": "unknownKey"}']
    assert {r["headers"]["x-route-key"] for r in defaults} == {"$default"}
    assert len({r["headers"]["x-message-id"] for r in backend.of("MESSAGE")}) == 5

    c.close(1000)
    assert (await c.recv()).code == 1000
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect")
    assert d["headers"]["x-event-type"] == "DISCONNECT"
    assert d["headers"]["x-connection-id"] == conn_id
    assert d["headers"]["x-disconnect-status-code"] == "1000"


async def test_connect_refused_with_the_backend_status(backend, gateway, clients):
    backend.answers["/connect"] = (403, b'{"message":"no room"}', {"content-type": "application/json"})
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0])
    assert c.status == 403 and c.json() == {"message": "no room"}
    backend.answers["/connect"] = (429, b"slow down", {"content-type": "text/plain"})
    c = await clients(gw.addresses[0])
    assert c.status == 429 and c.body == b"slow down"
    assert not backend.of("DISCONNECT")  # never connected: no $disconnect


async def test_handshake_checks(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0], upgrade=False)
    assert c.status == 426 and c.header("upgrade") == "websocket"
    c = await clients(gw.addresses[0], version="8")
    assert c.status == 426 and c.header("sec-websocket-version") == "13"
    c = await clients(gw.addresses[0], key=b"c2hvcnQ=")
    assert c.status == 400
    assert not backend.requests  # nothing reached the backend
    c = await clients(gw.addresses[0], "/ping")  # other paths are ordinary routes
    assert c.status == 200


# ---------------------------------------------------------------------------- $connect auth

ISSUER = "https://auth.example.com/"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(key, claims: dict) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = _b64(json.dumps(claims).encode())
    sig = key.sign(f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{payload}.{_b64(sig)}"


def _claims(**extra) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "aud": "chat", "sub": "user-42", "exp": now + 300, "iat": now - 5,
            "scope": "chat:join", "name": "Zoë", **extra}


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


async def test_connect_authorizer_401_403_and_claims_reach_every_integration(backend, gateway, clients,
                                                                             rsa_key, tmp_path):
    pub = rsa_key.public_key().public_numbers()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256",
                                          "n": _uint(pub.n), "e": _uint(pub.e)}]}))
    cfg = chat_config(backend.port)
    cfg["authorizers"] = {"users_jwt": {"type": "jwt", "issuer": ISSUER, "audience": "chat",
                                        "jwks": {"file": str(jwks)}}}
    cfg["websocket_apis"]["chat"]["routes"]["$connect"].update(auth="users_jwt", scopes=["chat:join"])
    gw = await gateway(cfg)
    c = await clients(gw.addresses[0])
    assert c.status == 401 and 'error="invalid_token"' in c.header("www-authenticate")
    c = await clients(gw.addresses[0], headers={"Authorization": "Bearer " + _sign(rsa_key, _claims(exp=1))})
    assert c.status == 401
    c = await clients(gw.addresses[0], headers={"Authorization": _sign(rsa_key, _claims(scope="other"))})
    assert c.status == 403 and 'error="insufficient_scope"' in c.header("www-authenticate")
    assert not backend.requests  # refused by the authorizer: the backend never heard of it
    c = await clients(gw.addresses[0], headers={"Authorization": "Bearer " + _sign(rsa_key, _claims())})
    assert c.status == 101
    claims = json.loads(backend.of("CONNECT")[0]["headers"]["x-authorizer-claims"])
    assert claims["sub"] == "user-42" and claims["name"] == "Zoë"
    c.send('{"action": "sendMessage"}')
    await c.recv()
    assert json.loads(backend.of("MESSAGE")[0]["headers"]["x-authorizer-claims"])["sub"] == "user-42"


async def test_api_key_and_custom_authorizers_and_host_dispatch(backend, gateway, clients, tmp_path):
    from edgeplane.policies.api_keys.store import generate_key

    key, digest = generate_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{id: partner-1, hash: '{digest}'}}\n")

    def authorize(req):
        token = json.loads(req["body"])["headers"].get("authorization", "")
        body = json.dumps({"isAuthorized": token == "good", "context": {"tenant": "t-1"}}).encode()
        return 200, body, {"content-type": "application/json"}

    backend.answers["/authorize"] = authorize
    cfg = chat_config(backend.port, host="chat.example.com")
    cfg["authorizers"] = {
        "keys": {"type": "api_key", "keys_file": str(keys)},
        "custom": {"type": "http", "url": f"http://127.0.0.1:{backend.port}/authorize",
                   "forward_context": {"x-tenant": "tenant"}}}
    cfg["websocket_apis"]["chat"]["routes"]["$connect"]["auth"] = "keys"
    other = json.loads(json.dumps(cfg["websocket_apis"]["chat"]))
    other["host"] = "*.example.org"
    other["routes"]["$connect"]["auth"] = "custom"
    cfg["websocket_apis"]["custom"] = other
    cfg["routes"].append({"route": "$default", "integration": {"type": "mock", "body": "http"}})
    cfg["trusted_proxies"] = ["127.0.0.1"]
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    assert (await clients(addr, host="chat.example.com")).status == 403  # no key
    assert (await clients(addr, host="chat.example.com", headers={"X-API-Key": "x" * 40})).status == 403
    c = await clients(addr, host="chat.example.com:8080", headers={"X-API-Key": key})
    assert c.status == 101
    assert backend.of("CONNECT")[0]["headers"]["x-api-key-id"] == "partner-1"
    assert (await clients(addr, host="a.example.org", headers={"Authorization": "bad"})).status == 403
    c = await clients(addr, host="a.b.example.org", headers={"Authorization": "good", "X-Tenant": "spoof",
                                                            "X-Forwarded-For": "203.0.113.9"})
    assert c.status == 101
    connect = backend.of("CONNECT")[-1]["headers"]
    assert connect["x-api-id"] == "custom" and connect["x-tenant"] == "t-1"
    assert connect["x-source-ip"] == "203.0.113.9"  # from a trusted proxy
    c.send('{"action": "sendMessage"}')
    await c.recv()
    assert backend.of("MESSAGE")[-1]["headers"]["x-tenant"] == "t-1"
    # No API for this Host: the request is routed as HTTP ($default answers it).
    c = await clients(addr, host="other.test")
    assert c.status == 200 and c.body == b"http"


# ---------------------------------------------------------------------------- messages

async def test_template_selection_and_no_default_gives_an_error_message(backend, gateway, clients):
    cfg = chat_config(backend.port, route_selection="${request.body.service}/${request.body.action}")
    routes = cfg["websocket_apis"]["chat"]["routes"]
    del routes["$default"], routes["sendMessage"]
    routes["chat/send"] = {"integration": {"type": "http", "upstream": "chat", "path": "/send"},
                           "return_response": True}
    gw = await gateway(cfg)
    c = await clients(gw.addresses[0])
    assert c.status == 101
    conn_id = backend.of("CONNECT")[0]["headers"]["x-connection-id"]
    c.send('{"service": "chat", "action": "send"}')
    assert await c.recv() == 'echo:{"service": "chat", "action": "send"}'
    for unrouted in ('{"service": "chat"}', "plain text", '{"service": "chat", "action": "other"}'):
        c.send(unrouted)
        err = await c.recv_json()
        assert err["message"] == "Forbidden" and err["connectionId"] == conn_id and err["requestId"]
    c.send('{"service": "chat", "action": "send", "n": 2}')  # the connection is still open
    assert (await c.recv()).startswith("echo:")
    assert [r["path"] for r in backend.of("MESSAGE")] == ["/send", "/send"]


async def test_backend_down_gives_error_message_and_connection_survives(backend, gateway, clients):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = chat_config(backend.port)
    cfg["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{dead}"]}
    routes = cfg["websocket_apis"]["chat"]["routes"]
    routes["broken"] = {"integration": {"type": "http", "upstream": "dead", "path": "/x"}}
    backend.answers["/slow"] = (200, b"late", {})
    backend.delay["/slow"] = 1.0
    routes["slow"] = {"integration": {"type": "http", "upstream": "chat", "path": "/slow", "timeout": "200ms"},
                      "return_response": True}
    backend.answers["/message"] = (500, b"oops", {})
    gw = await gateway(cfg)
    c = await clients(gw.addresses[0])
    assert c.status == 101
    for action in ("broken", "slow", "sendMessage"):  # refused, timed out, 500
        c.send(json.dumps({"action": action}))
        assert (await c.recv_json())["message"] == "Internal server error"
    backend.answers.pop("/message")
    c.send('{"action": "sendMessage"}')
    assert await c.recv() == 'echo:{"action": "sendMessage"}'

    cfg["websocket_apis"]["chat"]["routes"]["$connect"]["integration"]["upstream"] = "dead"
    gw2 = await gateway(cfg)
    c = await clients(gw2.addresses[0])
    assert c.status == 502 and c.json() == {"message": "Bad Gateway"}


async def test_message_too_big_closes_1009_and_disconnect_is_called(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port, limits={"max_message_bytes": "1KiB"}))
    c = await clients(gw.addresses[0])
    c.send("x" * 1024)  # exactly the limit: fine
    await backend.wait_for(lambda r: r["path"] == "/default")
    c.writer.write(c.ws.send(Message(data="y" * 600, message_finished=False)))
    c.writer.write(c.ws.send(Message(data="y" * 600, message_finished=True)))  # 1200 in two frames
    ev = await c.recv()
    assert isinstance(ev, CloseConnection) and ev.code == 1009
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect")
    assert d["headers"]["x-disconnect-status-code"] == "1009"


@pytest.mark.parametrize("case,code", [("unmasked", 1002), ("bad_utf8", 1007), ("reserved_bits", 1002),
                                       ("bad_opcode", 1002), ("fragmented_ping", 1002)])
async def test_bad_frames_get_the_protocol_close_code(backend, gateway, clients, case, code):
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0])
    frame = {"unmasked": build_frame(OP_TEXT, b"hi", mask=False),
             "bad_utf8": build_frame(OP_TEXT, b"\xff\xfe"),
             "reserved_bits": build_frame(OP_TEXT, b"hi", rsv=4),
             "bad_opcode": build_frame(0x3, b"hi"),
             "fragmented_ping": build_frame(0x9, b"p", fin=False)}[case]
    c.send_raw(frame)
    ev = await c.recv()
    assert isinstance(ev, CloseConnection) and ev.code == code
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect")
    assert d["headers"]["x-disconnect-status-code"] == str(code)


async def test_disconnect_on_abrupt_close_and_idle_timeout(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port, limits={"idle_timeout": "300ms", "ping_interval": 0}))
    a = await clients(gw.addresses[0])
    b = await clients(gw.addresses[0])
    ids = [r["headers"]["x-connection-id"] for r in backend.of("CONNECT")]
    a.abort()  # no close frame at all
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect")
    assert d["headers"]["x-connection-id"] == ids[0]
    assert d["headers"]["x-disconnect-status-code"] == "1006"
    ev = await b.recv(timeout=5)  # idle: closed by the gateway with 1001
    assert isinstance(ev, CloseConnection) and ev.code == 1001
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect" and r["headers"]["x-connection-id"] == ids[1])
    assert d["headers"]["x-disconnect-status-code"] == "1001"
    assert d["headers"]["x-disconnect-reason"] == "idle timeout"


async def test_unanswered_ping_drops_the_connection(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port, limits={"ping_interval": "100ms", "pong_timeout": "100ms"}))
    c = await clients(gw.addresses[0])
    c.auto_pong = False
    ev = await c.recv(timeout=5)
    assert isinstance(ev, CloseConnection) and ev.code == 1006  # dropped without a close frame
    d = await backend.wait_for(lambda r: r["path"] == "/disconnect")
    assert d["headers"]["x-disconnect-reason"] == "ping not answered"
    ok = await clients(gw.addresses[0])  # a client that answers pings stays
    with pytest.raises(TimeoutError):
        await ok.recv(timeout=0.6)  # reads (and answers) the pings meanwhile
    ok.send('{"action": "sendMessage"}')
    assert (await ok.recv()).startswith("echo:")


async def test_message_rate_limit_per_connection(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port, limits={"messages_per_second": 1, "message_burst": 2}))
    c = await clients(gw.addresses[0])
    for i in range(3):
        c.send(json.dumps({"action": "sendMessage", "i": i}))
    answers = [await c.recv() for _ in range(3)]
    throttled = [a for a in answers if a.startswith("{")]
    assert len(throttled) == 1 and orjson.loads(throttled[0])["message"] == "Too Many Requests"
    assert len(backend.of("MESSAGE")) == 2


# ---------------------------------------------------------------------------- @connections

async def test_management_api_post_get_delete_gone_and_bad_ids(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0], headers={"User-Agent": "agent/2"})
    conn_id = backend.of("CONNECT")[0]["headers"]["x-connection-id"]
    r = await admin(gw, "POST", f"/@connections/{conn_id}", body=b'{"hello":"client"}')
    assert r.status == 200
    assert await c.recv() == '{"hello":"client"}'
    r = await admin(gw, "POST", f"/@connections/{conn_id}", body=b"\xff\x00 binary")
    assert r.status == 200 and await c.recv() == b"\xff\x00 binary"
    r = await admin(gw, "GET", f"/@connections/{conn_id}")
    info = r.json()
    assert r.status == 200 and info["identity"] == {"sourceIp": "127.0.0.1", "userAgent": "agent/2"}
    assert info["connectedAt"].endswith("Z") and info["lastActiveAt"] >= info["connectedAt"]
    big = b"x" * (128 * 1024 + 1)
    assert (await admin(gw, "POST", f"/@connections/{conn_id}", body=big)).status == 413
    assert (await admin(gw, "PUT", f"/@connections/{conn_id}")).status == 405
    for bad in ("short", "x" * 17, "abc$defghijklmno", "%20" * 8):
        r = await admin(gw, "GET", f"/@connections/{bad}")
        assert r.status == 400 and "invalid connection id" in r.json()["message"]
    # an encoded control character is refused before any route (path normalisation)
    assert (await admin(gw, "GET", "/@connections/" + "%00" * 8)).status == 400
    stranger = conn_id[:1] + ("A" if conn_id[1] != "A" else "B") + conn_id[2:]  # another host's id
    assert (await admin(gw, "GET", f"/@connections/{stranger}")).status == 410
    unknown = conn_id[:8] + ("AAAAAAAA" if conn_id[8:] != "AAAAAAAA" else "BBBBBBBB")
    assert (await admin(gw, "POST", f"/@connections/{unknown}", body=b"x")).status == 410

    r = await admin(gw, "DELETE", f"/@connections/{conn_id}")
    assert r.status == 204
    ev = await c.recv()
    assert isinstance(ev, CloseConnection) and ev.code == 1000
    await backend.wait_for(lambda r: r["path"] == "/disconnect")
    for method in ("GET", "POST", "DELETE"):
        assert (await admin(gw, method, f"/@connections/{conn_id}")).status == 410


async def test_management_post_with_a_chunked_and_pipelined_body(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0])
    conn_id = backend.of("CONNECT")[0]["headers"]["x-connection-id"]
    raw = await RawClient.connect(gw.admin_address)
    try:
        await raw.send(f"POST /@connections/{conn_id} HTTP/1.1\r\nHost: a\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode())
        await asyncio.sleep(0.05)  # the body arrives after the request was dispatched
        await raw.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                       + f"GET /@connections/{conn_id} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert (await raw.read_response()).status == 200
        assert (await raw.read_response()).status == 200
    finally:
        await raw.close()
    assert await c.recv() == "hello world"


# ---------------------------------------------------------------------------- limits, scale

async def test_new_connection_rate_limit_is_429(backend, gateway, clients):
    gw = await gateway(chat_config(backend.port, limits={"connections_per_second": 2}))
    statuses = [(await clients(gw.addresses[0])).status for _ in range(3)]
    assert statuses == [101, 101, 429]
    assert len(backend.of("CONNECT")) == 2
    await asyncio.sleep(0.6)  # 2/s: one token back
    assert (await clients(gw.addresses[0])).status == 101


async def test_a_thousand_concurrent_connections(backend, gateway):
    cfg = chat_config(backend.port)
    del cfg["websocket_apis"]["chat"]["routes"]["$connect"]  # accept without a backend call
    cfg["websocket_apis"]["chat"]["limits"] = {"connections_per_second": 5000}
    gw = await gateway(cfg)
    n = 1000
    conns: list[Ws] = []
    try:
        for _i in range(0, n, 100):
            conns += await asyncio.gather(*(Ws.connect(gw.addresses[0]) for _ in range(100)))
        assert all(c.status == 101 for c in conns)
        assert gw.stats()["websockets"]["open"] == n
        for i, c in enumerate(conns):
            c.send(json.dumps({"action": "sendMessage", "i": i}))
        answers = await asyncio.gather(*(c.recv(timeout=20) for c in conns))
        assert answers == [f'echo:{{"action": "sendMessage", "i": {i}}}' for i in range(n)]
        ids = {r["headers"]["x-connection-id"] for r in backend.of("MESSAGE")}
        assert len(ids) == n
    finally:
        for c in conns:
            c.abort()
    for _ in range(200):
        if len(backend.of("DISCONNECT")) == n:
            break
        await asyncio.sleep(0.05)
    assert len(backend.of("DISCONNECT")) == n


async def test_stop_closes_websockets_with_1001_and_calls_disconnect(backend, clients, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = chat_config(backend.port)
    cfg["access_log"] = {"destination": "file", "path": str(log_path)}
    gw = Gateway(cfg)
    await gw.start()
    c = await clients(gw.addresses[0])
    c.send('{"action": "sendMessage"}')
    await c.recv()
    stopping = asyncio.ensure_future(gw.stop(drain_timeout=2))
    ev = await c.recv()
    assert isinstance(ev, CloseConnection) and ev.code == 1001
    await stopping
    d = backend.of("DISCONNECT")
    assert len(d) == 1 and d[0]["headers"]["x-disconnect-status-code"] == "1001"
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    ws_line = [x for x in lines if x["status"] == 101]
    assert len(ws_line) == 1 and ws_line[0]["responseLength"] > 0 and ws_line[0]["routeKey"] == "$connect"
    ws = ws_line[0].get("websocket")
    if ws is not None:  # the access log's `websocket` object (server.Request.ws_log)
        assert ws["connectionId"] == d[0]["headers"]["x-connection-id"]
        assert (ws["messagesIn"], ws["messagesOut"], ws["closeCode"]) == (1, 1, 1001)
    assert ws_line[0]["websocket"]["eventType"] == "DISCONNECT"
    # each routed message has its own line, as AWS logs them: eventType MESSAGE, the
    # message id as the request id, the route key and the integration's status
    (message,) = [x for x in lines if x.get("websocket", {}).get("eventType") == "MESSAGE"]
    assert message["routeKey"] == "sendMessage" and message["status"] == 200
    assert message["websocket"]["connectionId"] == d[0]["headers"]["x-connection-id"]
    assert message["requestId"] == message["websocket"]["messageId"]
    assert message["integrationLatency"] is not None


# ---------------------------------------------------------------------------- across processes

async def test_management_api_across_two_worker_processes(backend, tmp_path):
    from test_processes import _start_serve, _stop, _worker_pids

    cfg = chat_config(backend.port)
    cfg["workers"] = 2
    limited = json.loads(json.dumps(cfg["websocket_apis"]["chat"]))
    limited.update(path="/limited", limits={"connections_per_second": 3})
    del limited["routes"]["$connect"]
    cfg["websocket_apis"]["limited"] = limited
    proc, addr, admin_addr, lines, drain = await _start_serve(tmp_path, cfg)
    socket_dir = None
    try:
        await _worker_pids(admin_addr)  # both workers answer on the admin port
        c = await Ws.connect(addr)
        assert c.status == 101
        conn_id = backend.of("CONNECT")[0]["headers"]["x-connection-id"]
        owner_index = base64.urlsafe_b64decode(conn_id)[0]
        # the supervisor's private directory: <tmp>/edgeplane-<supervisor pid>-XXXX
        (socket_dir,) = glob.glob(os.path.join(tempfile.gettempdir(), f"edgeplane-{proc.pid}-*"))
        assert os.stat(socket_dir).st_mode & 0o777 == 0o700
        assert os.path.exists(f"{socket_dir}/worker-{owner_index}.sock")
        statuses = []
        for i in range(16):  # new connections: SO_REUSEPORT spreads them over both workers
            raw = await RawClient.connect(admin_addr)
            r = await raw.request("POST", f"/@connections/{conn_id}", body=f"m{i}".encode())
            statuses.append(r.status)
            r = await raw.request("GET", f"/@connections/{conn_id}")
            assert r.status == 200 and r.json()["connectionId"] == conn_id
            await raw.close()
        assert statuses == [200] * 16
        assert [await c.recv() for _ in range(16)] == [f"m{i}" for i in range(16)]
        stats = []
        for _ in range(16):
            raw = await RawClient.connect(admin_addr)
            stats.append((await raw.request("GET", "/stats")).json()["websockets"])
            await raw.close()
        assert any(s["forwarded_calls"] > 0 for s in stats), "no call reached the other worker"
        raw = await RawClient.connect(admin_addr)
        assert (await raw.request("DELETE", f"/@connections/{conn_id}")).status == 204
        await raw.close()
        ev = await c.recv()
        assert isinstance(ev, CloseConnection) and ev.code == 1000
        for _ in range(8):
            raw = await RawClient.connect(admin_addr)
            assert (await raw.request("GET", f"/@connections/{conn_id}")).status == 410
            assert (await raw.request("GET", "/@connections/nope")).status == 400
            await raw.close()
        await c.aclose()
        # The new-connection limit holds for the server, not per worker (shared memory):
        # 8 new connections land on both workers, 3 are admitted (+1 if a second passed).
        limited_conns = [await Ws.connect(addr, "/limited") for _ in range(8)]
        admitted = sum(x.status == 101 for x in limited_conns)
        assert 3 <= admitted <= 4 and all(x.status in (101, 429) for x in limited_conns)
        assert not any("limits are per worker" in ln for ln in lines), lines
        for x in limited_conns:
            await x.aclose()
    finally:
        code = await _stop(proc, drain)
    assert code == 0, "".join(lines)
    assert socket_dir is not None and not os.path.exists(socket_dir), "the socket directory is left behind"


async def test_management_api_across_hosts_through_redis(backend, redis_server, clients):
    cfg = chat_config(backend.port, limits={"connections_per_second": 100})
    cfg["cluster"] = {"redis": redis_server.url, "timeout": "200ms"}
    host_a, host_b = Gateway(cfg), Gateway(cfg)
    await host_a.start()
    await host_b.start()
    try:
        c = await clients(host_a.addresses[0])
        assert c.status == 101
        conn_id = backend.of("CONNECT")[0]["headers"]["x-connection-id"]
        assert (await admin(host_b, "POST", f"/@connections/{conn_id}", body=b"via redis")).status == 200
        assert await c.recv() == "via redis"
        r = await admin(host_b, "GET", f"/@connections/{conn_id}")
        assert r.status == 200 and r.json()["connectionId"] == conn_id
        raw = bytearray(base64.urlsafe_b64decode(conn_id))
        raw[8] ^= 0xFF  # same host, no such connection: the owner answers 410
        assert (await admin(host_b, "GET", "/@connections/" + base64.urlsafe_b64encode(raw).decode())).status == 410
        raw[2] ^= 0xFF  # a host nobody runs: no subscriber, 410 at once
        assert (await admin(host_b, "GET", "/@connections/" + base64.urlsafe_b64encode(raw).decode())).status == 410
        assert (await admin(host_b, "DELETE", f"/@connections/{conn_id}")).status == 204
        ev = await c.recv()
        assert isinstance(ev, CloseConnection) and ev.code == 1000
        assert (await admin(host_b, "POST", f"/@connections/{conn_id}", body=b"x")).status == 410
    finally:
        await host_a.stop(drain_timeout=1)
        await host_b.stop(drain_timeout=1)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("with_connect", [False, True])
async def test_frames_sent_with_the_handshake_are_not_lost(backend, gateway, parser, with_connect):
    cfg = chat_config(backend.port)
    cfg["http"] = {"parser": parser}
    if not with_connect:
        del cfg["websocket_apis"]["chat"]["routes"]["$connect"]
    gw = await gateway(cfg)
    reader, writer = await asyncio.open_connection(*gw.addresses[0])
    try:
        ws = Connection(ConnectionType.CLIENT)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
                     + ws.send(Message(data='{"action": "sendMessage"}')))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        events: list = []
        while not events:
            ws.receive_data(await asyncio.wait_for(reader.read(65536), 5))
            events = [e for e in ws.events() if isinstance(e, TextMessage)]
        assert events[0].data == 'echo:{"action": "sendMessage"}'
    finally:
        writer.close()


async def test_frames_over_32_kib_close_1009_as_aws_does(backend, gateway, clients):
    """AWS's frame-size limit (32 KB) on WebSocket APIs: a message of two 20 KiB frames
    is fine (128 KiB per message), one 40 KiB frame closes with 1009."""
    gw = await gateway(chat_config(backend.port))
    c = await clients(gw.addresses[0])
    c.writer.write(c.ws.send(Message(data="a" * 20 * 1024, message_finished=False)))
    c.writer.write(c.ws.send(Message(data="b" * 20 * 1024, message_finished=True)))
    r = await backend.wait_for(lambda r: r["path"] == "/default")
    assert len(r["body"]) == 40 * 1024
    c.send("z" * 40 * 1024)   # one frame
    ev = await c.recv()
    assert isinstance(ev, CloseConnection) and (ev.code, ev.reason) == (1009, "frame too big")
