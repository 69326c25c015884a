"""The operational routes of `inferd serve`: /health, /ready, /tokenize,
/detokenize, /metrics, X-Request-Id and the access log; API keys; TLS."""
import json
import re
import subprocess
import time

import jinja2
import openai
import pytest
from tokenizers import Tokenizer

from inferd_serve_harness import (CHATML, TINY, TINY_CTX, RawConn, check_chat_stream,
                                  check_error, check_response, http_request, make_cert,
                                  start_server, tiny_args)

TEXTS = ["hello world", "", " leading and trailing spaces  ", "Unicode: é ü ñ ☃ 日本語 🎉🦀",
         "code:\n\tdef f(x):\n\t    return x ** 2  # comment\n", "line\r\nbreaks\r\n",
         "<|eos|> not special unless asked", "1234567890 3.14159 -42", "a" * 300]


def test_health_and_ready(tiny):
    r = tiny.get("/health")
    assert check_response("GET", "/health", r) == {"status": "ok"}
    assert r.headers["content-type"].startswith("application/json")
    r = tiny.get("/ready")
    assert check_response("GET", "/ready", r) == {"status": "ready"}


def test_request_id_echoed_or_generated(tiny):
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                               ("GET", "/nope", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"model": "tiny", "prompt": "x",
                                                            "max_tokens": 1}),
                               ("POST", "/v1/completions", {"model": "tiny", "n": 0})]:
        with tiny.http() as c:
            r = c.request(method, path, json=body, headers={"X-Request-Id": "req-abc-123"})
            assert r.headers.get("x-request-id") == "req-abc-123", (method, path, r.headers)
            r1 = c.request(method, path, json=body)
            r2 = c.request(method, path, json=body)
            a, b = r1.headers.get("x-request-id"), r2.headers.get("x-request-id")
            assert a and b and a != b, (method, path, a, b)
    # a streamed response carries it too
    with tiny.http() as c:
        with c.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "s-1"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 2, "stream": True}) as r:
            assert r.headers.get("x-request-id") == "s-1"
            r.read()


def test_access_log_line(tiny):
    rid = f"access-log-{time.time_ns()}"
    r = tiny.post("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 3,
                                      "ignore_eos": True}, headers={"X-Request-Id": rid})
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while True:
        lines = [ln for ln in tiny.stderr().splitlines() if rid in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "/v1/completions" in line and "200" in line, line
    p = r.json()["usage"]["prompt_tokens"]
    assert re.search(rf"\b{p}\b", line) and re.search(r"\b3\b", line), line


# ------------------------------------------------------------- tokenizer

def test_tokenize_matches_tokenizers_and_round_trips(tiny):
    ref = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    for text in TEXTS:
        r = tiny.post("/tokenize", {"prompt": text})
        body = check_response("POST", "/tokenize", r)
        want = ref.encode(text).ids
        assert body["tokens"] == want, text
        assert body["count"] == len(want) and body["max_model_len"] == TINY_CTX
        r = tiny.post("/detokenize", {"tokens": want})
        assert check_response("POST", "/detokenize", r)["prompt"] == \
            ref.decode(want, skip_special_tokens=False) == text
    # add_special_tokens false on a model that adds none changes nothing
    r = tiny.post("/tokenize", {"prompt": "hello", "add_special_tokens": False})
    assert r.json()["tokens"] == ref.encode("hello").ids


def test_tokenize_messages_applies_the_chat_template(tiny):
    ref = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    tpl = jinja2.Environment().from_string(CHATML.read_text())
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ☃"}]
    for agp in (True, False):
        r = tiny.post("/tokenize", {"messages": msgs, "add_generation_prompt": agp})
        body = check_response("POST", "/tokenize", r)
        text = tpl.render(messages=msgs, add_generation_prompt=agp)
        assert body["tokens"] == ref.encode(text).ids, agp
    default = tiny.post("/tokenize", {"messages": msgs}).json()
    assert default["tokens"] == ref.encode(tpl.render(messages=msgs,
                                                      add_generation_prompt=True)).ids


@pytest.mark.parametrize("route,body,param", [
    ("/tokenize", {}, None), ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": "x"}, "messages"),
    ("/detokenize", {}, "tokens"), ("/detokenize", {"tokens": "x"}, "tokens"),
    ("/detokenize", {"tokens": [99999]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_tokenize_errors(tiny, route, body, param):
    r = tiny.post(route, body)
    check_response("POST", route, r)
    err = check_error(r, 400)
    if param is not None:
        assert err["param"] == param, err


# --------------------------------------------------------------- metrics

FAMILIES = {
    "inferd:num_requests_running": "gauge", "inferd:num_requests_waiting": "gauge",
    "inferd:kv_cache_usage_perc": "gauge", "inferd:kv_cache_blocks": "gauge",
    "inferd:prompt_tokens_total": "counter", "inferd:generation_tokens_total": "counter",
    "inferd:request_success_total": "counter", "inferd:num_preemptions_total": "counter",
    "inferd:prefix_cache_queries_total": "counter", "inferd:prefix_cache_hits_total": "counter",
    "inferd:time_to_first_token_seconds": "histogram",
    "inferd:inter_token_latency_seconds": "histogram",
    "inferd:e2e_request_latency_seconds": "histogram",
    "inferd:request_queue_time_seconds": "histogram",
    "inferd:http_requests_total": "counter", "inferd:http_connections_open": "gauge",
}


def _family(name):
    for suf in ("_bucket", "_sum", "_count"):
        if name.endswith(suf) and name[:-len(suf)] in FAMILIES:
            return name[:-len(suf)]
    return name


def test_metrics_format_and_names(tiny):
    tiny.post("/v1/completions", {"model": "tiny", "prompt": "warm up", "max_tokens": 4,
                                  "ignore_eos": True})
    r = tiny.get("/metrics")
    assert r.status_code == 200
    ct = r.headers["content-type"].replace(" ", "")
    assert ct.startswith("text/plain") and "version=0.0.4" in ct, ct
    m = check_metrics_text(r.text)
    for fam, typ in FAMILIES.items():
        assert fam in m.types, f"no # TYPE for {fam}"
        assert m.types[fam] == typ, (fam, m.types[fam])
        assert fam in m.helps, f"no # HELP for {fam}"
    for name, labels, _ in m.samples:
        if name.startswith("inferd:") and not name.startswith(("inferd:http_",)):
            assert labels.get("model_name") == "tiny", (name, labels)
    states = {lb.get("state") for lb, _ in m.find("inferd:kv_cache_blocks")}
    assert {"used", "cached", "free"} <= states
    assert m.value("inferd:kv_cache_blocks", state="used") == 0
    assert m.value("inferd:num_requests_running") == 0
    assert 0 <= m.value("inferd:kv_cache_usage_perc") <= 1
    assert m.value("inferd:time_to_first_token_seconds_count") >= 1
    assert m.value("inferd:http_connections_open") >= 1  # this one


def check_metrics_text(text):
    from inferd_serve_harness import parse_prometheus
    return parse_prometheus(text)


def test_metrics_count_requests(tiny):
    before = tiny.metrics()
    r = tiny.post("/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 5,
                                      "ignore_eos": True})
    u = r.json()["usage"]
    r = tiny.post("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0})
    assert r.status_code == 400
    after = tiny.metrics()

    def d(name, **lb):
        return after.value(name, **lb) - before.value(name, **lb)
    assert d("inferd:generation_tokens_total") == 5
    assert d("inferd:prompt_tokens_total") == u["prompt_tokens"]
    assert d("inferd:request_success_total", finished_reason="length") == 1
    assert d("inferd:e2e_request_latency_seconds_count") == 1
    assert d("inferd:time_to_first_token_seconds_count") == 1
    assert d("inferd:inter_token_latency_seconds_count") >= 1
    assert d("inferd:request_queue_time_seconds_count") == 1
    assert d("inferd:http_requests_total", status="200") >= 1  # the completion
    assert d("inferd:http_requests_total", status="400") == 1


# ------------------------------------------------------------------ auth

@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    (d / "keys.txt").write_text("# a comment\nkey-from-file\n\n")
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--api-key-file", d / "keys.txt",
                     name="tiny", keys=["sk-first", "sk-second"])
    yield s
    s.stop()


PROTECTED = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None),
             ("POST", "/v1/chat/completions",
              {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
             ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}),
             ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [97]}),
             ("GET", "/metrics", None)]


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_auth_required(keyed, method, path, body):
    for key in (None, "wrong", "sk-firstx", "sk-firs", "Sk-first"):
        with keyed.http() as c:
            r = c.request(method, path, json=body, headers=keyed.headers(key))
        err = check_error(r, 401, code="invalid_api_key")
        assert err["param"] is None
    for auth in ("sk-first", "Basic sk-first", "Bearer", "Bearer ", "Bearer sk-first ",
                 "Bearer sk-first\tx", "Bearer sk-firstsk-first"):
        c = RawConn(keyed, timeout=30)
        try:  # raw, as clients do not send such headers
            c.send(http_request(method, path, body, headers={"Authorization": auth}))
            r = c.read_response()
        finally:
            c.close()
        if auth == "Bearer sk-first ":
            # trailing whitespace is not part of a field value (RFC 9110)
            assert r.status_code in (200, 401), r.status_code
            continue
        check_error(r, 401, code="invalid_api_key")
    for key in ("sk-first", "sk-second", "key-from-file"):
        with keyed.http() as c:
            r = c.request(method, path, json=body, headers=keyed.headers(key))
        assert r.status_code == 200, (key, r.status_code, r.text[:300])


def test_health_and_ready_need_no_key(keyed):
    assert keyed.get("/health", key=None).status_code == 200
    assert keyed.get("/ready", key=None).status_code == 200


def test_openai_client_with_keys(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        keyed.openai(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    c = keyed.openai(key="key-from-file")
    assert c.completions.create(model="tiny", prompt="x", max_tokens=1).choices


# ------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    s = start_server(tmp_path_factory, TINY, *tiny_args(), name="tiny", tls=(cert, key))
    yield s
    s.stop()


def test_tls_openai_client(tls):
    assert tls.url.startswith("https://")
    c = tls.openai()
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    chunks = list(c.completions.create(model="tiny", prompt="hi", max_tokens=3, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert check_response("GET", "/health", tls.get("/health")) == {"status": "ok"}


def test_tls_curl_stream(tls):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, "ignore_eos": True, "stream": True})
    p = subprocess.run(["curl", "-sN", "--max-time", "60", "--cacert", str(tls.tls[0]),
                        "-H", "Content-Type: application/json", "-d", body,
                        tls.url + "/v1/chat/completions"], capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr
    texts, finish, _, _ = check_chat_stream(p.stdout)
    assert finish == {0: "length"}


def test_tls_refuses_plain_http_and_keeps_serving(tls):
    import socket
    s = socket.create_connection((tls.host, tls.port), timeout=10)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError, OSError):
            pass
        assert b"\"status\":\"ok\"" not in data.replace(b" ", b"")
    finally:
        s.close()
    # a TLS client that goes away mid-handshake
    s = socket.create_connection((tls.host, tls.port), timeout=10)
    s.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")
    s.close()
    assert tls.get("/health").status_code == 200


# ------------------------------------------------- request chat templates

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def test_request_chat_template_needs_the_operator(tiny):
    """Without --trust-request-chat-template a template sent in the request
    is never rendered: it is refused (400 naming chat_template) or ignored."""
    msgs = [{"role": "user", "content": "hi"}]
    normal = tiny.post("/tokenize", {"messages": msgs}).json()["count"]
    r = tiny.post("/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 1,
                                           "chat_template": TEMPLATE})
    if r.status_code == 400:
        assert check_error(r, 400)["param"] == "chat_template"
    else:
        assert r.status_code == 200
        assert check_response("POST", "/v1/chat/completions", r)["usage"]["prompt_tokens"] == \
            normal


def test_request_chat_template_when_trusted(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--trust-request-chat-template")
    try:
        msgs = [{"role": "user", "content": "hi"}]
        want = len(s.tokenize("[user] hi\n"))
        r = s.post("/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 1,
                                            "chat_template": TEMPLATE})
        assert check_response("POST", "/v1/chat/completions", r)["usage"]["prompt_tokens"] == \
            want
        # a broken template is the request's error, not the daemon's
        r = s.post("/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 1,
                                            "chat_template": "{% for m in messages %}"})
        check_error(r, 400, param="chat_template")
        assert s.get("/health").status_code == 200
    finally:
        assert s.stop() == 0


def test_max_model_len_flag(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--max-model-len", "128")
    try:
        m = check_response("GET", "/v1/models", s.get("/v1/models"))
        assert m["data"][0]["max_model_len"] == 128
        assert s.post("/tokenize", {"prompt": "x"}).json()["max_model_len"] == 128
        r = s.post("/v1/completions", {"model": "tiny", "prompt": [97] * 129, "max_tokens": 1})
        err = check_error(r, 400, code="context_length_exceeded")
        assert "128" in err["message"] and "129" in err["message"], err
        r = s.post("/v1/chat/completions", {"model": "tiny", "ignore_eos": True,
                                            "messages": [{"role": "user", "content": "x"}]})
        u = check_response("POST", "/v1/chat/completions", r)["usage"]
        assert u["prompt_tokens"] + u["completion_tokens"] == 128
    finally:
        assert s.stop() == 0
