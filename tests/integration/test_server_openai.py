"""`inferd serve` through the official openai client (sync and async) and
plain HTTP: the OpenAI shapes of chat.completion, chat.completion.chunk and
text_completion, n > 1, logprobs, stop, seeds, usage, and stream == no
stream. Every body is validated against proto/openapi.yaml.

The tiny fixture model has random weights: its text is noise, but it is the
same noise every time, which is what these tests need."""
import asyncio

import pytest

from inferd_serve_harness import (TINY, TINY_CTX, check_chat_stream, check_completion_stream,
                                  check_response, check_schema)

MSGS = [{"role": "user", "content": "hello there"}]


def chat(tiny, **kw):
    body = {"model": "tiny", "messages": MSGS}
    body.update(kw)
    r = tiny.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return check_response("POST", "/v1/chat/completions", r)


def cmpl(tiny, **kw):
    body = {"model": "tiny", "prompt": "hello there"}
    body.update(kw)
    r = tiny.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return check_response("POST", "/v1/completions", r)


def chat_stream(tiny, n=1, include_usage=False, **kw):
    body = {"model": "tiny", "messages": MSGS, "stream": True, "n": n}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(kw)
    r, raw = tiny.stream("/v1/chat/completions", body)
    assert r.status_code == 200, raw[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    return check_chat_stream(raw, n=n, include_usage=include_usage,
                             logprobs=bool(kw.get("logprobs")))


def cmpl_stream(tiny, count=1, include_usage=False, **kw):
    body = {"model": "tiny", "prompt": "hello there", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(kw)
    r, raw = tiny.stream("/v1/completions", body)
    assert r.status_code == 200, raw[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    return check_completion_stream(raw, count=count, include_usage=include_usage)


def check_usage(u, completion_tokens=None):
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 0 <= u["prompt_tokens_details"]["cached_tokens"] <= u["prompt_tokens"]
    if completion_tokens is not None:
        assert u["completion_tokens"] == completion_tokens


# ----------------------------------------------------------------- models

def test_models_list_and_retrieve(tiny_any):
    tiny = tiny_any
    r = tiny.get("/v1/models")
    body = check_response("GET", "/v1/models", r)
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["max_model_len"] == TINY_CTX
    r = tiny.get("/v1/models/tiny")
    assert check_response("GET", "/v1/models/{model}", r) == body["data"][0]
    client = tiny.openai()
    assert [m.id for m in client.models.list()] == ["tiny"]
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "inferd"
    r = tiny.get("/v1/models/nope")
    assert r.status_code == 404
    assert check_response("GET", "/v1/models/{model}", r)["error"]["code"] == "model_not_found"


# ------------------------------------------------------------ the client

def test_chat_with_openai_client(tiny_any):
    tiny = tiny_any
    client = tiny.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=8, extra_body={"ignore_eos": True})
    assert raw.http_response.status_code == 200
    body = check_response("POST", "/v1/chat/completions", raw.http_response)
    c = raw.parse()
    assert c.object == "chat.completion" and c.model == "tiny"
    assert c.id == body["id"] and c.id.startswith("chatcmpl-")
    assert len(c.choices) == 1 and c.choices[0].index == 0
    assert c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str)
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 8
    assert c.usage.prompt_tokens_details.cached_tokens >= 0
    check_usage(body["usage"], 8)
    assert raw.headers.get("x-request-id")


def test_completions_with_openai_client(tiny_any):
    tiny = tiny_any
    client = tiny.openai()
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    body = check_response("POST", "/v1/completions", raw.http_response)
    c = raw.parse()
    assert c.object == "text_completion" and c.id.startswith("cmpl-")
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    assert c.choices[0].text == body["choices"][0]["text"]
    check_usage(body["usage"], 5)


def test_completions_default_max_tokens_is_16(tiny_any):
    tiny = tiny_any
    body = cmpl(tiny, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_default_max_tokens_is_the_rest_of_the_context(tiny_any):
    tiny = tiny_any
    body = chat(tiny, ignore_eos=True)
    u = body["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] == TINY_CTX, u
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_completion_tokens_supersedes_max_tokens(tiny_any):
    tiny = tiny_any
    body = chat(tiny, ignore_eos=True, max_tokens=9, max_completion_tokens=3)
    assert body["usage"]["completion_tokens"] == 3


def test_chat_stream_with_openai_client(tiny_any):
    tiny = tiny_any
    client = tiny.openai()
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat(tiny, max_tokens=6, ignore_eos=True,
                        temperature=0)["choices"][0]["message"]["content"]


def test_completions_stream_with_openai_client(tiny_any):
    tiny = tiny_any
    client = tiny.openai()
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=6,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == cmpl(tiny, max_tokens=6, ignore_eos=True, temperature=0)["choices"][0]["text"]


def test_async_client_concurrent_requests(tiny_any):
    tiny = tiny_any
    async def main():
        client = tiny.async_openai()
        try:
            async def one(i):
                return await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"number {i}"}],
                    max_tokens=4, extra_body={"ignore_eos": True})

            async def one_stream(i):
                s = await client.completions.create(model="tiny", prompt=f"number {i}",
                                                    max_tokens=4, stream=True,
                                                    extra_body={"ignore_eos": True})
                return [c async for c in s]

            return await asyncio.wait_for(asyncio.gather(
                *[one(i) for i in range(6)], *[one_stream(i) for i in range(6)]), 120)
        finally:
            await client.close()

    out = asyncio.run(main())
    for c in out[:6]:
        assert c.usage.completion_tokens == 4
    for chunks in out[6:]:
        assert chunks[-1].choices[0].finish_reason == "length"


# ---------------------------------------------------------- stream shape

def test_chat_stream_framing_and_shape(tiny_any):
    tiny = tiny_any
    texts, finish, usage, events = chat_stream(tiny, max_tokens=10, ignore_eos=True)
    assert usage is None and finish == {0: "length"}
    # without include_usage no chunk has choices == []
    assert all(ev["choices"] for ev in events)


def test_include_usage_chunk(tiny_any):
    tiny = tiny_any
    texts, finish, usage, events = chat_stream(tiny, include_usage=True, max_tokens=7,
                                               ignore_eos=True)
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == 7
    check_usage(usage, 7)
    want = chat(tiny, max_tokens=7, ignore_eos=True)["usage"]
    assert usage["prompt_tokens"] == want["prompt_tokens"]
    texts, finish, usage, _ = cmpl_stream(tiny, include_usage=True, max_tokens=5,
                                          ignore_eos=True)
    check_usage(usage, 5)
    # include_usage false is the same as absent
    _, _, usage, _ = cmpl_stream(tiny, stream_options={"include_usage": False}, max_tokens=3)
    assert usage is None


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stream_equals_non_stream_greedy(tiny_any, route):
    tiny = tiny_any
    kw = dict(max_tokens=40, ignore_eos=True, temperature=0)
    if route == "chat":
        texts, finish, _, _ = chat_stream(tiny, **kw)
        body = chat(tiny, **kw)
        assert texts[0] == body["choices"][0]["message"]["content"]
    else:
        texts, finish, _, _ = cmpl_stream(tiny, **kw)
        body = cmpl(tiny, **kw)
        assert texts[0] == body["choices"][0]["text"]
    assert finish[0] == body["choices"][0]["finish_reason"] == "length"


# -------------------------------------------------------------------- n

def test_chat_n_choices(tiny_any):
    tiny = tiny_any
    body = chat(tiny, n=3, max_tokens=6, ignore_eos=True, temperature=1, seed=11)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 18
    texts, finish, usage, _ = chat_stream(tiny, n=3, include_usage=True, max_tokens=6,
                                          ignore_eos=True, temperature=1, seed=11)
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage["completion_tokens"] == 18
    # the same seed gives the same choices, streamed or not
    assert [texts[i] for i in range(3)] == \
        [c["message"]["content"] for c in sorted(body["choices"], key=lambda c: c["index"])]


def test_completions_prompt_forms_and_indices(tiny_any):
    tiny = tiny_any
    ids = tiny.tokenize("hello there")
    single = cmpl(tiny, prompt="hello there", max_tokens=4, ignore_eos=True, temperature=0)
    assert single["usage"]["prompt_tokens"] == len(ids)
    by_ids = cmpl(tiny, prompt=ids, max_tokens=4, ignore_eos=True, temperature=0)
    assert by_ids["choices"][0]["text"] == single["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    # two prompts x n=2: choice index = prompt_index * n + i
    many = cmpl(tiny, prompt=["hello there", "other words"], n=2, max_tokens=4,
                ignore_eos=True, temperature=0)
    assert sorted(c["index"] for c in many["choices"]) == [0, 1, 2, 3]
    by_index = {c["index"]: c["text"] for c in many["choices"]}
    assert by_index[0] == by_index[1] == single["choices"][0]["text"]  # greedy
    other = cmpl(tiny, prompt="other words", max_tokens=4, ignore_eos=True, temperature=0)
    assert by_index[2] == by_index[3] == other["choices"][0]["text"]
    assert many["usage"]["completion_tokens"] == 16
    lists = cmpl(tiny, prompt=[ids, tiny.tokenize("other words")], max_tokens=4,
                 ignore_eos=True, temperature=0)
    assert {c["index"]: c["text"] for c in lists["choices"]} == \
        {0: by_index[0], 1: by_index[2]}
    texts, finish, usage, _ = cmpl_stream(tiny, count=4, include_usage=True,
                                          prompt=["hello there", "other words"], n=2,
                                          max_tokens=4, ignore_eos=True, temperature=0)
    assert texts == by_index and usage["completion_tokens"] == 16


# ------------------------------------------------------------- logprobs

def _check_chat_logprob_entries(entries, k, greedy):
    for e in entries:
        assert len(e["top_logprobs"]) == k, e
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True), "top_logprobs not most likely first"
        if greedy and k:
            assert e["logprob"] == pytest.approx(lps[0], abs=1e-4)
            assert e["token"] == e["top_logprobs"][0]["token"]
        for t in [e] + e["top_logprobs"]:
            if t["bytes"] is not None:
                try:
                    assert bytes(t["bytes"]).decode("utf-8") == t["token"], t
                except UnicodeDecodeError:
                    pass  # part of a character: the token string cannot show it


def test_chat_logprobs(tiny_any):
    tiny = tiny_any
    body = chat(tiny, max_tokens=8, ignore_eos=True, temperature=0, logprobs=True,
                top_logprobs=3)
    ch = body["choices"][0]
    entries = ch["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"] == 8
    assert ch["logprobs"].get("refusal") is None
    _check_chat_logprob_entries(entries, 3, greedy=True)
    joined = b"".join(bytes(e["bytes"]) for e in entries)
    if joined.decode("utf-8", "replace") == joined.decode("utf-8", "ignore"):
        assert joined.decode() == ch["message"]["content"]
    # logprobs without top_logprobs: the sampled tokens only
    body = chat(tiny, max_tokens=4, ignore_eos=True, logprobs=True)
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == 4 and all(e["top_logprobs"] == [] for e in entries)
    # and none asked: null
    assert chat(tiny, max_tokens=2)["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed(tiny_any):
    tiny = tiny_any
    texts, _, _, events = chat_stream(tiny, max_tokens=8, ignore_eos=True, temperature=0,
                                      logprobs=True, top_logprobs=2)
    entries = [e for ev in events for ch in ev["choices"]
               if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert len(entries) == 8
    _check_chat_logprob_entries(entries, 2, greedy=True)
    full = chat(tiny, max_tokens=8, ignore_eos=True, temperature=0, logprobs=True,
                top_logprobs=2)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == [e["token"] for e in full]


def test_completions_logprobs(tiny_any):
    tiny = tiny_any
    body = cmpl(tiny, max_tokens=6, ignore_eos=True, temperature=0, logprobs=2)
    ch = body["choices"][0]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == \
        len(lp["text_offset"]) == 6
    for tok, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 2
        assert p == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the best one
    if "\ufffd" not in "".join(lp["tokens"]):
        assert "".join(lp["tokens"]) == ch["text"]
        offs = [0]
        for t in lp["tokens"][:-1]:
            offs.append(offs[-1] + len(t))
        assert lp["text_offset"] == offs
    # logprobs=0: the sampled token's only
    lp = cmpl(tiny, max_tokens=3, ignore_eos=True, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(t is None or len(t) <= 1 for t in lp["top_logprobs"])


def test_completions_echo(tiny_any):
    tiny = tiny_any
    body = cmpl(tiny, prompt="hello there", max_tokens=4, ignore_eos=True, temperature=0, echo=True)
    plain = cmpl(tiny, prompt="hello there", max_tokens=4, ignore_eos=True, temperature=0)
    assert body["choices"][0]["text"] == "hello there" + plain["choices"][0]["text"]
    r = tiny.post("/v1/completions", {"model": "tiny", "prompt": "hello there", "max_tokens": 3,
                                      "ignore_eos": True, "temperature": 0, "echo": True,
                                      "logprobs": 1})
    if r.status_code == 400:
        # prompt logprobs may be unsupported, if said so clearly
        err = check_response("POST", "/v1/completions", r)["error"]
        assert err["param"] in ("echo", "logprobs") and "unsupported" in err["code"], err
        return
    body = check_response("POST", "/v1/completions", r)
    lp = body["choices"][0]["logprobs"]
    n_prompt = body["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None  # nothing predicts the first prompt token
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


# ------------------------------------------------------- stop and seeds

@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stop_strings(tiny_any, route):
    tiny = tiny_any
    def gen(**kw):
        if route == "chat":
            b = chat(tiny, max_tokens=32, ignore_eos=True, temperature=0, **kw)
            return b["choices"][0]["message"]["content"], b["choices"][0]["finish_reason"]
        b = cmpl(tiny, max_tokens=32, ignore_eos=True, temperature=0, **kw)
        return b["choices"][0]["text"], b["choices"][0]["finish_reason"]

    full, why = gen()
    assert why == "length"
    cut = full[len(full) // 2:len(full) // 2 + 2]
    assert len(full) >= 8 and cut.strip(), f"too little text to cut a stop string from: {full!r}"
    want = full[:full.index(cut)]
    text, why = gen(stop=cut)
    assert (text, why) == (want, "stop")
    text, why = gen(stop=["\u00a7never\u00a7", cut, "nor this \u2603"])
    assert (text, why) == (want, "stop")
    # streamed: the stop string is held back, never sent
    if route == "chat":
        texts, finish, _, _ = chat_stream(tiny, max_tokens=32, ignore_eos=True, temperature=0, stop=[cut])
    else:
        texts, finish, _, _ = cmpl_stream(tiny, max_tokens=32, ignore_eos=True, temperature=0, stop=cut)
    assert (texts[0], finish[0]) == (want, "stop")


def test_seeded_sampling_is_reproducible(tiny_any):
    tiny = tiny_any
    def gen(seed):
        return cmpl(tiny, max_tokens=16, ignore_eos=True, temperature=1.0,
                    seed=seed)["choices"][0]["text"]
    a, b = gen(1234), gen(1234)
    assert a == b
    assert len({gen(s) for s in (1, 2, 3)}) > 1
    client = tiny.openai()
    outs = [client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12,
                                           temperature=1, seed=99,
                                           extra_body={"ignore_eos": True})
            .choices[0].message.content for _ in range(2)]
    assert outs[0] == outs[1]


def test_logit_bias_forces_a_token(tiny_any):
    tiny = tiny_any
    (tid,) = tiny.tokenize("x")
    body = cmpl(tiny, max_tokens=5, ignore_eos=True, logit_bias={str(tid): 100})
    assert body["choices"][0]["text"] == "xxxxx"
    body = chat(tiny, max_tokens=5, ignore_eos=True, logit_bias={str(tid): 100},
                temperature=1, seed=5)
    assert body["choices"][0]["message"]["content"] == "xxxxx"


def test_stop_token_ids(tiny_any):
    tiny = tiny_any
    (tid,) = tiny.tokenize("x")
    bias = {str(tid): 100}  # so the first token is "x"
    body = cmpl(tiny, max_tokens=8, ignore_eos=True, logit_bias=bias)
    assert body["choices"][0]["finish_reason"] == "length"
    body = cmpl(tiny, max_tokens=8, ignore_eos=True, logit_bias=bias,
                stop_token_ids=[tid, 3, 4])
    assert body["usage"]["completion_tokens"] <= 1
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "x" not in body["choices"][0]["text"]


def test_sampling_extensions_accepted(tiny_any):
    tiny = tiny_any
    body = cmpl(tiny, max_tokens=4, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=20,
                min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                frequency_penalty=0.5, seed=3, user="someone", skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == 4


def test_unknown_fields_are_ignored(tiny_any):
    tiny = tiny_any
    body = chat(tiny, max_tokens=2, ignore_eos=True, some_vendor_field={"x": [1, 2]},
                parallel_tool_calls=False, metadata={"a": "b"})
    assert body["usage"]["completion_tokens"] == 2


def test_usage_counts_the_templated_prompt(tiny_any):
    tiny = tiny_any
    r = tiny.post("/tokenize", {"messages": MSGS})
    n = check_response("POST", "/tokenize", r)["count"]
    assert chat(tiny, max_tokens=1)["usage"]["prompt_tokens"] == n


def test_prefix_cache_reports_cached_tokens(tiny_any):
    tiny = tiny_any
    prompt = "a shared prefix that spans several blocks of sixteen tokens " * 3
    cmpl(tiny, prompt=prompt, max_tokens=1)
    body = cmpl(tiny, prompt=prompt, max_tokens=1)
    u = body["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] >= 16, u
    check_usage(u)


def test_multibyte_text_in_messages(tiny_any):
    tiny = tiny_any
    msgs = [{"role": "system", "content": "Réponds en français ☃ 日本語 🎉"},
            {"role": "user", "content": "\"quotes\" \\ backslash \n newline \t tab \u0001"}]
    body = chat(tiny, messages=msgs, max_tokens=3, ignore_eos=True)
    r = tiny.post("/tokenize", {"messages": msgs})
    assert body["usage"]["prompt_tokens"] == r.json()["count"]
    check_schema("ChatCompletion", body)
