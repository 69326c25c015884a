"""Tokenizer parity with the `tokenizers` library (the reference): the same
ids for a varied corpus on every fixture tokenizer, the same decoded text,
and an incremental decode that never splits a UTF-8 character and adds up
to the whole decode (checked inside tokenizer_runner)."""
import random
import subprocess

import pytest
from tokenizers import Tokenizer

from conftest import ASAN_BUILD, BUILD, FIXTURES

RUNNER = BUILD / "tests" / "unit" / "tokenizer_runner"
# the sanitizer build too, when it exists (leaks and UB fail the run)
RUNNERS = [RUNNER] + [p for p in [ASAN_BUILD / "tests" / "unit" / "tokenizer_runner"]
                      if p.exists()]
TOKS = sorted((FIXTURES.parent / "tokenizers").glob("*.json"))

CORPUS = [
    "",
    "Hello world",
    " leading space and trailing space ",
    "The capital of France is Paris. What's the capital of Germany? It's Berlin!",
    "I'm, you're, they've, we'll, he'd, it's; I'M YOU'RE THEY'VE (case-insensitive contractions)",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "مرحبا بالعالم! القاهرة هي عاصمة مصر.",
    "Emoji 😀😂👍 ❤️ family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷🇩🇪 skin 👋🏽",
    "def f(x):\n\treturn x  *  2\n\n\n    # comment with    runs of spaces\n",
    "if (a&&b||c) { x += y >> 2; }\r\n\r\nwindows line ends\r\n",
    "1 12 123 1234 12345 123456 3.14159 -42 1,000,000 0x1F 1e10 ٣٤٥ ５６",
    "tabs\t\tand\u00a0no-break\u2003em-space\u3000ideographic space",
    "a" * 3000,
    "supercalifragilisticexpialidocious" * 40,
    "<|begin_of_text|>special<|eot_id|> in text <|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|<|eot_id|>>< |eot_id|>",
    "mixed 中文 and English and العربية and 😀 in one line",
    "\n\n\n   \n\t\n",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ œ∑´®†¥¨ˆøπ“‘ ¡™£¢∞§¶•ªº–≠",
    "Zalgo: Z̴̡̪̹͓̥͖͂̈́ą̸̛̟̱̜̱̈́̈́l̷̰̞̣͐̌g̸̳̐͝o̵̧̙̽",
]


def random_texts(n=40, seed=7):
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                " \t\n.,;:'\"!?()[]{}<>/\\-_=+*&^%$#@~`|"
                "éüñçßøåæ中文日本語한국어العربيةпривет😀👍❤️\u200d")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(n)]


def records(items):
    out = bytearray()
    for b in items:
        out += str(len(b)).encode() + b"\n" + b
    return bytes(out)


def run(tok, mode, data, *flags, runner=RUNNER):
    r = subprocess.run([str(runner), str(tok), mode, *flags], input=data, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def read_records(data):
    out, i = [], 0
    while i < len(data):
        nl = data.index(b"\n", i)
        n = int(data[i:nl])
        out.append(data[nl + 1:nl + 1 + n])
        i = nl + 1 + n
    return out


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda p: p.parent.parent.parent.name)
@pytest.mark.parametrize("tok", TOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("add_special", [False, True])
def test_encode_matches_tokenizers(tok, add_special, runner):
    ref = Tokenizer.from_file(str(tok))
    texts = CORPUS + random_texts()
    flags = ["--add-special"] if add_special else []
    got = run(tok, "encode", records([t.encode() for t in texts]), *flags,
              runner=runner).decode().split("\n")
    for text, line in zip(texts, got):
        want = ref.encode(text, add_special_tokens=add_special).ids
        assert [int(x) for x in line.split()] == want, repr(text[:80])


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda p: p.parent.parent.parent.name)
@pytest.mark.parametrize("tok", TOKS, ids=lambda p: p.stem)
def test_decode_matches_tokenizers(tok, runner):
    ref = Tokenizer.from_file(str(tok))
    texts = CORPUS + random_texts(seed=11)
    ids = [ref.encode(t).ids for t in texts]
    # also arbitrary id sequences: byte tokens that cut characters apart
    rng = random.Random(3)
    ids += [[rng.randrange(ref.get_vocab_size()) for _ in range(rng.randint(1, 30))]
            for _ in range(40)]
    for skip in (False, True):
        flags = ["--skip-special"] if skip else []
        got = read_records(run(tok, "decode", records([" ".join(map(str, s)).encode()
                                                        for s in ids]), *flags, runner=runner))
        for s, g in zip(ids, got):
            assert g.decode() == ref.decode(s, skip_special_tokens=skip), s


@pytest.mark.parametrize("tok", TOKS, ids=lambda p: p.stem)
def test_special_tokens_not_parsed_from_user_text(tok):
    ref = Tokenizer.from_file(str(tok))
    specials = [a.content for a in ref.get_added_tokens_decoder().values() if a.special]
    text = "x" + specials[0] + "y"
    parsed = run(tok, "encode", records([text.encode()])).split()
    plain = run(tok, "encode", records([text.encode()]), "--no-parse-special").split()
    sid = str(ref.token_to_id(specials[0])).encode()
    assert sid in parsed and sid not in plain


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda p: p.parent.parent.parent.name)
@pytest.mark.parametrize("tok", TOKS, ids=lambda p: p.stem)
def test_invalid_utf8_input_is_encoded_and_round_trips(tok, runner):
    bad = [b"\xff\xfe", b"abc\xc3", b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80", b"\x80" * 5]
    out = run(tok, "encode", records(bad), runner=runner).decode().split("\n")
    ids = [line for line in out[:len(bad)]]
    # decoding gives the lossy UTF-8 of the bytes, as Python's 'replace' does
    got = read_records(run(tok, "decode", records([i.encode() for i in ids]), runner=runner))
    # the reference decodes the same ids alike; for byte-level BPE that is
    # Python's 'replace' decoding of the bytes (gpt2.json adds a prefix
    # space, as GPT-2's ByteLevel does)
    ref = Tokenizer.from_file(str(tok))
    prefix = " " if tok.stem == "gpt2" else ""
    for b, i, g in zip(bad, ids, got):
        assert g.decode() == ref.decode([int(x) for x in i.split()], skip_special_tokens=False)
        if not tok.stem.startswith("spm"):
            assert g.decode() == prefix + b.decode("utf-8", errors="replace")


def test_errors_are_clear(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    r = subprocess.run([str(RUNNER), str(bad), "encode"], input=b"", capture_output=True)
    assert r.returncode == 1 and b"only BPE is supported" in r.stderr
    r = subprocess.run([str(RUNNER), str(tmp_path / "missing.json"), "encode"], input=b"",
                       capture_output=True)
    assert r.returncode == 1 and b"missing.json" in r.stderr
    bad.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}')
    r = subprocess.run([str(RUNNER), str(bad), "encode"], input=b"", capture_output=True)
    assert r.returncode == 1 and b"merges[0]" in r.stderr


def write_gguf_tokenizer(src, dst, pre):
    """The fixture tokenizer's vocabulary, merges and added tokens as GGUF
    metadata, laid out the way llama.cpp's converter writes them."""
    import json

    import gguf

    j = json.loads(src.read_text())
    vocab = dict(j["model"]["vocab"])
    types = {}
    for a in j["added_tokens"]:
        vocab[a["content"]] = a["id"]
        types[a["id"]] = 3 if a["special"] else 4  # CONTROL / USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w = gguf.GGUFWriter(str(dst), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([types.get(i, 1) for i in range(n)])
    w.add_token_merges(merges)
    bos = (j.get("post_processor") or {}).get("special_tokens", {})
    if bos:
        w.add_bos_token_id(next(iter(bos.values()))["ids"][0])
        w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_gguf_tokenizer_matches_tokenizers(tmp_path, name, pre):
    src = FIXTURES.parent / "tokenizers" / f"{name}.json"
    dst = tmp_path / f"{name}.gguf"
    write_gguf_tokenizer(src, dst, pre)
    ref = Tokenizer.from_file(str(src))
    texts = CORPUS + random_texts(seed=19)
    for runner in RUNNERS:
        got = run(dst, "encode", records([t.encode() for t in texts]), "--add-special",
                  runner=runner).decode().split("\n")
        for text, line in zip(texts, got):
            assert [int(x) for x in line.split()] == ref.encode(text).ids, repr(text[:80])


def test_gguf_tokenizer_errors(tmp_path):
    import gguf

    def write(path, model, scores=True):
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_tokenizer_model(model)
        w.add_token_list(["<unk>", "a"])
        if scores:
            w.add_token_scores([0.0, 0.0])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "bert.gguf", "bert")
    r = subprocess.run([str(RUNNER), str(tmp_path / "bert.gguf"), "encode"], input=b"",
                       capture_output=True)
    assert r.returncode == 1 and b"'bert' is not supported" in r.stderr
    write(tmp_path / "noscores.gguf", "llama", scores=False)
    r = subprocess.run([str(RUNNER), str(tmp_path / "noscores.gguf"), "encode"], input=b"",
                       capture_output=True)
    assert r.returncode == 1 and b"tokenizer.ggml.scores" in r.stderr


def spm_gguf_and_reference(src, dst):
    """The SentencePiece fixture as a GGUF 'llama' tokenizer (tokens,
    scores, types, as llama.cpp's converter writes them; a token's score is
    minus the rank of the merge that made it), and the reference: a
    `tokenizers` BPE over the same vocabulary with the merges derived the
    way transformers' SentencePiece converter derives them (every split of
    a piece into two pieces, by the piece's score)."""
    import json
    import re

    import gguf
    from tokenizers import decoders, models, normalizers, processors

    j = json.loads(src.read_text())
    vocab = dict(j["model"]["vocab"])
    made_by = {}
    for k, m in enumerate(j["model"]["merges"]):
        a, b = m.split(" ") if isinstance(m, str) else m
        made_by.setdefault(a + b, k)
    n = max(vocab.values()) + 1
    tokens, scores, types = [""] * n, [0.0] * n, [1] * n
    for s, i in vocab.items():
        tokens[i] = s
        scores[i] = -float(made_by.get(s, 1_000_000 + i))
        types[i] = 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", s) else 1
    for a in j["added_tokens"]:
        types[a["id"]] = 2 if a["content"] == "<unk>" else (3 if a["special"] else 4)
    bos = vocab["<s>"]
    w = gguf.GGUFWriter(str(dst), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if types[i] != 1:
            continue
        local = [(piece[:k], piece[k:], scores[i]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges = [(a, b) for a, b, _ in sorted(merges, key=lambda x: x[2], reverse=True)]
    ref = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                               fuse_unk=True))
    ref.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    ref.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    ref.add_special_tokens([a["content"] for a in j["added_tokens"]])
    ref.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    return ref


def test_gguf_sentencepiece_tokenizer_matches_tokenizers(tmp_path):
    dst = tmp_path / "spm.gguf"
    ref = spm_gguf_and_reference(FIXTURES.parent / "tokenizers" / "spm-llama2.json", dst)
    texts = CORPUS + random_texts(seed=23)
    for runner in RUNNERS:
        got = run(dst, "encode", records([t.encode() for t in texts]), "--add-special",
                  runner=runner).decode().split("\n")
        for text, line in zip(texts, got):
            assert [int(x) for x in line.split()] == ref.encode(text).ids, repr(text[:80])
        ids = [ref.encode(t).ids for t in texts]
        dec = read_records(run(dst, "decode", records([" ".join(map(str, s)).encode()
                                                        for s in ids]), runner=runner))
        for s, d in zip(ids, dec):
            assert d.decode() == ref.decode(s, skip_special_tokens=False), s


def default_model():
    import os
    from pathlib import Path

    p = os.environ.get("INFERD_MODEL") or str(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        / "inferd" / "default.gguf")
    return Path(p)


@pytest.mark.skipif(not default_model().exists(),
                    reason="the default model is not installed (deploy/setup.sh installs it)")
def test_default_model_tokenizer_matches_tokenizers():
    """The real tokenizer the default model's GGUF carries (Qwen2.5's
    151,936 tokens and 151,387 merges), rebuilt in `tokenizers` from the
    same metadata with Qwen2's pre-tokenizer, against inferd's GGUF
    loader on the whole corpus."""
    import gguf
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    f = gguf.GGUFReader(str(default_model())).fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0])
             for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode()
              for i in f["tokenizer.ggml.merges"].data]
    assert bytes(f["tokenizer.ggml.pre"].parts[f["tokenizer.ggml.pre"].data[0]]).decode() == "qwen2"
    vocab = {t: i for i, t in enumerate(tokens)}
    ref = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    ref.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                    for i in range(len(tokens)) if types[i] in (3, 4)])
    texts = CORPUS + random_texts(seed=29)
    got = run(default_model(), "encode", records([t.encode() for t in texts])).decode().split("\n")
    for text, line in zip(texts, got):
        assert [int(x) for x in line.split()] == ref.encode(text).ids, repr(text[:80])
