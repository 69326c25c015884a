#!/usr/bin/env python3
"""Writes a random-weight GGUF model at a real model's shape, for
`inferd bench engine` and side-by-side runs with other engines.

The weights are random (seeded) but every tensor has the shape, type and
layout a converted checkpoint of that model would have, so the time a step
takes is the time the real model's step takes. Quantized blocks are drawn
directly (random scales and quants), not quantized from floats.

    python3 tests/bench/make_bench_model.py --shape tinyllama-1.1b --type q8_0 -o /tmp/tl-q8_0.gguf

Types: f16, q8_0, q4_k (Q4_K for every matmul, Q6_K for the LM head, as in
llama.cpp's Q4_K_M), q6_k.
"""
import argparse

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, ff, vocab, ctx, rope_theta, tied)
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, 2048, 10000.0, False),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, True),
}

BLOCK = {Q.Q8_0: (32, 34), Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}


def f16_bytes(rng, n, scale):
    return (np.abs(rng.normal(scale, scale / 4, n)).astype(np.float16)).view(np.uint8).reshape(n, 2)


def quant_blocks(rng, qtype, rows, cols):
    """Random valid blocks: (rows, cols / block * bytes) uint8."""
    blk, nbytes = BLOCK[qtype]
    nb = rows * cols // blk
    raw = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)
    if qtype == Q.Q8_0:
        raw[:, 0:2] = f16_bytes(rng, nb, 0.02 / 64)
    elif qtype == Q.Q4_K:
        raw[:, 0:2] = f16_bytes(rng, nb, 0.02 / 300)   # d
        raw[:, 2:4] = f16_bytes(rng, nb, 0.02 / 600)   # dmin
    elif qtype == Q.Q6_K:
        raw[:, 192:208] = rng.integers(-40, 40, size=(nb, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = f16_bytes(rng, nb, 0.02 / 1200)
    return raw.reshape(rows, cols // blk * nbytes)


def matrix(w, rng, name, rows, cols, qtype):
    if qtype == Q.F16:
        w.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16))
    else:
        w.add_tensor(name, quant_blocks(rng, qtype, rows, cols), raw_dtype=qtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--type", choices=["f16", "q8_0", "q4_k", "q6_k"], default="q8_0")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    E, L, H, KV, FF, V, CTX, THETA, TIED = SHAPES[a.shape]
    hd = E // H
    main_t = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K}[a.type]
    head_t = Q.Q6_K if main_t == Q.Q4_K else main_t
    rng = np.random.default_rng(0)

    w = GGUFWriter(a.output, "llama")
    w.add_name(f"random {a.shape} {a.type}")
    w.add_context_length(CTX)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"f16": 1, "q8_0": 7, "q4_k": 15, "q6_k": 18}[a.type])
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    matrix(w, rng, "token_embd.weight", V, E, main_t)
    w.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    if not TIED:
        matrix(w, rng, "output.weight", V, E, head_t)
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(E, dtype=np.float32))
        matrix(w, rng, p + "attn_q.weight", H * hd, E, main_t)
        matrix(w, rng, p + "attn_k.weight", KV * hd, E, main_t)
        matrix(w, rng, p + "attn_v.weight", KV * hd, E, main_t)
        matrix(w, rng, p + "attn_output.weight", E, H * hd, main_t)
        w.add_tensor(p + "ffn_norm.weight", np.ones(E, dtype=np.float32))
        matrix(w, rng, p + "ffn_gate.weight", FF, E, main_t)
        matrix(w, rng, p + "ffn_up.weight", FF, E, main_t)
        matrix(w, rng, p + "ffn_down.weight", E, FF, main_t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
