"""Tensor parallelism on the CPU (--tensor-parallel-size): every parity
fixture split over 2 and 4 ranks (threads summing through the CPU
communicator) against the same file run whole, and against transformers.

- logits: within fp32 rounding of TP=1 (the row-parallel sums add the
  ranks' partial dot products, so only the order of additions differs),
  and within the parity bound of the reference;
- greedy tokens: the reference's, exactly for the float formats (as TP=1);
- a shape that does not split (heads, KV heads, MLP columns, or a quant
  block cut by the row-parallel split) is refused with a message that
  names it, never run wrong.
"""
import json
import subprocess

import numpy as np
import pytest

from test_parity import EXACT_GREEDY, TOL, ids, load_variant, variants

TP_TOL = 2e-5  # relative to the largest logit: fp32 reassociation only


def run(args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)


def logits(inferd, path, tokens, total, tp):
    r = run([inferd, "logits", path, "--tokens", ids(tokens), "--all", "--rope-total", total,
             "--tensor-parallel-size", tp])
    return r, (np.array(json.loads(r.stdout)["sequences"][0]["logits"], dtype=np.float64)
               if r.returncode == 0 else None)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model_dir,fname", variants())
def test_tp_logits_and_greedy(inferd, model_dir, fname, tp):
    var, prompt, path, fmt = load_variant(model_dir, fname)
    total = len(prompt) + len(var["greedy"])
    r, ours = logits(inferd, path, prompt, total, tp)
    if r.returncode != 0:
        # refused: only for a shape that really does not split, saying why
        cfg = json.loads((model_dir / "config.json").read_text())
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        ff = cfg["intermediate_size"]
        splits = heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and ff % tp == 0
        assert "--tensor-parallel-size" in r.stderr and "split" in r.stderr or \
            "block" in r.stderr, r.stderr
        assert not splits or fmt not in EXACT_GREEDY, \
            f"a splittable float model was refused: {r.stderr}"
        return  # refused, as it must be
    _, whole = logits(inferd, path, prompt, total, 1)
    scale = np.abs(whole).max()
    rel_tp = np.abs(ours - whole).max() / scale
    want = np.array(var["logits"], dtype=np.float64)
    rel_ref = np.abs(ours - want).max() / np.abs(want).max()
    print(f"{model_dir.name}/{fname} tp={tp}: vs tp=1 {rel_tp:.3g}, vs reference {rel_ref:.3g}")
    assert rel_tp <= TP_TOL
    assert rel_ref <= TOL[fmt]

    greedy = var["greedy"]
    r = run([inferd, "generate", path, "--tokens", ids(prompt), "--max-tokens", len(greedy),
             "--ignore-eos", "--tensor-parallel-size", tp])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["sequences"][0]["tokens"]
    if fmt in EXACT_GREEDY:
        assert got == greedy
    else:
        r1 = run([inferd, "generate", path, "--tokens", ids(prompt), "--max-tokens", len(greedy),
                  "--ignore-eos"])
        assert got == json.loads(r1.stdout)["sequences"][0]["tokens"]


def test_tp_refuses_unsplittable(inferd):
    from conftest import FIXTURES
    # 2 heads over 4 ranks
    r = run([inferd, "logits", FIXTURES / "llama3", "--tokens", "1,2,3",
             "--tensor-parallel-size", "4"])
    assert r.returncode != 0
    assert "--tensor-parallel-size 4" in r.stderr and "n_head 2" in r.stderr, r.stderr
    # a row-parallel split through Q8_0's 32-value blocks
    r = run([inferd, "logits", FIXTURES / "mistral" / "model-q8_0.gguf", "--tokens", "1,2,3",
             "--tensor-parallel-size", "2"])
    assert r.returncode != 0 and "Q8_0" in r.stderr and "block" in r.stderr, r.stderr
