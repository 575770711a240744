"""Retries of an `http` integration's request (an upstream's `retries` policy).

Owns `retry(exchange, kind, reason)`, asked by `proxy.ProxyExchange` at each failure
that a policy can name: `connect-failure` (nothing was sent), `reset` (the upstream
closed or reset the connection before answering), or a 5xx status (its answer is
dropped, unread). It says whether the request goes again, and if so schedules the next
try on another endpoint (`cluster.Upstream.pick(exclude=...)`) after a backoff with
full jitter (`base` x 2^(retry - 1), at most `max`).

A failure is retried only when all hold:
- the route's `integration.retries`, or else its upstream's `retries`, names it, and
  tries are left;
- no byte of the response reached the client, and the request can be sent again: a
  connect failure always can (nothing was sent); otherwise the method is idempotent
  (or the policy says `methods: all`) and the body sent so far is still held (at most
  64 KiB, `proxy._REPLAY_MAX`);
- the upstream's retry budget allows one more retry in flight; a retry after a connect
  failure is outside the budget (the first try did no work upstream, so the retry adds
  none: it is the request's only try that reaches one), still within `attempts` and
  `circuit_breaker.max_retries`.

Each try counts in `req.integration_attempts` (the access log's
`$context.integration.attempts`) and in the upstream's retry counters (/upstreams, the
metrics).
"""

from __future__ import annotations

import random
from typing import Any

_uniform = random.uniform


def _policy(exchange: Any) -> tuple[Any, Any]:
    """(the upstream of the attempt's endpoint, the retry policy: the route's, else that
    upstream's); (None, None) before an endpoint was picked."""
    pool = exchange.pool
    owner = pool.owner if pool is not None else None
    if owner is None:
        return None, None
    return owner, exchange.integ.retries or owner.cfg.resilience.retries


def retry(exchange: Any, kind: str, reason: str) -> bool:
    pool = exchange.pool
    owner, policy = _policy(exchange)
    if policy is None or exchange.attempt >= policy.attempts or kind not in policy.retry_on:
        return False
    req = exchange.req
    if req.response_started or exchange.cancelled:
        return False
    if kind != "connect-failure" and exchange.replay is None:
        return False  # sent, and not kept: it cannot go again
    if exchange.retrying is not None:  # the previous retry is over: out of its upstream's count
        exchange.retrying.retries_active -= 1
        exchange.retrying = None
    if not owner.retry_allowed(policy.budget, policy.min_retry_concurrency, kind != "connect-failure"):
        return False
    exchange.retrying = owner  # the upstream whose budget counts it (a split may pick another next)
    exchange.tried = (*exchange.tried, pool)
    exchange.attempt += 1
    req.integration_attempts = exchange.attempt
    conn = exchange.conn
    if conn is not None:  # an answer being dropped: its connection goes with it
        exchange.conn = None
        conn.close("retried")
    exchange.got_bytes = False
    exchange.skip_interim = False
    delay = _uniform(0, min(policy.backoff_max, policy.backoff_base * 2 ** (exchange.attempt - 2)))
    exchange.proto.loop.call_later(delay, _again, exchange, reason)
    return True


def _again(exchange: Any, reason: str) -> None:
    if exchange.done:
        done(exchange)
        return
    exchange.req.integration_error = None
    exchange._acquire(True)


def arm_try_timer(exchange: Any) -> None:
    """An attempt's request is on its way: with `per_try_timeout`, its wait for the
    response head is bounded; past it the attempt counts as a 504 (retried as one, when
    `retry_on` names 504, on another endpoint; else the client gets the 504 at once)."""
    policy = _policy(exchange)[1]
    if policy is None or policy.per_try_timeout is None:
        return
    if exchange.try_timer is not None:
        exchange.try_timer.cancel()
    exchange.try_timer = exchange.proto.loop.call_later(policy.per_try_timeout, _try_expired, exchange)


def _try_expired(exchange: Any) -> None:
    exchange.try_timer = None
    if exchange.done or exchange.got_bytes:
        return
    pool = exchange.pool
    if pool is not None:
        pool.answered(504)  # toward its ejection, as an answer that never came
    if not retry(exchange, "504", "per-try timeout"):
        exchange.on_timeout()


def done(exchange: Any) -> None:
    """The exchange ended: its retry, if any, leaves the budget's count; its per-try
    timer stops."""
    if exchange.try_timer is not None:
        exchange.try_timer.cancel()
        exchange.try_timer = None
    if exchange.retrying is not None:
        exchange.retrying.retries_active -= 1
        exchange.retrying = None
