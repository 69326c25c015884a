"""proto/openapi.yaml itself: a valid OpenAPI 3.1 document whose schemas are
valid JSON Schema, describing every route of `inferd serve`, and whose
schemas reject what OpenAI's shapes forbid (so that validating against them
means something)."""
import pytest

from inferd_serve_harness import SPEC, check_schema

ROUTES = {
    "/health": {"get"}, "/ready": {"get"}, "/metrics": {"get"},
    "/v1/models": {"get"}, "/v1/models/{model}": {"get"},
    "/v1/chat/completions": {"post"}, "/v1/completions": {"post"},
    "/tokenize": {"post"}, "/detokenize": {"post"},
}


def test_openapi_document_is_valid():
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    assert SPEC["openapi"].startswith("3.1")
    validate(SPEC)
    for name, schema in SPEC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)


def test_every_route_is_described():
    got = {p: {m for m in ops if m in ("get", "post", "put", "delete", "patch")}
           for p, ops in SPEC["paths"].items()}
    assert got == ROUTES


def test_schemas_accept_openai_examples():
    """The examples of openai-wire.md section 3 pass."""
    check_schema("ChatCompletion", {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1735142223,
        "model": "m", "system_fingerprint": None, "service_tier": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!",
                                             "refusal": None, "tool_calls": [],
                                             "annotations": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}}})
    check_schema("ChatCompletionChunk", {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1726294381,
        "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}],
        "usage": None})
    check_schema("ChatCompletionChunk", {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1726294381,
        "model": "m", "choices": [],
        "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 0}}})
    check_schema("ChatLogprobs", {"content": [
        {"token": "Hel", "logprob": -0.31, "bytes": [72, 101, 108],
         "top_logprobs": [{"token": "Hel", "logprob": -0.31, "bytes": [72, 101, 108]},
                          {"token": "Hi", "logprob": -1.7, "bytes": [72, 105]}]}],
        "refusal": None})
    check_schema("CompletionLogprobs", {
        "tokens": [" wor", "ld"], "token_logprobs": [-0.2, -0.01],
        "top_logprobs": [{" wor": -0.2, " world": -1.9}, {"ld": -0.01}],
        "text_offset": [5, 9]})
    check_schema("ErrorResponse", {"error": {"message": "x", "type": "invalid_request_error",
                                             "param": "n", "code": None}})


@pytest.mark.parametrize("name,body", [
    ("ErrorResponse", {"error": {"message": "x", "type": "t", "param": None}}),  # no code
    ("ErrorResponse", {"object": "error", "message": "x", "type": "t", "param": None,
                       "code": 400}),                                          # flat (SGLang)
    ("ErrorResponse", {"error": "x", "error_type": "t"}),                        # TGI
    ("ChatCompletionChunk", {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                             "created": 1726294381, "model": "m",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": None}]}),
    ("ChatCompletion", {"id": "chatcmpl-1", "object": "chat.completion", "created": 1726294381,
                        "model": "m", "choices": [{"index": 0, "message": {
                            "role": "assistant", "content": "x"}, "logprobs": None,
                            "finish_reason": "eos"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                  "total_tokens": 2,
                                  "prompt_tokens_details": {"cached_tokens": 0}}}),
    ("Completion", {"id": "cmpl-1", "object": "text_completion", "created": 1726294381,
                    "model": "m", "choices": [{"index": 0, "text": "x", "logprobs": None,
                                               "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                              "total_tokens": 2}}),                   # no prompt_tokens_details
    ("CompletionLogprobs", {"tokens": ["a"], "token_logprobs": [-1],
                            "top_logprobs": [[{"token": "a", "logprob": -1}]],
                            "text_offset": [0]}),
])
def test_schemas_reject_wrong_shapes(name, body):
    with pytest.raises(AssertionError):
        check_schema(name, body)
