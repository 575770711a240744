"""Real HS256 tokens for tests with a JWT authorizer: `token(sub, scope=..., **claims)`,
`bearer(token)` headers, and `authorizer(tmp_path)`, the `authorizers.users` config that
verifies them (its secret written to a file, as an operator would)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

SECRET = b"cache-test-secret-" * 3
ISS = "https://auth.test/"


def token(sub: str, scope: str = "read", **extra) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    now = int(time.time())
    claims = {"iss": ISS, "aud": "api", "sub": sub, "scope": scope, "iat": now, "exp": now + 600, **extra}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(hmac.new(SECRET, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


def bearer(t: str, **more) -> dict:
    return {"authorization": f"Bearer {t}", **more}


def authorizer(tmp_path) -> dict:
    """`authorizers:` with `users`, a jwt authorizer verifying `token()`'s tokens."""
    (tmp_path / "secret").write_bytes(SECRET)
    return {"users": {"type": "jwt", "issuer": ISS, "audience": "api", "algorithms": ["HS256"],
                      "hs_secret": {"file": str(tmp_path / "secret")}}}
