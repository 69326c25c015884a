#!/usr/bin/env python3
"""Side by side: `inferd bench engine` and llama.cpp on the same GGUF file,
same thread count, same prompt length, batch sizes and decode steps.

llama.cpp is driven through the llama-cpp-python package (install it
yourself: `pip install llama-cpp-python`; this is a benchmark, not a CI
step). Both runs happen in this one command, one after the other, so they
see the same machine. Prints prefill and decode tokens/s for each batch size
and the ratio inferd / llama.cpp.

    python3 tests/bench/compare_llamacpp.py /tmp/tl-q8_0.gguf --batch 1,8 --threads 2
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time


def llamacpp_bench(path, batches, P, G, threads):
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    results = []
    for B in batches:
        cp = L.llama_context_default_params()
        cp.n_ctx = B * (P + G) + 64
        cp.n_batch = B * P
        cp.n_ubatch = min(B * P, 512)
        cp.n_seq_max = B
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = True
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise SystemExit("llama.cpp could not create a context")
        batch = L.llama_batch_init(B * P, 0, B)

        def fill(items):
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, logits) in enumerate(items):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits

        state = 0x9E3779B97F4A7C15
        toks = []
        for _ in range(B * P):
            state ^= (state << 13) & (2**64 - 1)
            state ^= state >> 7
            state ^= (state << 17) & (2**64 - 1)
            toks.append(state % n_vocab)
        fill([(toks[b * P + p], p, b, p == P - 1) for b in range(B) for p in range(P)])
        t0 = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed (prefill)")
        t_pre = time.perf_counter() - t0

        def argmax(i):
            row = L.llama_get_logits_ith(ctx, i)
            best, bv = 0, row[0]
            for k in range(1, n_vocab):
                if row[k] > bv:
                    best, bv = k, row[k]
            return best

        last = [1] * B  # token choice does not change the timing; argmax in Python would
        t_dec = 0.0
        for step in range(G):
            fill([(last[b], P + step, b, True) for b in range(B)])
            t0 = time.perf_counter()
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed (decode)")
            L.llama_synchronize(ctx)
            t_dec += time.perf_counter() - t0
        results.append({"batch": B, "prefill_tps": B * P / t_pre, "decode_tps": B * G / t_dec})
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return results


def best(runs, key):
    return max(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=2, help="alternating runs of each engine; the best is kept")
    ap.add_argument("--inferd", default=os.path.join(os.environ.get("INFERD_BUILD_DIR", "build"), "inferd"))
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    if a.llamacpp_only:
        # One fresh process per measurement: llama.cpp's OpenMP pool and
        # contexts are not reused across batch sizes.
        print(json.dumps(llamacpp_bench(a.model, batches, a.prompt, a.gen, a.threads)))
        return

    ours_runs, theirs_runs = {b: [] for b in batches}, {b: [] for b in batches}
    meta = None
    for rep in range(a.reps):
        with tempfile.NamedTemporaryFile(suffix=".json") as tf:
            subprocess.run([a.inferd, "bench", "engine", a.model, "--batch", a.batch, "--prompt", str(a.prompt),
                            "--gen", str(a.gen), "--threads", str(a.threads), "--json", tf.name],
                           check=True, stdout=sys.stderr)
            meta = json.load(open(tf.name))
        for r in meta["results"]:
            ours_runs[r["batch"]].append(r)
        for b in batches:
            out = subprocess.run([sys.executable, __file__, a.model, "--llamacpp-only", "--batch", str(b),
                                  "--prompt", str(a.prompt), "--gen", str(a.gen), "--threads", str(a.threads)],
                                 check=True, capture_output=True, text=True)
            theirs_runs[b].append(json.loads(out.stdout.strip().splitlines()[-1])[0])

    print(f"\n{a.model}: {a.threads} threads, prompt {a.prompt}, {a.gen} decode steps, best of {a.reps}")
    print(f"read bandwidth {meta['bandwidth_Bps'] / 1e9:.1f} GB/s, f32 peak {meta['f32_flops'] / 1e9:.0f} GFLOP/s,"
          f" int8 peak {meta['int8_ops'] / 1e9:.0f} GOP/s (last inferd run)")
    print(f"{'batch':>5} | {'prefill inferd':>14} {'llama.cpp':>10} {'ratio':>6} {'ceiling':>8} | "
          f"{'decode inferd':>13} {'llama.cpp':>10} {'ratio':>6} {'roofline':>9}")
    for b in batches:
        o, t = ours_runs[b], theirs_runs[b]
        op, tp = best(o, "prefill_tps"), best(t, "prefill_tps")
        od, td = best(o, "decode_tps"), best(t, "decode_tps")
        print(f"{b:>5} | {op:>14.1f} {tp:>10.1f} {op / tp:>6.2f} {o[-1]['prefill_ceiling']:>8.0f} | "
              f"{od:>13.1f} {td:>10.1f} {od / td:>6.2f} {o[-1]['decode_roofline']:>9.1f}")


if __name__ == "__main__":
    main()
