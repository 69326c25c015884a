"""`inferd bench serve` against the real daemon (not a test double): every
request completes, and the token counts it reports are the daemon's."""
import json
import subprocess

from inferd_serve_harness import EXE


def bench(tiny, tmp_path, *args):
    out = tmp_path / "bench.json"
    r = subprocess.run([str(EXE), "bench", "serve", "--base-url", tiny.url, "--json", str(out),
                        "--plot", str(tmp_path / "bench.png"), *args],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())


def test_bench_serve_completions_sweep(tiny, tmp_path):
    res = bench(tiny, tmp_path, "--sweep-concurrency", "1,4", "--num-prompts", "8",
                "--input-len", "16", "--output-len", "8", "--ignore-eos",
                "--token-range", "10:200")
    assert res["model"] == "tiny"
    assert [run["max_concurrency"] for run in res["runs"]] == [1, 4]
    for run in res["runs"]:
        assert run["completed"] == 8 and run["failed"] == 0, run["errors"]
        assert run["total_output_tokens"] == 64 and run["total_input_tokens"] == 128
        assert run["mean_ttft_ms"] > 0 and run["output_throughput"] > 0


def test_bench_serve_chat(tiny, tmp_path):
    res = bench(tiny, tmp_path, "--endpoint", "/v1/chat/completions", "--concurrency", "2",
                "--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--ignore-eos")
    run = res["runs"][0]
    assert run["completed"] == 4 and run["failed"] == 0, run["errors"]
    assert run["total_output_tokens"] == 24
