"""Clients that go away, and a full queue, on the default model (slow enough
here, ~15-20 tokens/s, that a request is still decoding when its client
leaves). The daemon runs one sequence at a time (--max-seqs 1) with room for
one waiting request (--max-queue 1), so "running" and "queued" are states a
test can set up.

Whatever the client does (FIN or reset, streaming or not, while queued or
decoding), the request is cancelled within an engine step: /metrics shows
inferd:kv_cache_blocks{state="used"} back at 0 and no request running
within ~2 s. A request left to run would hold its blocks for many seconds
(hundreds of tokens to go), so a leak cannot pass unnoticed."""
import json
import time

import openai
import pytest

from inferd_serve_harness import (RawConn, SSE, check_error, check_schema, default_model,
                                  http_request, needs_default_model, start_server)

pytestmark = needs_default_model

LONG = 600  # tokens a request would decode if nobody stopped it: ~30 s here


@pytest.fixture(scope="module")
def one_seq(tmp_path_factory):
    s = start_server(tmp_path_factory, default_model(), "--threads", "2", "--max-seqs", "1",
                     "--max-queue", "1", name="qwen")
    yield s
    s.stop()


def chat_body(stream, max_tokens=LONG, text="Count from one to a thousand."):
    return {"model": "qwen", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def has_content(body):
    """True once an SSE body holds a chunk with some generated text."""
    return b'"content":"' in body.replace(b'"content":""', b"")


def start_stream(server, **kw):
    """A raw streaming chat request, read until the first generated text."""
    c = RawConn(server, timeout=60)
    c.send(http_request("POST", "/v1/chat/completions", chat_body(True, **kw)))
    head = c.begin_stream()
    assert head.status_code == 200, head.status_code
    assert c.read_until(has_content, 60), f"no content within 60 s: {c.body[-300:]!r}"
    return c


def settled(server, timeout=2.0):
    """Waits until no request runs and no KV block is in use; returns the
    metrics seen last."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m.value("inferd:kv_cache_blocks", state="used") == 0 and
                m.value("inferd:num_requests_running") == 0 and
                m.value("inferd:num_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def assert_settled(server, timeout=2.0):
    m = settled(server, timeout)
    assert m.value("inferd:kv_cache_blocks", state="used") == 0, \
        "KV blocks still in use after the client left"
    assert m.value("inferd:num_requests_running") == 0
    assert m.value("inferd:num_requests_waiting") == 0


@pytest.fixture(autouse=True)
def _idle_before_and_after(one_seq):
    assert_settled(one_seq, 30)
    yield
    settled(one_seq, 30)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_stream_disconnect_frees_the_kv_cache(one_seq, how):
    c = start_stream(one_seq)
    m = one_seq.metrics()
    assert m.value("inferd:num_requests_running") == 1
    assert m.value("inferd:kv_cache_blocks", state="used") > 0
    gen0 = m.value("inferd:generation_tokens_total")
    c.close() if how == "fin" else c.abort()
    t0 = time.monotonic()
    assert_settled(one_seq, 2.0)
    took = time.monotonic() - t0
    # and generation stopped there: far fewer than LONG tokens were made
    time.sleep(0.5)
    gen1 = one_seq.metric("inferd:generation_tokens_total")
    assert gen1 - gen0 < 50, (gen0, gen1, took)
    assert one_seq.get("/health").status_code == 200


def test_non_streaming_disconnect_while_decoding(one_seq):
    gen0 = one_seq.metric("inferd:generation_tokens_total")
    c = RawConn(one_seq, timeout=60)
    c.send(http_request("POST", "/v1/chat/completions", chat_body(False)))
    v = one_seq.wait_metric("inferd:generation_tokens_total", lambda g: g >= gen0 + 3, 60)
    assert v >= gen0 + 3, "the request never started decoding"
    assert one_seq.metric("inferd:num_requests_running") == 1
    c.close()
    assert_settled(one_seq, 2.0)
    time.sleep(0.5)
    assert one_seq.metric("inferd:generation_tokens_total") - gen0 < 60


def test_disconnect_during_prefill(one_seq):
    """A long prompt takes ~17 s to prefill here (~90 tokens/s, in chunks of
    --max-batched-tokens 256, ~3 s each); its client leaves after one
    second: the rest is never computed."""
    prompt = " ".join(f"word{i}" for i in range(400))  # ~1,550 tokens
    gen0 = one_seq.metric("inferd:generation_tokens_total")
    c = RawConn(one_seq, timeout=60)
    c.send(http_request("POST", "/v1/completions", {"model": "qwen", "prompt": prompt,
                                                     "max_tokens": 50, "stream": True}))
    assert one_seq.wait_metric("inferd:num_requests_running", lambda x: x == 1, 10) == 1
    time.sleep(1.0)
    assert one_seq.metric("inferd:kv_cache_blocks", state="used") > 0
    c.abort()
    t0 = time.monotonic()
    assert_settled(one_seq, 5.0)  # one prefill step, and some slack
    assert time.monotonic() - t0 < 5
    assert one_seq.metric("inferd:generation_tokens_total") == gen0  # never got to decode


def test_disconnect_while_queued(one_seq):
    a = start_stream(one_seq)                      # runs
    b = RawConn(one_seq, timeout=60)               # waits behind it
    b.send(http_request("POST", "/v1/completions",
                        {"model": "qwen", "prompt": "queued", "max_tokens": LONG,
                         "ignore_eos": True}))
    w = one_seq.wait_metric("inferd:num_requests_waiting", lambda x: x == 1, 10)
    assert w == 1, "the second request is not waiting"
    b.close()
    w = one_seq.wait_metric("inferd:num_requests_waiting", lambda x: x == 0, 2)
    assert w == 0, "a queued request whose client left is still waiting"
    # the running one is untouched and still streams
    n = len(a.body)
    assert a.read_until(lambda body: len(body) > n + 20, 20)
    assert one_seq.metric("inferd:num_requests_running") == 1
    a.abort()
    assert_settled(one_seq, 2.0)


def test_queue_full_is_503_with_retry_after(one_seq):
    a = start_stream(one_seq)
    b = RawConn(one_seq, timeout=60)
    b.send(http_request("POST", "/v1/chat/completions", chat_body(True)))
    assert one_seq.wait_metric("inferd:num_requests_waiting", lambda x: x == 1, 10) == 1
    try:
        r = one_seq.post("/v1/chat/completions", chat_body(False, max_tokens=4), timeout=10)
        assert r.status_code == 503, (r.status_code, r.text[:300])
        check_error(r, 503, type_=None)
        ra = r.headers.get("retry-after")
        assert ra is not None and ra.strip().isdigit(), r.headers
        r = one_seq.post("/v1/completions", {"model": "qwen", "prompt": "x", "max_tokens": 1},
                         timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after")
        with pytest.raises(openai.APIStatusError) as e:
            one_seq.openai().completions.create(model="qwen", prompt="x", max_tokens=1)
        assert e.value.status_code == 503
        # what does not need the engine still answers
        assert one_seq.get("/health", timeout=10).status_code == 200
        assert one_seq.post("/tokenize", {"prompt": "x"}, timeout=10).status_code == 200
    finally:
        b.abort()
        a.abort()
    assert_settled(one_seq, 2.0)


def test_ping_comments_while_waiting(one_seq):
    """A stream that has nothing to send for 15 s (here: queued behind a long
    request) gets `: ping` comment lines, which SSE clients ignore."""
    a = start_stream(one_seq)
    b = RawConn(one_seq, timeout=60)
    b.send(http_request("POST", "/v1/chat/completions", chat_body(True)))
    try:
        head = b.begin_stream()
        assert head.status_code == 200
        t0 = time.monotonic()
        assert b.read_until(lambda body: b": ping" in body, 20), \
            f"no ': ping' within 20 s: {b.body[:300]!r}"
        assert time.monotonic() - t0 > 10  # not a flood
        assert one_seq.metric("inferd:num_requests_waiting") == 1
        text = b.body.decode()
        assert "\n: ping\n\n" in "\n" + text or text.startswith(": ping\n\n"), text[:200]
    finally:
        b.abort()
        a.abort()
    assert_settled(one_seq, 2.0)


def test_a_stream_completes_after_the_disconnects(one_seq):
    """After all of the above the daemon still answers, in full."""
    r = one_seq.post("/v1/chat/completions", dict(chat_body(True, max_tokens=5),
                                                  stream_options={"include_usage": True}))
    sse = SSE(r.content)
    for ev in sse.events:
        check_schema("ChatCompletionChunk", ev)
    assert sse.events[-1]["usage"]["completion_tokens"] == 5
    assert_settled(one_seq, 2.0)
    m = one_seq.metrics()
    assert m.value("inferd:http_connections_open") <= 2, \
        "connections of the clients that left are still open"
    json.dumps(m.samples)  # parsed fine
