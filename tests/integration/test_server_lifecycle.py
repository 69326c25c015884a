"""Starting and stopping `inferd serve`: its command line, and SIGTERM, which
drains: the listening socket closes, /ready turns 503, streams in flight
finish (up to --drain-timeout), then the daemon exits 0."""
import signal
import socket
import subprocess
import time

import pytest

from inferd_serve_harness import (EXE, TINY, RawConn, SSE, default_model, http_request,
                                  needs_default_model, start_server, tiny_args)


def serve(*args, timeout=60):
    return subprocess.run([str(EXE), "serve", *map(str, args)], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_serve_help():
    r = serve("--help")
    assert r.returncode == 0, r.stderr.decode()
    out = (r.stdout + r.stderr).decode()
    for flag in ("--host", "--port", "--served-model-name", "--api-key", "--api-key-file",
                 "--tls-cert", "--tls-key", "--chat-template", "--max-seqs", "--max-queue",
                 "--drain-timeout", "--max-body-bytes", "--header-timeout"):
        assert flag in out, f"serve --help does not mention {flag}"


def test_serve_bad_command_lines(tmp_path):
    r = serve(TINY, "--port", "notaport")
    assert r.returncode == 2 and b"--port" in r.stderr, r.stderr
    r = serve(TINY, "--no-such-flag")
    assert r.returncode == 2, r.stderr
    r = serve(tmp_path / "absent.gguf", "--port", "0")
    assert r.returncode == 1 and b"absent.gguf" in r.stderr, r.stderr
    r = serve(TINY, "--port", "0", "--tls-cert", tmp_path / "nope.pem", "--tls-key",
              tmp_path / "nope.key")
    assert r.returncode != 0 and b"nope" in r.stderr, r.stderr
    r = serve(TINY, "--port", "0", "--chat-template", tmp_path / "nope.jinja")
    assert r.returncode != 0 and b"nope.jinja" in r.stderr, r.stderr


def test_port_in_use_is_a_clear_error(tiny):
    r = serve(TINY, *tiny_args(), "--host", "127.0.0.1", "--port", tiny.port, timeout=60)
    assert r.returncode == 1, r.stderr
    assert str(tiny.port).encode() in r.stderr, r.stderr


def test_sigterm_when_idle_exits_0(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args())
    assert s.get("/health").status_code == 200
    s.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert s.wait(10) == 0, s.stderr()[-2000:]
    assert time.monotonic() - t0 < 5
    s.stop()


def refused(server, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((server.host, server.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@needs_default_model
def test_sigterm_drains_a_stream_in_flight(tmp_path_factory):
    s = start_server(tmp_path_factory, default_model(), "--threads", "2", "--drain-timeout",
                     "60", name="qwen")
    try:
        idle = RawConn(s, timeout=10)           # a keep-alive connection, idle
        idle.send(http_request("GET", "/health"))
        assert idle.read_response().status_code == 200
        c = RawConn(s, timeout=60)
        c.send(http_request("POST", "/v1/chat/completions", {
            "model": "qwen", "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}))
        assert c.begin_stream().status_code == 200
        assert c.read_until(lambda b: b.count(b"data: ") >= 2, 60)
        s.signal(signal.SIGTERM)
        assert refused(s), "new connections still accepted while draining"
        # on a connection opened before, /ready says 503 (or the daemon
        # closed the idle connection, which is as good)
        try:
            idle.send(http_request("GET", "/ready"))
            r = idle.read_response()
            assert r.status_code == 503, r.status_code
        except (EOFError, ConnectionResetError, BrokenPipeError):
            pass
        body = c.read_rest(90)
        sse = SSE(body)
        assert sse.events[-1]["usage"]["completion_tokens"] == 40
        assert sse.events[-2]["choices"][0]["finish_reason"] == "length"
        assert s.wait(30) == 0, s.stderr()[-2000:]
    finally:
        s.stop()


@needs_default_model
def test_drain_timeout_bounds_the_shutdown(tmp_path_factory):
    s = start_server(tmp_path_factory, default_model(), "--threads", "2", "--drain-timeout",
                     "2", name="qwen")
    try:
        c = RawConn(s, timeout=60)
        c.send(http_request("POST", "/v1/completions", {
            "model": "qwen", "prompt": "Once upon a time", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}))
        assert c.begin_stream().status_code == 200
        assert c.read_until(lambda b: b.count(b"data: ") >= 2, 60)
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        assert s.wait(15) == 0, s.stderr()[-2000:]
        assert time.monotonic() - t0 < 8
        body = c.read_rest(10)
        # the stream was cut: it ended, one way or another, short of 2000 tokens
        assert body.count(b"data: ") < 2000
    finally:
        s.stop()
