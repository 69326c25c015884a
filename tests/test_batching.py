"""The continuous-batching engine through `inferd bench load`, in the
release and ASan builds: concurrent runs on a KV cache small enough to
force preemption, a shared prefix that must be reused, and the JSON that
tests/bench/bench_concurrency.py reads. The bit-for-bit checks against solo
runs live in tests/unit/test_engine.c."""
import json
import random
import subprocess

from conftest import FIXTURES

MODEL = FIXTURES / "llama3" / "model-q8_0.gguf"


def workload(tmp_path, seed=7, max_tokens=24):
    rnd = random.Random(seed)
    runs = []
    for c in (1, 3, 8):
        runs.append({"name": f"plain-c{c}", "concurrency": c, "max_tokens": max_tokens,
                     "warm_first": False,
                     "prompts": [[rnd.randrange(0, 254) for _ in range(rnd.randrange(5, 60))]
                                 for _ in range(c)]})
        prefix = [rnd.randrange(0, 254) for _ in range(64)]
        runs.append({"name": f"shared-c{c}", "concurrency": c, "max_tokens": max_tokens,
                     "warm_first": True,
                     "prompts": [prefix + [rnd.randrange(0, 254) for _ in range(8)]
                                 for _ in range(c)]})
    path = tmp_path / "workload.json"
    path.write_text(json.dumps({"runs": runs}))
    return path, runs


def bench_load(exe, wl, out, *extra):
    r = subprocess.run([exe, "bench", "load", str(MODEL), "--workload", str(wl), "--json", str(out),
                        "--threads", "2", *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text()), r.stderr


def test_load_runs_complete_and_report(inferd_any, tmp_path):
    wl, runs = workload(tmp_path)
    res, err = bench_load(inferd_any, wl, tmp_path / "out.json")
    assert "KV cache" in err and "tokens" in err  # sized and reported at start
    assert res["kv_tokens"] > 0
    assert [r["name"] for r in res["runs"]] == [r["name"] for r in runs]
    for want, got in zip(runs, res["runs"]):
        c = want["concurrency"]
        assert got["output_tokens"] == c * want["max_tokens"]
        assert len(got["ttft_s"]) == c and all(0 < t < 60 for t in got["ttft_s"])
        assert got["tok_s"] > 0
        if want["warm_first"] and c > 1:
            # The later requests attach the shared 64-token prefix (4 blocks).
            assert got["cached_tokens"] >= (c - 1) * 64
        if not want["warm_first"]:
            # No full block in common; at most a few leading tokens that
            # happen to match a cached block (partial reuse).
            assert got["cached_tokens"] < c * 16


def test_small_cache_preempts_and_finishes(inferd_any, tmp_path):
    """Ten blocks of 16 tokens for up to 8 sequences of up to ~84 tokens:
    requests must be preempted and recomputed, and every one still ends with
    all its tokens."""
    wl, runs = workload(tmp_path, seed=11)
    res, _ = bench_load(inferd_any, wl, tmp_path / "out.json", "--kv-cache-memory", "160K",
                        "--max-seqs", "8", "--max-batched-tokens", "32")
    assert sum(r["preemptions"] for r in res["runs"]) > 0
    for want, got in zip(runs, res["runs"]):
        assert got["output_tokens"] == want["concurrency"] * want["max_tokens"]


def test_bad_engine_flags_are_clear(inferd, tmp_path):
    wl, _ = workload(tmp_path)
    r = subprocess.run([inferd, "bench", "load", str(MODEL), "--workload", str(wl),
                        "--kv-cache-memory", "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-cache-memory" in r.stderr
    r = subprocess.run([inferd, "bench", "load", str(MODEL), "--workload", str(wl),
                        "--kv-cache-memory", "100"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "less than one block" in r.stderr


def test_burst_with_one_system_prompt_computes_it_once(inferd_any, tmp_path):
    """Eight requests with one 96-token prefix arriving together: the first
    computes the prefix, the others wait for it and attach it, so the prefill
    rows run are about one prefix plus eight suffixes, not eight prefixes."""
    rnd = random.Random(3)
    prefix = [rnd.randrange(0, 254) for _ in range(96)]
    prompts = [prefix + [rnd.randrange(0, 254) for _ in range(8)] for _ in range(8)]
    wl = tmp_path / "burst.json"
    wl.write_text(json.dumps({"runs": [{"name": "burst", "concurrency": 8, "max_tokens": 8,
                                        "warm_first": False, "prompts": prompts}]}))
    res, _ = bench_load(inferd_any, wl, tmp_path / "out.json", "--max-batched-tokens", "32")
    run = res["runs"][0]
    assert run["output_tokens"] == 64
    assert run["cached_tokens"] >= 7 * 96
    assert run["prompt_tokens_computed"] <= 96 + 8 * 16
