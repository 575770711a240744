"""Handlers for the function-integration tests, written the way AWS's examples write
Lambda handlers (`lambda_handler(event, context)` returning a proxy response)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time


def lambda_handler(event, context):  # AWS's "Hello from Lambda" example, unchanged
    return {
        'statusCode': 200,
        'body': json.dumps('Hello from Lambda!')
    }


def echo(event, context):
    """The event and what the context offers, as JSON."""
    return {"statusCode": 200, "headers": {"Content-Type": "application/json", "X-Fn": "echo"},
            "body": json.dumps({"event": event, "request_id": context.aws_request_id,
                                "function_name": context.function_name,
                                "remaining_ms": context.get_remaining_time_in_millis(),
                                "thread": threading.current_thread().name})}


async def async_echo(event, context):
    await asyncio.sleep(0)
    return {"statusCode": 201, "cookies": ["a=1; Path=/", "b=2"], "body": event.get("body") or "",
            "headers": {"content-type": "text/plain"}}


def plain_value(event, context):
    return {"items": [1, 2, 3]}  # no statusCode: a 200 JSON response of it (payload 2.0)


def binary(event, context):
    return {"statusCode": 200, "isBase64Encoded": True, "headers": {"content-type": "image/png"},
            "body": base64.b64encode(b"\x89PNG\r\n\x00\xff").decode()}


def boom(event, context):
    raise RuntimeError("the handler failed on purpose")


def bad_status(event, context):
    return {"statusCode": "abc", "body": "x"}


def bad_header(event, context):
    return {"statusCode": 200, "headers": {"x-evil": "a\r\nset-cookie: stolen=1"}, "body": "x"}


async def slow_async(event, context):
    await asyncio.sleep(5)
    return {"statusCode": 200, "body": "late"}


def slow_sync(event, context):
    time.sleep(1.5)
    return {"statusCode": 200, "body": "slept"}


not_callable = 42


def exits(event, context):
    raise SystemExit(1)


async def interrupts(event, context):
    raise KeyboardInterrupt


def interim(event, context):
    return {"statusCode": 100, "body": ""}


def odd_digit(event, context):
    return {"statusCode": "\u00b2", "body": "x"}


def own_date(event, context):
    return {"statusCode": 200, "headers": {"Date": "Thu, 01 Jan 1970 00:00:00 GMT", "Server": "lambda"},
            "body": "d"}


def stuck(event, context):
    time.sleep(2.0)
    return {"statusCode": 200, "body": "unstuck"}


CALLS = {"authorize": 0}


def authorize(event, context):
    """A simple-response Lambda authorizer, as AWS's example writes one."""
    CALLS["authorize"] += 1
    token = event["headers"].get("authorization", "")
    response = {"isAuthorized": False, "context": {}}
    if token == "secretToken":
        response = {"isAuthorized": True, "context": {"user": "ann", "tier": "gold"}}
    return response


async def authorize_policy(event, context):
    """An IAM-policy Lambda authorizer (simple responses off)."""
    effect = "Allow" if event["identitySource"] == ["let-me-in"] else "Deny"
    return {"principalId": "user|a1", "context": {"scope": "all"},
            "policyDocument": {"Version": "2012-10-17",
                               "Statement": [{"Action": "execute-api:Invoke", "Effect": effect,
                                              "Resource": [event["routeArn"]]}]}}


def authorize_broken(event, context):
    raise ValueError("the authorizer failed on purpose")


WS_EVENTS: list[dict] = []


def ws_handler(event, context):
    """A WebSocket API Lambda, as AWS's chat example writes one (one handler, all routes)."""
    WS_EVENTS.append(event)
    ctx = event["requestContext"]
    if ctx["eventType"] == "CONNECT":
        if event.get("queryStringParameters", {}).get("token") != "open-sesame":
            return {"statusCode": 403, "body": "no"}
        return {"statusCode": 200}
    if ctx["eventType"] == "DISCONNECT":
        return {"statusCode": 200}
    return {"statusCode": 200, "body": json.dumps({"echo": json.loads(event["body"])["data"],
                                                    "connectionId": ctx["connectionId"],
                                                    "route": ctx["routeKey"]})}
