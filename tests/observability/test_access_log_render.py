"""The compiled access-log line's shortcuts write what the plain path writes: values
looked up already rendered (memos, past their bound too), the CLF time cached by the
second, a template for each case of the optional numbers; and the writer thread, which
takes every queued batch at once."""

from __future__ import annotations

import itertools
import os
import select

import orjson

from edgeplane.config.model import AccessLogConfig
from edgeplane.http.request import Request
from edgeplane.observability import access_format
from edgeplane.observability.access_format import compile_format, default_render
from edgeplane.runtime.accesslog import AccessLog, clf_time
from edgeplane.runtime.log_writer import LineWriter, _atomic_size

AWKWARD = [None, "", "plain", 'quo"te', "back\\slash", "nl\nx", "\x00\x1f\x7f", "héllo", "日本", "%s %d %%"]


class Peer:
    peer_ip = "127.0.0.1"
    client_cert_subject: str | None = None


def request(**values) -> Request:
    r = Request(100.0)
    r.t_wall, r.method, r.path, r.request_id, r.status = 1796446205.48, b"GET", b"/users/7", b"id-1", 200
    for name, value in values.items():
        setattr(r, name, value)
    return r


def off_log() -> AccessLog:
    return AccessLog(AccessLogConfig(destination="off"))


def test_memoised_values_read_back_as_they_were_past_the_memo_bound_too():
    render = compile_format({"error": "$context.error.message", "upstream": "$context.upstream",
                             "route": "<$context.routeKey>", "stage": "$context.stage"})
    log, peer = off_log(), Peer()
    n = access_format._MEMO_MAX * 2 + 10  # the memos fill and are emptied twice
    for i in range(n):
        values = {"error": AWKWARD[i % len(AWKWARD)], "upstream": f"app {i} \"é\"" if i % 3 else None,
                  "route_key": f"GET /r/{i % 7}\t", "stage": ["$default", 'p"rod'][i % 2]}
        r = request(**values)
        line = render(r, peer, log, 101.0)
        assert render(r, peer, log, 101.0) == line  # looked up: the same bytes as made
        assert orjson.loads(line) == {"error": values["error"], "upstream": values["upstream"],
                                      "route": f"<{values['route_key']}>", "stage": values["stage"]}


def test_the_default_line_with_and_without_its_rare_values():
    render, log = default_render(), off_log()
    for error, integration_error, subject, upstream in itertools.product(
            [None, "boom"], [None, 'read "timed" out'], [None, "CN=é,O=x\\y"], [None, "app 10.0.0.1:80"]):
        peer = Peer()
        peer.client_cert_subject = subject
        r = request(error=error, integration_error=integration_error, upstream=upstream)
        record = orjson.loads(render(r, peer, log, 101.0))
        assert (record["error"], record["integrationError"], record["clientCertSubject"], record["upstream"]) == (
            error, integration_error, subject, upstream)
        assert record["integrationLatency"] is None and record["routeKey"] == "-"


def test_the_clf_time_cached_by_the_second_is_the_time_of_each_line():
    render, log = compile_format({"t": "$context.requestTime", "ms": "$context.requestTimeEpoch"}), off_log()
    walls = [1.0, 1.5, 1.9999999, 2.0, 0.5, 0.0, -0.5, -1.5, 1796446205.9999999, 1796446206.0, 1796446205.0,
             86399.999, 86400.0, 1.25]
    for wall in walls + walls[::-1]:
        record = orjson.loads(render(request(t_wall=wall), Peer(), log, 101.0))
        assert record == {"t": clf_time(int(wall)), "ms": int(wall * 1000)}, wall


def test_optional_numbers_in_each_case_more_of_them_than_get_templates():
    fmt = {"integ": "$context.integrationLatency", "status": "$context.integrationStatus",
           "tries": "$context.integration.attempts", "text": "[$context.integrationLatency]"}
    render, log = compile_format(fmt), off_log()
    line_render = compile_format("$context.integrationStatus $context.integrationLatency $context.integration.attempts")
    for latency, status, attempts in itertools.product([None, 0.0004, 2.5], [0, 503], [0, 3]):
        r = request(integration_latency=latency, integration_status=status, integration_attempts=attempts)
        ms = None if latency is None else float("%.3f" % (latency * 1000))
        assert orjson.loads(render(r, Peer(), log, 101.0)) == {
            "integ": ms, "status": status or None, "tries": attempts or None,
            "text": "[-]" if latency is None else "[%.3f]" % (latency * 1000)}
        assert line_render(r, Peer(), log, 101.0) == b"%b %b %b\n" % (
            b"%d" % status if status else b"-", b"-" if latency is None else b"%.3f" % (latency * 1000),
            b"%d" % attempts if attempts else b"-")


def test_lines_counts_what_is_buffered_and_what_was_handed_over(tmp_path):
    log = AccessLog(AccessLogConfig(destination="file", path=str(tmp_path / "a.log"), buffer_bytes=1000))
    try:
        for n in range(1, 31):
            log.record(request(), Peer())
            assert log.lines == log.written == n
        log.flush(wait=2.0)
        assert log.lines == 30 and log.dropped == 0
    finally:
        log.close()
    assert (tmp_path / "a.log").read_bytes().count(b"\n") == 30


def test_the_writer_takes_every_queued_batch_at_once_up_to_a_reopen(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    writer = LineWriter(fd, max_pending=1 << 20, owns_fd=True)
    try:
        with writer._cond:  # the thread waits: everything queues
            for i in range(5):
                assert writer.submit(b"a%d\n" % i, 1)
            writer.reopen(os.open(second, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
            for i in range(3):
                assert writer.submit(b"b%d\nb%d\n" % (i, i), 2)
        assert writer.wait_idle(5.0)
    finally:
        writer.close()
    assert first.read_bytes() == b"a0\na1\na2\na3\na4\n"
    assert second.read_bytes() == b"b0\nb0\nb1\nb1\nb2\nb2\n"
    assert writer.dropped == 0


def test_only_pipes_sockets_and_terminals_are_written_in_pipe_buf_pieces(tmp_path):
    read, write = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    plain = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert _atomic_size(write) == select.PIPE_BUF
        assert _atomic_size(null) == 0  # /dev/null: no reader to share it with
        assert _atomic_size(plain) == 0
    finally:
        for fd in (read, write, null, plain):
            os.close(fd)
