"""Micro-benchmark: what request validation and parameter mapping cost per request, and
the JSON Schema validators `request_validation` could be built on.

Usage: .venv/bin/python benches/validation_bench.py [--rounds 5] [--n 20000]

- validators: one realistic order body (an object with a nested customer and five
  items; a pattern, a format, bounds) parsed with orjson and validated by `jsonschema`
  (Draft 2020-12), `fastjsonschema` (compiled to Python; skipped when not installed) and
  `jsonschema-rs` (Rust), each compiled once;
- stage: the gateway's `ValidationStage` body check on a real routed request (parse +
  validate + the decision), and the required-parameter check alone;
- mapping: the gateway's `RequestMappingStage.apply` with three mappings (a header from a
  claim, a query parameter from a path parameter, a header from the request id).

Prints us per call, best of --rounds.
"""

from __future__ import annotations

import orjson

from micro import best_ns, cli, proxied_request, proxy_gateway

SCHEMA = {"type": "object", "required": ["id", "customer", "items"], "additionalProperties": False,
          "properties": {"id": {"type": "string", "pattern": "^ord-[0-9]+$"},
                         "customer": {"type": "object", "required": ["email"],
                                      "properties": {"email": {"type": "string", "format": "email", "maxLength": 200},
                                                     "name": {"type": "string"}}},
                         "items": {"type": "array", "minItems": 1, "maxItems": 50,
                                   "items": {"type": "object", "required": ["sku", "qty"],
                                             "properties": {"sku": {"type": "string"},
                                                            "qty": {"type": "integer", "minimum": 1},
                                                            "price": {"type": "number"}}}},
                         "note": {"type": "string"}}}
DOC = {"id": "ord-123", "customer": {"email": "a@b.c", "name": "Ann"},
       "items": [{"sku": f"S{i}", "qty": i + 1, "price": 9.5} for i in range(5)], "note": "x"}
RAW = orjson.dumps(DOC)


def validators(rounds: int, n: int) -> None:
    import jsonschema
    import jsonschema_rs

    found = {"orjson.loads alone": lambda: orjson.loads(RAW)}
    v1 = jsonschema.Draft202012Validator(SCHEMA)
    found["jsonschema (Draft 2020-12)"] = lambda: v1.is_valid(orjson.loads(RAW))
    try:
        import fastjsonschema

        v2 = fastjsonschema.compile(SCHEMA)
        found["fastjsonschema"] = lambda: v2(orjson.loads(RAW))
    except ImportError:
        print("fastjsonschema: not installed (pip install fastjsonschema)")
    v3 = jsonschema_rs.validator_for(SCHEMA)
    found["jsonschema-rs"] = lambda: v3.is_valid(orjson.loads(RAW))
    for name, fn in found.items():
        runs = n // 20 if name.startswith("jsonschema (") else n
        print(f"{name:<30} {best_ns(fn, runs, rounds) / 1000:8.2f} us")


async def main(rounds: int, n: int) -> None:
    validators(rounds, n)
    routes = [{"route": "GET /api/{proxy+}", "integration": {"type": "http", "upstream": "app"},
               "request_validation": {"body": "Order", "required": {"headers": ["user-agent"]}},
               "request_parameters": {"overwrite:header.x-user": "$context.authorizer.claims.sub",
                                      "overwrite:querystring.item": "$request.path.proxy",
                                      "append:header.x-trace": "gw-$context.requestId"}}]
    async with proxy_gateway(routes=routes, models={"Order": SCHEMA}) as gw:
        req = proxied_request(gw)
        req.params = {"proxy": b"users/7"}
        req.body_buf = [RAW]
        req.claims = {"sub": "user-1"}
        stages = {type(s).__name__: s for s in req.route.stages}
        check, mapping = stages["ValidationStage"], stages["RequestMappingStage"]
        print(f"{'stage: body check':<30} {best_ns(lambda: check._check_body(None, req), n, rounds) / 1000:8.2f} us")
        print(f"{'stage: required parameters':<30} {best_ns(lambda: check._missing(req), n, rounds) / 1000:8.2f} us")
        headers = list(req.headers)

        def apply() -> None:
            req.headers = list(headers)
            req.query = b""
            mapping.apply(None, req)
        print(f"{'mapping: 3 mappings':<30} {best_ns(apply, n, rounds) / 1000:8.2f} us")


if __name__ == "__main__":
    cli(__doc__, main, 20_000)
