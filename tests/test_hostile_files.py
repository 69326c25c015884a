"""Corrupted and hostile model files, end to end: every one is refused by
`inferd inspect` with exit status 1 and a message naming the file, never a
crash (a signal) or a hang. Starts from the real fixtures and damages them:
truncation at many offsets, random byte flips in the header, and a few
targeted edits. The loaders' field-by-field checks have C unit tests."""
import json
import random
import shutil
import struct
import subprocess

import pytest

from conftest import FIXTURES


def inspect(exe, path):
    return subprocess.run([exe, "inspect", str(path)], capture_output=True, text=True, timeout=60)


def assert_refused(r, name):
    assert r.returncode == 1, f"exit {r.returncode} (signal if negative)\n{r.stderr}"
    assert name in r.stderr, r.stderr
    assert r.stderr.startswith("inferd: ")


def gguf_fixture():
    return FIXTURES / "llama3" / "model-f16.gguf"


def header_len_gguf(data):
    # Rough: the tensor data starts after the header; damage the first 4 KiB.
    return min(len(data), 4096)


def test_gguf_truncated_everywhere(inferd_any, tmp_path):
    data = gguf_fixture().read_bytes()
    rnd = random.Random(1)
    cuts = sorted(set(list(range(0, 64)) + [rnd.randrange(len(data)) for _ in range(60)]))
    for cut in cuts:
        p = tmp_path / "t.gguf"
        p.write_bytes(data[:cut])
        assert_refused(inspect(inferd_any, p), "t.gguf")


def test_gguf_header_byte_flips_never_crash(inferd_any, tmp_path):
    data = bytearray(gguf_fixture().read_bytes())
    rnd = random.Random(2)
    n = header_len_gguf(data)
    for i in range(150):
        d = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            d[rnd.randrange(n)] = rnd.randrange(256)
        p = tmp_path / "f.gguf"
        p.write_bytes(bytes(d))
        r = inspect(inferd_any, p)
        # A flip may land in a string that does not matter: then it loads.
        assert r.returncode in (0, 1), f"case {i}: exit {r.returncode}\n{r.stderr}"
        if r.returncode == 1:
            assert r.stderr.startswith("inferd: ")


def test_gguf_bad_magic_and_version(inferd_any, tmp_path):
    data = bytearray(gguf_fixture().read_bytes())
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUX" + data[4:])
    assert_refused(inspect(inferd_any, p), "m.gguf")
    d = bytearray(data)
    d[4:8] = struct.pack("<I", 99)
    p.write_bytes(bytes(d))
    assert_refused(inspect(inferd_any, p), "m.gguf")
    d = bytearray(data)
    d[8:16] = struct.pack("<Q", 1 << 60)  # tensor count
    p.write_bytes(bytes(d))
    assert_refused(inspect(inferd_any, p), "m.gguf")


def copy_hf(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(FIXTURES / "llama3", d, ignore=shutil.ignore_patterns("*.gguf", "reference.json"))
    return d


def test_safetensors_truncated_everywhere(inferd_any, tmp_path):
    d = copy_hf(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    rnd = random.Random(3)
    hlen = struct.unpack("<Q", data[:8])[0]
    cuts = sorted(set(list(range(0, 16)) + [rnd.randrange(8 + hlen) for _ in range(40)]
                      + [rnd.randrange(len(data)) for _ in range(30)]))
    for cut in cuts:
        (d / "model.safetensors").write_bytes(data[:cut])
        assert_refused(inspect(inferd_any, d), "model.safetensors")


def test_safetensors_header_edits(inferd_any, tmp_path):
    d = copy_hf(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    hlen = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]

    def write(h, raw=None):
        hb = raw if raw is not None else json.dumps(h).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + body)
        return inspect(inferd_any, d)

    name = next(k for k in header if k != "__metadata__")
    for mutate in (
        lambda h: h[name].update(dtype="F64"),
        lambda h: h[name].update(shape=[1 << 40, 1 << 40]),
        lambda h: h[name].update(shape=[-1, 4]),
        lambda h: h[name].update(data_offsets=[0, len(body) + 4096]),
        lambda h: h[name].update(data_offsets=[8, 4]),
        lambda h: h[name].pop("dtype"),
    ):
        h = json.loads(json.dumps(header))
        mutate(h)
        assert_refused(write(h), "model.safetensors")
    raw = json.dumps(header).encode()
    dup = raw[:-1] + b"," + json.dumps(name).encode() + b":" + json.dumps(header[name]).encode() + b"}"
    assert_refused(write(None, dup), "model.safetensors")
    assert_refused(write(None, b"{" * 100000), "model.safetensors")


def test_config_shape_mismatch_is_refused(inferd_any, tmp_path):
    d = copy_hf(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (d / "config.json").write_text(json.dumps(cfg))
    r = inspect(inferd_any, d)
    assert_refused(r, "model.safetensors" if "model.safetensors" in r.stderr else str(d))
    assert "config implies" in r.stderr


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", -4),
                                         ("model_type", "gpt2"), ("rope_scaling", {"rope_type": "yarn", "factor": 2})])
def test_bad_config_is_refused(inferd_any, tmp_path, field, value):
    d = copy_hf(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    cfg.pop("rope_parameters", None) if field == "rope_scaling" else None
    (d / "config.json").write_text(json.dumps(cfg))
    assert_refused(inspect(inferd_any, d), "config.json")
