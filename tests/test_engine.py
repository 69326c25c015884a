"""Engine behaviour through the inferd binary: inspect on every fixture,
batch invariance (bit for bit), and clear errors for bad input."""
import json
import os
import subprocess

import pytest

from conftest import FIXTURES


def model_paths():
    out = []
    for d in sorted(FIXTURES.glob("*")):
        if (d / "model.safetensors").exists():
            out.append(pytest.param(d, id=d.name))
        for g in sorted(d.glob("*.gguf")):
            out.append(pytest.param(g, id=f"{d.name}/{g.name}"))
    return out


def run(args, env=None, timeout=300):
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.mark.parametrize("path", model_paths())
def test_inspect_every_fixture(inferd, path):
    r = run([inferd, "inspect", path, "--kv-tokens", "1000"])
    assert r.returncode == 0, r.stderr
    d = path if path.is_dir() else path.parent
    cfg = json.loads((d / "config.json").read_text())
    # "label (padded to 22) value"
    fields = {line[:22].strip(): line[23:].strip() for line in r.stdout.splitlines()}
    assert fields["layers"] == str(cfg["num_hidden_layers"])
    assert fields["attention heads"] == str(cfg["num_attention_heads"])
    assert fields["vocabulary"] == str(cfg["vocab_size"])
    assert "KV cache (1000 tok)" in fields
    assert fields["parameters"].split()[0].isdigit()


def invariance_models():
    out = []
    for name in ("llama3", "qwen2", "phi3", "llama-kquant"):
        d = FIXTURES / name
        for f in ["."] + sorted(p.name for p in d.glob("*.gguf")):
            p = d if f == "." else d / f
            if p.is_file() or (p / "model.safetensors").exists():
                out.append(pytest.param(p, id=f"{name}/{'safetensors' if f == '.' else f}"))
    return out


A = "1,17,33,5,9,120,44,3,7,11,13,2,99,98,97,4,8,15,16,23"
B = "1,200,201,202"
C = "1,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5"


def logits_text(inferd, path, tokens, *extra, env=None):
    r = run([inferd, "logits", path, "--tokens", tokens, "--all", *extra], env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["sequences"]


@pytest.mark.parametrize("path", invariance_models())
def test_batch_invariance_bit_for_bit(inferd, path):
    """A sequence's logits are identical alone, in a batch with others, with
    chunked prefill, on 1 or 2 threads, on every SIMD path, and with the
    weights in the file's layout or repacked."""
    solo = logits_text(inferd, path, A)[0]
    batched = logits_text(inferd, path, f"{B};{A};{C}")
    assert batched[1] == solo
    assert logits_text(inferd, path, B)[0] == batched[0]
    assert logits_text(inferd, path, f"{A};{C}", "--chunk", "3")[0] == solo
    assert logits_text(inferd, path, A, "--threads", "1")[0] == solo
    assert logits_text(inferd, path, A, "--threads", "3")[0] == solo
    assert logits_text(inferd, path, A, "--no-repack")[0] == solo
    for isa in ("scalar", "avx2", "avx512"):
        assert logits_text(inferd, path, A, env={"INFERD_ISA": isa})[0] == solo, isa


def test_generate_batch_equals_solo(inferd):
    path = FIXTURES / "llama3" / "model-q8_0.gguf"
    args = ["--max-tokens", "12", "--ignore-eos"]
    r1 = run([inferd, "generate", path, "--tokens", A, *args])
    r2 = run([inferd, "generate", path, "--tokens", f"{C};{A};{B}", *args])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    solo = json.loads(r1.stdout)["sequences"][0]["tokens"]
    assert len(solo) == 12
    assert json.loads(r2.stdout)["sequences"][1]["tokens"] == solo


def test_bad_token_id_is_a_clear_error(inferd):
    r = run([inferd, "logits", FIXTURES / "llama3", "--tokens", "1,2,100000"])
    assert r.returncode == 1
    assert "token id 100000 is outside the vocabulary" in r.stderr


def test_too_long_for_context_is_a_clear_error(inferd):
    r = run([inferd, "generate", FIXTURES / "llama3", "--tokens", "1,2", "--max-tokens", "10000000"])
    assert r.returncode == 1
    assert "exceed the context length" in r.stderr


def test_missing_model_is_a_clear_error(inferd, tmp_path):
    r = run([inferd, "inspect", tmp_path / "nope.gguf"])
    assert r.returncode == 1
    assert "nope.gguf: No such file or directory" in r.stderr
    r = run([inferd, "inspect", tmp_path])
    assert r.returncode == 1 and "config.json" in r.stderr


def test_pickled_weights_are_refused(inferd, tmp_path):
    cfg = (FIXTURES / "llama3" / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    r = run([inferd, "inspect", tmp_path])
    assert r.returncode == 1
    assert "pickle" in r.stderr.lower()


def test_usage_errors(inferd):
    assert run([inferd]).returncode == 2
    assert run([inferd, "frobnicate"]).returncode == 2
    r = run([inferd, "logits", FIXTURES / "llama3", "--tokens", "1,x"])
    assert r.returncode == 2 and "comma-separated token ids" in r.stderr


def test_bench_engine_runs_and_reports(inferd, tmp_path):
    """The benchmark is not timed here; this only checks that it runs and
    that its JSON holds a figure and a ceiling for every batch size."""
    out = tmp_path / "b.json"
    r = run([inferd, "bench", "engine", FIXTURES / "llama3" / "model-q8_0.gguf", "--batch", "1,3",
             "--prompt", "8", "--gen", "4", "--json", out])
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout
    res = json.loads(out.read_text())
    assert [x["batch"] for x in res["results"]] == [1, 3]
    assert res["bandwidth_Bps"] > 1e9
    for x in res["results"]:
        assert x["prefill_tps"] > 0 and x["decode_tps"] > 0 and x["decode_roofline"] > 0
