"""Every bad request gets a 4xx in OpenAI's error shape that names what was
wrong: {"error": {"message", "type": "invalid_request_error", "param": <the
field>, "code"}}; the openai client turns them into its exceptions; and the
daemon keeps serving afterwards."""
import openai
import pytest

from inferd_serve_harness import TINY_CTX, check_error, check_response

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CMPL = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

# (field, bad value) pairs, valid for both routes; param must name the field
COMMON = [
    ("n", 0), ("n", 17), ("n", "2"), ("n", 1.5), ("n", -1),
    ("temperature", -0.5), ("temperature", 2.5), ("temperature", "hot"),
    ("top_p", 1.5), ("top_p", -0.1), ("top_p", "x"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", "ten"), ("max_tokens", 1.5),
    ("max_tokens", 100000),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", 7), ("stop", [1, 2]),
    ("seed", "abc"), ("seed", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -3),
    ("frequency_penalty", 3), ("frequency_penalty", "x"),
    ("logit_bias", {"1": 101}), ("logit_bias", {"1": -101}), ("logit_bias", {"abc": 1}),
    ("logit_bias", {"1": "x"}), ("logit_bias", [1, 2]), ("logit_bias", {"99999999": 1}),
    ("stream", "yes"), ("stream", 1),
    ("stream_options", "x"),
    ("user", 5),
    ("top_k", "x"), ("top_k", 1.5),
    ("min_p", 2), ("min_p", -0.1),
    ("repetition_penalty", 0), ("repetition_penalty", -1),
    ("ignore_eos", "yes"),
    ("stop_token_ids", "x"), ("stop_token_ids", [-1]), ("stop_token_ids", list(range(129))),
    ("skip_special_tokens", 3),
    ("model", 5),
]
CHAT_ONLY = [
    ("messages", []), ("messages", "hi"), ("messages", [{"role": "bogus", "content": "x"}]),
    ("messages", [{"content": "no role"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [5]),
    ("logprobs", "yes"), ("logprobs", 3),
    ("top_logprobs", 21), ("top_logprobs", -1), ("top_logprobs", "x"),
    ("max_completion_tokens", 0), ("max_completion_tokens", "x"),
    ("max_completion_tokens", 100000),
]
CMPL_ONLY = [
    ("prompt", 5), ("prompt", []), ("prompt", [1, "a"]), ("prompt", [[]]), ("prompt", {"a": 1}),
    ("prompt", [99999]), ("prompt", [-1]), ("prompt", [[1, 2], [99999]]),
    ("logprobs", 6), ("logprobs", -1), ("logprobs", "x"), ("logprobs", True),
    ("echo", "yes"),
]


def names(err, field):
    """param names the field: `n`, or a part of it as OpenAI writes it
    (`messages[0].role`, `prompt[1]`)."""
    p = err["param"]
    assert p == field or (isinstance(p, str) and p.startswith((field + "[", field + "."))), \
        f"param {p!r} does not name {field!r}: {err}"


def _ids(cases):
    return [f"{f}={v!r}"[:40] for f, v in cases]


@pytest.mark.parametrize("field,value", COMMON + CHAT_ONLY, ids=_ids(COMMON + CHAT_ONLY))
def test_chat_bad_field(tiny_any, field, value):
    body = dict(CHAT, **{field: value})
    r = tiny_any.post("/v1/chat/completions", body)
    check_response("POST", "/v1/chat/completions", r)
    names(check_error(r, 400), field)


@pytest.mark.parametrize("field,value", COMMON + CMPL_ONLY, ids=_ids(COMMON + CMPL_ONLY))
def test_completions_bad_field(tiny_any, field, value):
    body = dict(CMPL, **{field: value})
    r = tiny_any.post("/v1/completions", body)
    check_response("POST", "/v1/completions", r)
    names(check_error(r, 400), field)


@pytest.mark.parametrize("route,field", [("/v1/chat/completions", "messages"),
                                         ("/v1/completions", "prompt")])
def test_missing_required_field(tiny_any, route, field):
    body = dict(CHAT if "chat" in route else CMPL)
    del body[field]
    check_error(tiny_any.post(route, body), 400, param=field)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("content", [b"{", b"", b"[]", b"null", b"\"x\"", b"{\"a\":1}garbage",
                                     b"\xff\xfe{}", b"{\"model\":\"tiny\",\"model\":\"tiny\"}",
                                     b"[" * 100000])
def test_bad_json(tiny_any, route, content):
    r = tiny_any.post(route, content=content)
    check_error(r, 400)
    assert tiny_any.get("/health").status_code == 200


def test_bad_field_while_streaming_is_a_json_error(tiny_any):
    r = tiny_any.post("/v1/chat/completions", dict(CHAT, stream=True, n=99))
    assert r.headers["content-type"].startswith("application/json")
    check_error(r, 400, param="n")


@pytest.mark.parametrize("route,base", [("/v1/chat/completions", CHAT), ("/v1/completions", CMPL)])
def test_unknown_model_is_404(tiny_any, route, base):
    r = tiny_any.post(route, dict(base, model="gpt-4o"))
    check_response("POST", route, r)
    check_error(r, 404, code="model_not_found")


def test_context_length_exceeded(tiny_any):
    long_text = "a b " * 300  # 900 tokens with the fixture's tokenizer
    n = tiny_any.post("/tokenize", {"prompt": long_text}).json()["count"]
    assert n > TINY_CTX
    r = tiny_any.post("/v1/completions", dict(CMPL, prompt=long_text))
    err = check_error(r, 400, code="context_length_exceeded")
    assert str(TINY_CTX) in err["message"] and str(n) in err["message"], err["message"]
    r = tiny_any.post("/v1/chat/completions",
                  dict(CHAT, messages=[{"role": "user", "content": long_text}]))
    err = check_error(r, 400, code="context_length_exceeded")
    assert str(TINY_CTX) in err["message"], err["message"]
    assert err["param"] in ("messages", None)
    # token ids too
    r = tiny_any.post("/v1/completions", dict(CMPL, prompt=[97] * (TINY_CTX + 1)))
    check_error(r, 400, code="context_length_exceeded")


def test_max_tokens_over_the_remaining_context(tiny_any):
    n = tiny_any.post("/tokenize", {"prompt": "hi"}).json()["count"]
    ok = tiny_any.post("/v1/completions", dict(CMPL, max_tokens=TINY_CTX - n, ignore_eos=True))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == TINY_CTX - n
    r = tiny_any.post("/v1/completions", dict(CMPL, max_tokens=TINY_CTX - n + 1))
    check_error(r, 400, param="max_tokens")


def test_unknown_route_and_method(tiny_any):
    r = tiny_any.get("/v1/nothing")
    check_error(r, 404, type_=None)
    r = tiny_any.get("/v1/chat/completions")
    assert r.status_code in (404, 405), r.status_code
    check_error(r, r.status_code, type_=None)


def test_openai_client_raises_typed_errors(tiny_any):
    client = tiny_any.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       n=50)
    assert e.value.status_code == 400 and e.value.param == "n"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a b " * 300)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    # still serving
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_many_bad_requests_leave_nothing_behind(tiny_any):
    for i in range(30):
        tiny_any.post("/v1/chat/completions", dict(CHAT, temperature=-i - 1))
    m = tiny_any.metrics()
    assert m.value("inferd:num_requests_running") == 0
    assert m.value("inferd:num_requests_waiting") == 0
