"""The HTTP/1.1 layer of `inferd serve`, from raw sockets and curl:
keep-alive, pipelining, Expect: 100-continue, chunked bodies, the limits
(414, 431, 413, 408, connection cap), and requests that could smuggle a
second request (400 and the connection closed). After each hostile request
the daemon still serves."""
import json
import socket
import subprocess
import time

import pytest

from inferd_serve_harness import (TINY, RawConn, check_chat_stream, check_completion_stream,
                                  check_error, check_schema, http_request, start_server,
                                  tiny_args)

TOKENIZE = {"prompt": "hello"}


def alive(server):
    r = server.get("/health", timeout=10)
    assert r.status_code == 200


def test_keep_alive(tiny_any):
    c = RawConn(tiny_any)
    try:
        for _ in range(3):
            c.send(http_request("GET", "/health"))
            r = c.read_response()
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert (r.header("connection") or "keep-alive").lower() != "close"
        c.send(http_request("POST", "/tokenize", TOKENIZE))
        r = c.read_response()
        assert r.status_code == 200 and r.json()["count"] >= 1
    finally:
        c.close()


def test_pipelined_requests_answered_in_order(tiny_any):
    reqs = [http_request("GET", "/health", headers={"X-Request-Id": "p1"}),
            http_request("POST", "/tokenize", TOKENIZE, headers={"X-Request-Id": "p2"}),
            http_request("POST", "/v1/completions",
                         {"model": "tiny", "prompt": "pipelined", "max_tokens": 3,
                          "ignore_eos": True}, headers={"X-Request-Id": "p3"}),
            http_request("GET", "/v1/models", headers={"X-Request-Id": "p4"})]
    c = RawConn(tiny_any)
    try:
        c.send(b"".join(reqs))
        rs = [c.read_response() for _ in reqs]
    finally:
        c.close()
    assert [r.header("x-request-id") for r in rs] == ["p1", "p2", "p3", "p4"]
    assert [r.status_code for r in rs] == [200] * 4
    assert rs[0].json() == {"status": "ok"}
    assert "tokens" in rs[1].json()
    check_schema("Completion", rs[2].json())
    check_schema("ModelList", rs[3].json())


def test_pipelined_stream_then_request(tiny_any):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "ignore_eos": True, "stream": True}
    c = RawConn(tiny_any)
    try:
        c.send(http_request("POST", "/v1/chat/completions", body) +
               http_request("GET", "/health", headers={"X-Request-Id": "after-stream"}))
        r = c.read_response()
        assert r.status_code == 200
        assert r.header("content-type").startswith("text/event-stream")
        check_chat_stream(r.body)
        r = c.read_response()
        assert r.header("x-request-id") == "after-stream" and r.status_code == 200
    finally:
        c.close()


def test_expect_100_continue(tiny_any):
    body = json.dumps(TOKENIZE).encode()
    c = RawConn(tiny_any, timeout=10)
    try:
        c.send(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        r = c.read_response(head_only=True)
        assert r.status_code == 100, r.status_code
        c.send(body)
        r = c.read_response()
        assert r.status_code == 200 and r.json()["count"] >= 1
    finally:
        c.close()


def test_chunked_request_body(tiny_any):
    body = json.dumps(TOKENIZE).encode()
    half = len(body) // 2
    c = RawConn(tiny_any)
    try:
        c.send(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" +
               b"%x\r\n%s\r\n" % (half, body[:half]) +
               b"%x;ext=1\r\n%s\r\n" % (len(body) - half, body[half:]) + b"0\r\n\r\n")
        r = c.read_response()
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tiny_any.tokenize("hello")
    finally:
        c.close()


def test_http_1_0_and_connection_close(tiny_any):
    c = RawConn(tiny_any)
    try:
        c.send(b"GET /health HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status_code == 200
        assert c.closed(5)
    finally:
        c.close()
    c = RawConn(tiny_any)
    try:
        c.send(http_request("GET", "/health", headers={"Connection": "close"}) +
               http_request("GET", "/health"))
        r = c.read_response()
        assert r.status_code == 200
        assert c.closed(5), "a request after Connection: close was answered"
    finally:
        c.close()


SMUGGLING = {
    "cl_and_te": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate_cl": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Content-Length: 20\r\n\r\n{}",
    "plus_cl": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
    "hex_cl": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{}",
    "empty_cl": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
    "bad_chunk_size": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"\r\nzz\r\n{}\r\n0\r\n\r\n",
    "hex_prefix_chunk": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\n0x2\r\n{}\r\n0\r\n\r\n",
    "te_not_chunked_last": b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
                           b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "ctl_in_header_name": b"GET /health HTTP/1.1\r\nHost: x\r\nX-B\x01ad: v\r\n\r\n",
    "nul_in_header_value": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    "space_before_colon": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad : v\r\n\r\n",
    "empty_header_name": b"GET /health HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n",
    "obs_fold": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n",
    "ctl_in_request_line": b"GET /hea\x01lth HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_or_malformed_request_is_400_and_closed(tiny_any, name):
    c = RawConn(tiny_any, timeout=10)
    try:
        # a second, valid request follows: it must never be answered
        c.send(SMUGGLING[name] + http_request("GET", "/health"))
        r = c.read_response()
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert r.header("x-request-id"), "no X-Request-Id on the 400"
        if r.body:
            check_error(r, 400, type_=None)
        assert c.closed(5), "connection left open after a malformed request"
    finally:
        c.close()
    alive(tiny_any)


def test_headers_over_the_limit_are_431(tiny_any):
    c = RawConn(tiny_any, timeout=10)
    try:
        c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
        r = c.read_response()
        assert r.status_code == 431
        assert r.header("x-request-id"), "no X-Request-Id on the 431"
        check_error(r, 431, type_=None)
    finally:
        c.close()
    c = RawConn(tiny_any, timeout=10)
    try:  # many small headers adding up past 16 KiB
        c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n" +
               b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(300)) + b"\r\n")
        assert c.read_response().status_code == 431
    finally:
        c.close()
    # just under the limit is fine
    c = RawConn(tiny_any, timeout=10)
    try:
        c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 15000 + b"\r\n\r\n")
        assert c.read_response().status_code == 200
    finally:
        c.close()
    alive(tiny_any)


def test_request_line_over_8k_is_414(tiny_any):
    c = RawConn(tiny_any, timeout=10)
    try:
        c.send(b"GET /health?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.read_response()
        assert r.status_code == 414
    finally:
        c.close()
    alive(tiny_any)


def test_body_over_the_limit_is_413(tiny_any):
    c = RawConn(tiny_any, timeout=10)
    try:  # refused from Content-Length alone, before the body is sent
        c.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (8 * 1024 * 1024 + 1))
        r = c.read_response()
        assert r.status_code == 413
        check_error(r, 413, type_=None)
    finally:
        c.close()
    c = RawConn(tiny_any, timeout=20)
    try:  # a chunked body is counted as it comes
        c.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        try:
            for _ in range(9):
                c.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.read_response()
        assert r.status_code == 413
    finally:
        c.close()
    alive(tiny_any)


def test_a_large_body_under_the_limit_is_read(tiny_any):
    prompt = "word " * 200000  # 1 MB: read in full, then refused for its length
    r = tiny_any.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1})
    check_error(r, 400, code="context_length_exceeded")


def test_curl_stream_sse_framing(tiny_any):
    body = json.dumps({"model": "tiny", "prompt": "curl", "max_tokens": 5, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    p = subprocess.run(["curl", "-sN", "--max-time", "60", "-D", "-",
                        "-H", "Content-Type: application/json", "-d", body,
                        tiny_any.url + "/v1/completions"], capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr
    head, _, sse = p.stdout.partition(b"\r\n\r\n")
    head = head.decode().lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/event-stream" in head
    assert "cache-control: no-cache" in head
    assert "x-request-id:" in head
    texts, finish, usage, events = check_completion_stream(sse, include_usage=True)
    assert usage["completion_tokens"] == 5 and finish == {0: "length"}
    # every event is exactly one `data: <json>` line and a blank line
    lines = sse.split(b"\n")
    assert all(ln.startswith(b"data: ") or ln == b"" or ln.startswith(b":") for ln in lines)


def test_curl_non_stream(tiny_any):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "curl"}],
                       "max_tokens": 2})
    p = subprocess.run(["curl", "-s", "--max-time", "60", "-i", "-H",
                        "Content-Type: application/json", "-d", body,
                        tiny_any.url + "/v1/chat/completions"], capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr
    head, _, payload = p.stdout.partition(b"\r\n\r\n")
    head = head.decode().lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: application/json" in head
    assert f"content-length: {len(payload)}" in head
    check_schema("ChatCompletion", json.loads(payload))


# ----------------------------------------------- limits set on the command line

@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--header-timeout", "1",
                     "--body-timeout", "1", "--idle-timeout", "2", "--max-header-bytes", "2048",
                     "--max-body-bytes", "4096", "--max-connections", "8", name="tiny")
    yield s
    s.stop()


def test_slow_headers_get_408(limited):
    c = RawConn(limited, timeout=10)
    try:
        t0 = time.monotonic()
        c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        r = c.read_response()
        took = time.monotonic() - t0
        assert r.status_code == 408, r.status_code
        assert r.header("x-request-id"), "no X-Request-Id on the 408"
        assert 0.5 < took < 4, took
        assert c.closed(5)
    finally:
        c.close()
    # a client that dribbles one byte a second is cut off too
    c = RawConn(limited, timeout=10)
    try:
        t0 = time.monotonic()
        got = None
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefgh\r\n":
            try:
                c.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.3)
            if time.monotonic() - t0 > 3:
                break
        try:
            got = c.read_response().status_code
        except (EOFError, ConnectionResetError):
            pass
        assert got in (408, None) and time.monotonic() - t0 < 6
    finally:
        c.close()
    alive(limited)


def test_slow_body_gets_408(limited):
    c = RawConn(limited, timeout=10)
    try:
        c.send(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 100\r\n\r\n{\"prompt\":")
        t0 = time.monotonic()
        r = c.read_response()
        assert r.status_code == 408 and time.monotonic() - t0 < 4
    finally:
        c.close()


def test_dripped_body_below_the_minimum_rate_gets_408(limited):
    """A body sent one byte every 0.4 s never stalls for the 1 s body
    timeout, but averages 2.5 bytes/s: past the timeout it is cut off for
    being under --min-body-rate (default 1024 bytes/s), instead of holding
    the connection for as long as the client likes."""
    body = b'{"prompt": "' + b"x" * 60 + b'"}'
    c = RawConn(limited, timeout=10)
    try:
        c.send(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body))
        t0 = time.monotonic()
        for b in body[:8]:  # 3.2 s of drip: the cut comes at the first read past 1 s
            try:
                c.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.4)
        r = c.read_response()
        assert r.status_code == 408, r.status_code
        assert "min-body-rate" in r.text
        assert time.monotonic() - t0 < 5
    finally:
        c.close()
    # a body that is slow but keeps up the rate is read
    c = RawConn(limited, timeout=10)
    try:
        body = b'{"prompt": "' + b"y" * 3000 + b'"}'
        c.send(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 600):  # 600 bytes every 0.3 s: 2000 bytes/s
            c.send(body[i:i + 600])
            time.sleep(0.3)
        assert c.read_response().status_code == 200
    finally:
        c.close()
    alive(limited)


def test_idle_keep_alive_connection_is_closed(limited):
    c = RawConn(limited, timeout=10)
    try:
        c.send(http_request("GET", "/health"))
        assert c.read_response().status_code == 200
        t0 = time.monotonic()
        assert c.closed(6)
        assert 1.5 < time.monotonic() - t0 < 5
    finally:
        c.close()


def test_configured_header_and_body_limits(limited):
    c = RawConn(limited, timeout=10)
    try:
        c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2100 + b"\r\n\r\n")
        assert c.read_response().status_code == 431
    finally:
        c.close()
    r = limited.post("/tokenize", {"prompt": "x" * 5000})
    check_error(r, 413, type_=None)
    r = limited.post("/tokenize", {"prompt": "x" * 3000})
    assert r.status_code == 200


def test_connection_cap(limited):
    conns = []
    try:
        for _ in range(8):
            conns.append(socket.create_connection((limited.host, limited.port), timeout=10))
        time.sleep(0.2)
        extra = RawConn(limited, timeout=10)
        conns.append(extra.sock)
        extra.send(http_request("GET", "/health"))
        try:
            r = extra.read_response()
            assert r.status_code == 503, r.status_code
        except (EOFError, ConnectionResetError):
            pass  # refused without a word is acceptable too
    finally:
        for s in conns:
            s.close()
    time.sleep(0.3)
    alive(limited)
