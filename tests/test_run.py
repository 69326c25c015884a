"""`inferd run`: text in, text out, through the model's tokenizer, the
sampler, the stop-string matcher and the incremental detokenizer.

The pipeline is checked on a fixture model (random weights: the text is
noise, but reproducibility, limits and errors are not); the default model
(installed by deploy/setup.sh, path in $INFERD_MODEL) must answer a factual
question correctly."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import FIXTURES

GGUF = FIXTURES / "llama3" / "model-q8_0.gguf"
HFDIR = FIXTURES / "llama3"


def run(inferd, *args, env=None, timeout=300):
    e = dict(os.environ)
    if env is not None:
        e.update(env)
    return subprocess.run([inferd, "run", *map(str, args)], capture_output=True, timeout=timeout,
                          env=e, stdin=subprocess.DEVNULL)


def stats(r):
    """The stderr summary line: (prompt tokens, generated, why)."""
    line = [x for x in r.stderr.decode().splitlines() if "prompt tokens" in x][-1]
    words = line.split()
    return int(words[1]), int(words[4]), words[6].strip("();")


@pytest.mark.parametrize("model", [GGUF, HFDIR], ids=["gguf", "hf"])
def test_greedy_is_reproducible_and_respects_max_tokens(inferd_any, model):
    a = run(inferd_any, model, "hello world", "--max-tokens", "7", "--ignore-eos")
    b = run(inferd_any, model, "hello world", "--max-tokens", "7", "--ignore-eos")
    assert a.returncode == 0, a.stderr.decode()
    assert a.stdout == b.stdout
    assert stats(a)[1:] == (7, "max_tokens")


def test_seeded_sampling_is_reproducible(inferd):
    args = [GGUF, "the", "--max-tokens", "12", "--ignore-eos", "--temperature", "1.5"]
    outs = [run(inferd, *args, "--seed", s).stdout for s in ("1", "1", "2", "3")]
    assert outs[0] == outs[1]
    assert len(set(outs[1:])) > 1  # other seeds give other text


def test_stop_token_ids(inferd_any):
    """Generation ends at a listed token id (here: every id of the fixture's
    256-token vocabulary, so at the first token), and the list is checked."""
    base = [GGUF, "hello", "--max-tokens", "6", "--ignore-eos"]
    r = run(inferd_any, *base)
    assert stats(r)[1:] == (6, "max_tokens")
    r = run(inferd_any, *base, "--stop-token-ids", ",".join(str(i) for i in range(256)))
    assert r.returncode == 0, r.stderr.decode()
    assert stats(r)[1:] == (1, "stop_token")
    r = run(inferd_any, *base, "--stop-token-ids", "1,x")
    assert r.returncode == 2


def test_stop_string_is_not_emitted(inferd):
    full = run(inferd, GGUF, "abc", "--max-tokens", "24", "--ignore-eos").stdout.decode()
    text = full.rstrip("\n")
    # a stop string cut from the middle of what greedy produces
    mid = text[len(text) // 2:len(text) // 2 + 2]
    if len(text) < 4 or not mid.strip():
        pytest.skip("the fixture model produced too little text to cut a stop string from")
    r = run(inferd, GGUF, "abc", "--max-tokens", "24", "--ignore-eos", "--stop", mid)
    out = r.stdout.decode().rstrip("\n")
    assert r.returncode == 0 and stats(r)[2] == "stop"
    assert out == text[:text.index(mid)]


def test_errors_are_clear(inferd, tmp_path):
    r = run(inferd, tmp_path / "nope.gguf", "hi")
    assert r.returncode == 1 and b"nope.gguf" in r.stderr
    r = run(inferd, "hi", env={"INFERD_MODEL": str(tmp_path / "absent.gguf")})
    assert r.returncode == 1 and b"absent.gguf does not exist" in r.stderr
    r = run(inferd, GGUF, "hi", "--top-p", "2")
    assert r.returncode == 1 and b"top_p" in r.stderr
    r = run(inferd, GGUF, "hi", "--temperature", "hot")
    assert r.returncode == 2 and b"--temperature" in r.stderr
    r = run(inferd, GGUF, "hi", *sum([["--stop", s] for s in "abcde"], []))
    assert r.returncode == 2 and b"at most 4" in r.stderr
    r = run(inferd)
    assert r.returncode == 2
    r = run(inferd, GGUF, "hi", "--system", "be brief")
    assert r.returncode == 2 and b"--system needs --chat" in r.stderr
    r = run(inferd, GGUF, "hi", "--chat")
    assert r.returncode == 1 and b"ships no chat template" in r.stderr


def test_chat_template_from_tokenizer_config(inferd_any, tmp_path):
    """A Hugging Face directory's tokenizer_config.json chat_template is
    applied with --chat: its bad syntax is a clear error naming the line."""
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(HFDIR, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    inferd = inferd_any
    with_chat = run(inferd, d, "hello", "--chat", "--max-tokens", "1", "--ignore-eos")
    plain = run(inferd, d, "hello", "--max-tokens", "1", "--ignore-eos")
    sampled = run(inferd, d, "hello", "--chat", "--system", "be brief", "--max-tokens", "5",
                  "--ignore-eos", "--temperature", "1", "--top-p", "0.9", "--seed", "4",
                  "--stop", "xyz")
    assert sampled.returncode == 0, sampled.stderr.decode()
    assert with_chat.returncode == 0, with_chat.stderr.decode()
    assert stats(with_chat)[0] > stats(plain)[0]  # "user: hello\n" is longer
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run(inferd, d, "hello", "--chat")
    assert r.returncode == 1 and b"chat template: line 1" in r.stderr


def default_model():
    p = os.environ.get("INFERD_MODEL") or str(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        / "inferd" / "default.gguf")
    return Path(p)


CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(not default_model().exists(),
                    reason="the default model is not installed (deploy/setup.sh installs it)")
def test_default_model_answers_correctly(inferd):
    r = run(inferd, default_model(), "--special", "--max-tokens", "16",
            CHATML.format(q="What is the capital of France? Answer in one word."))
    assert r.returncode == 0, r.stderr.decode()
    assert "Paris" in r.stdout.decode()
    assert stats(r)[2] == "eos"
    # user text cannot forge special tokens: without --special the ChatML
    # markers are plain text, and the prompt is longer in tokens
    plain = run(inferd, default_model(), "--max-tokens", "1",
                CHATML.format(q="What is the capital of France?"))
    special = run(inferd, default_model(), "--special", "--max-tokens", "1",
                  CHATML.format(q="What is the capital of France?"))
    assert stats(plain)[0] > stats(special)[0]
    # the model's own chat template (GGUF metadata), as --chat applies it
    r = run(inferd, default_model(), "--chat", "--max-tokens", "16",
            "What is the capital of France? Answer in one word.")
    assert r.returncode == 0, r.stderr.decode()
    assert "Paris" in r.stdout.decode() and stats(r)[2] == "eos"
