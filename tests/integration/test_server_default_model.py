"""The default model (Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M) behind
`inferd serve`: a real answer through the openai client with the model's
own chat template, and 64 concurrent streaming clients that all get a
complete, well-formed stream."""
import asyncio
import json
import time

import httpx

from inferd_serve_harness import (check_chat_stream, check_response, needs_default_model)

pytestmark = needs_default_model


def test_capital_of_france(big):
    client = big.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="qwen", temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France? "
                                              "Answer in one word."}])
    body = check_response("POST", "/v1/chat/completions", raw.http_response)
    c = raw.parse()
    assert "Paris" in c.choices[0].message.content, c.choices[0].message.content
    assert c.choices[0].finish_reason == "stop"
    assert body["usage"]["completion_tokens"] < 16
    # streamed, the same words
    stream = client.chat.completions.create(
        model="qwen", temperature=0, max_tokens=16, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France? "
                                              "Answer in one word."}])
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == c.choices[0].message.content


def test_64_concurrent_streams(big):
    """64 clients at once, ~8 tokens each: every stream is complete (role
    chunk, content, finish chunk, usage, [DONE]) and valid against the
    schema, and afterwards nothing is left running or holding KV blocks."""
    N, TOKENS = 64, 8
    system = "You are a terse assistant. Reply with a short list of numbers."

    async def one(client, i):
        body = {"model": "qwen", "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Numbers after {i}?"}]}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            raw = await r.aread()
        texts, finish, usage, _ = check_chat_stream(raw, include_usage=True)
        assert finish == {0: "length"} and usage["completion_tokens"] == TOKENS
        assert texts[0]
        return usage

    async def main():
        limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
        async with httpx.AsyncClient(base_url=big.url, timeout=150, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*[one(client, i) for i in range(N)]), 170)

    t0 = time.monotonic()
    usages = asyncio.run(main())
    took = time.monotonic() - t0
    assert len(usages) == N
    # the shared system prompt was computed once and reused
    assert sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages) > 0
    m = big.metrics()
    assert m.value("inferd:num_requests_running") == 0
    assert m.value("inferd:kv_cache_blocks", state="used") == 0
    print(f"64 streams of {TOKENS} tokens in {took:.1f} s; "
          f"{json.dumps(usages[0])}")
