"""Async scheduling through the daemon (--async-scheduling, on by default
with a GPU; forced on here on the CPU, where it runs the same bookkeeping).

Each decode step is launched before the previous step's tokens reach the
host. That must change nothing a client sees: the same concurrent mix of
requests (greedy, seeded, logprobs, n=2, stops, streaming) gives the same
choices as the daemon without it, and clients that leave mid-stream, or a
SIGTERM in the middle of the load, leave no KV block held. Run against the
release build and, when built, the ASan+UBSan one (a use-after-free of a
finished request's sample still in flight would show there)."""
import concurrent.futures as cf
import json
import signal
import time

import pytest

from inferd_serve_harness import (TINY, RawConn, http_request, server_builds, start_server,
                                  tiny_args)


@pytest.fixture(scope="module", params=server_builds(), ids=lambda b: b.name)
def tiny_async(request, tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--async-scheduling", name="tiny",
                     exe=request.param / "inferd")
    yield s
    rc = s.stop(timeout=60)
    assert rc == 0, f"inferd serve --async-scheduling exited {rc}:\n{s.stderr()[-5000:]}"


def requests_mix():
    out = []
    for i in range(14):
        body = {"model": "tiny", "prompt": f"Request {i}: the quick brown fox " * (1 + i % 3),
                "max_tokens": 8 + 5 * (i % 4), "ignore_eos": True}
        if i % 3 == 1:
            body.update(temperature=0.9, seed=1000 + i, top_p=0.9)
        elif i % 3 == 2:
            body.update(temperature=0.7, seed=7 * i, logprobs=3)
        else:
            body.update(temperature=0)
        if i == 5:
            body.update(n=2)                   # forks: drawn on the host
        if i == 7:
            body.update(presence_penalty=0.5)  # penalties: steps one at a time
        if i == 9:
            body.update(stop=["fox"])
        out.append(body)
    return out


def run_mix(server):
    def one(body):
        r = server.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        j = r.json()
        return [(c["index"], c["text"], c["finish_reason"],
                 json.dumps(c.get("logprobs"), sort_keys=True)) for c in j["choices"]]
    with cf.ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, requests_mix()))


def steps_ahead(server):
    return server.metrics().value("inferd:engine_steps_ahead_total")


def settled(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m.value("inferd:kv_cache_blocks", state="used") == 0 and
                m.value("inferd:num_requests_running") == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_same_choices_as_without(tiny, tiny_async):
    before = steps_ahead(tiny_async)
    want = run_mix(tiny)
    got = run_mix(tiny_async)
    assert got == want
    assert steps_ahead(tiny_async) > before, "no step was launched ahead"
    assert steps_ahead(tiny) == 0
    m = settled(tiny_async)
    assert m.value("inferd:kv_cache_blocks", state="used") == 0


def test_clients_leaving_mid_stream(tiny_async):
    """Streams closed (FIN, or RST via SO_LINGER 0) after a few chunks while
    their next step is already launched: every request is cancelled, and
    its blocks come back."""
    conns = []
    for i in range(6):
        c = RawConn(tiny_async, timeout=30)
        body = {"model": "tiny", "prompt": f"Stream {i} " * 5, "max_tokens": 400,
                "ignore_eos": True, "stream": True, "temperature": 0}
        c.send(http_request("POST", "/v1/completions", body))
        head = c.begin_stream()
        assert head.status_code == 200
        assert c.read_until(lambda b: b.count(b"data: ") >= 3, 30)
        conns.append(c)
    for i, c in enumerate(conns):
        if i % 2:
            c.abort()
        else:
            c.close()
    m = settled(tiny_async)
    assert m.value("inferd:kv_cache_blocks", state="used") == 0
    assert m.value("inferd:num_requests_running") == 0


def test_sigterm_under_load(tmp_path_factory):
    """SIGTERM while streams are mid-flight: they finish, the daemon exits 0."""
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--async-scheduling", name="tiny")
    try:
        bodies = [{"model": "tiny", "prompt": f"Drain {i}", "max_tokens": 60, "ignore_eos": True,
                   "temperature": 0} for i in range(4)]
        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(s.post, "/v1/completions", b) for b in bodies]
            time.sleep(0.3)
            s.signal(signal.SIGTERM)
            for f in futs:
                r = f.result(timeout=60)
                assert r.status_code == 200
                assert r.json()["usage"]["completion_tokens"] == 60
        assert s.wait(60) == 0
    finally:
        if s.alive():
            s.kill()
