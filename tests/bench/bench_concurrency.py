#!/usr/bin/env python3
"""Concurrency benchmark: aggregate output tokens/s and time to first token
(TTFT) at several concurrency levels, inferd's engine in-process side by side
with llama.cpp's llama-server over HTTP, on the same GGUF file and the same
token-id prompts. A benchmark, not a test (run by hand; Python stdlib only).

Workload (deterministic from --seed; real text: slices of README.md behind
per-request tags, tokenized by `inferd tokenize`); every request is greedy,
ignores EOS and produces exactly --max-tokens tokens:

  plain   at concurrency c, c requests with their own --prompt-tokens prompt,
          all submitted at once.
  shared  a fresh --shared-tokens prefix per level; request i is
          prefix + its own --suffix-tokens suffix. Request 0 is submitted
          alone; the other c-1 when request 0 receives its first token
          ("warm_first"). Reports the first TTFT, the median and max TTFT of
          the later ones and median_later / first (target <= 0.2).

Aggregate tok/s = output tokens of the level / (last finish - first submit).
"x c=1" is the aggregate speed-up over c=1 of the same engine and mode
(target >= 3x at c >= 8).

inferd: the workload goes to a JSON file and one process runs it all:
    BUILD/inferd bench load MODEL --workload FILE --json OUT --threads N
llama.cpp: one llama-server per level (-np c, -c c*(prompt + max_tokens + 16),
-t N, loopback, free port), requests to POST /completion with stream=true.

    python3 tests/bench/bench_concurrency.py                      # both, defaults
    python3 tests/bench/bench_concurrency.py --only llamacpp \\
        --concurrency 1,2 --max-tokens 16 --modes plain,shared
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def default_model():
    if os.environ.get("INFERD_MODEL"):
        return os.environ["INFERD_MODEL"]
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "inferd", "default.gguf")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- workload --

def tokenize_all(args, texts):
    """Token ids of each text with the model's own tokenizer, one
    `inferd tokenize` process for all of them."""
    exe = Path(args.inferd) / "inferd"
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    p = subprocess.run([str(exe), "tokenize", args.model], input=stdin, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"inferd tokenize failed: {p.stderr.strip()}")
    out = [json.loads(line) for line in p.stdout.splitlines()]
    if len(out) != len(texts):
        raise RuntimeError("inferd tokenize: one line per text expected")
    return out


def make_workload(args):
    """One run per (mode, level). Prompts are real text, so that both engines
    continue it with ordinary text (llama-server's output parser rejects some
    of what random token ids make the model say): slices of this project's
    README at offsets drawn from an RNG seeded by (seed, mode, level), each
    behind a tag naming the run and request, so prompts of different runs or
    requests share no leading block. Shared-mode prefixes are fresh per level
    (the inferd prefix cache persists across runs)."""
    corpus = (ROOT / "README.md").read_text()
    runs, texts = [], [corpus]
    for mode in args.modes:
        for c in args.concurrency:
            texts.append(f"Shared context {args.seed}-{c}:\n")
            texts += [f"Request {mode}-{args.seed}-{c}-{i}:\n" for i in range(c)]
            texts += [f"\nQuestion {i}: " for i in range(c)]
    ids = tokenize_all(args, texts)
    body, k = ids[0], 1
    if len(body) < 64:
        raise RuntimeError("README.md is too short to slice prompts from")

    def piece(rng, n):
        """n consecutive corpus tokens from a random offset, wrapping."""
        o = rng.randrange(len(body))
        return [body[(o + i) % len(body)] for i in range(n)]

    for mode in args.modes:
        for c in args.concurrency:
            rng = random.Random(f"bench_concurrency/{args.seed}/{mode}/{c}")
            shared_tag, req_tags, q_tags = ids[k], ids[k + 1:k + 1 + c], ids[k + 1 + c:k + 1 + 2 * c]
            k += 1 + 2 * c
            if mode == "plain":
                n = args.prompt_tokens
                prompts = [(req_tags[i] + piece(rng, n))[:n] for i in range(c)]
            else:
                prefix = (shared_tag + piece(rng, args.shared_tokens))[:args.shared_tokens]
                n = args.suffix_tokens
                prompts = [prefix + (q_tags[i] + piece(rng, n))[:n] for i in range(c)]
            runs.append({"name": f"{mode}-c{c}", "mode": mode, "concurrency": c,
                         "max_tokens": args.max_tokens, "warm_first": mode == "shared",
                         "prompts": prompts})
    return runs


def summarize(run, ttft, output_tokens, wall_s):
    """Per-level figures from per-request TTFTs (each from its own submit)."""
    c = run["concurrency"]
    out = {"name": run["name"], "mode": run["mode"], "concurrency": c,
           "output_tokens": output_tokens, "wall_s": wall_s,
           "tok_s": output_tokens / wall_s if wall_s and wall_s > 0 else None,
           "ttft_median_s": statistics.median(ttft) if ttft else None,
           "ttft_max_s": max(ttft) if ttft else None}
    if run["warm_first"]:
        later = ttft[1:]
        out["ttft_first_s"] = ttft[0] if ttft else None
        out["ttft_later_median_s"] = statistics.median(later) if later else None
        out["ttft_later_max_s"] = max(later) if later else None
        f, lm = out["ttft_first_s"], out["ttft_later_median_s"]
        out["later_over_first"] = lm / f if f and lm is not None else None
    return out


# ------------------------------------------------------------------ inferd --

def run_inferd(args, runs, tmp):
    exe = Path(args.inferd) / "inferd"
    if not exe.is_file():
        raise RuntimeError(f"{exe} not found (build inferd, or point --inferd at the build dir)")
    wl_path = Path(args.workload_out) if args.workload_out else Path(tmp) / "workload.json"
    out_path = Path(tmp) / "inferd_out.json"
    wl = {"runs": [{"name": r["name"], "concurrency": r["concurrency"],
                    "max_tokens": r["max_tokens"], "warm_first": r["warm_first"],
                    "prompts": r["prompts"]} for r in runs]}
    wl_path.write_text(json.dumps(wl))
    cmd = [str(exe), "bench", "load", args.model, "--workload", str(wl_path),
           "--json", str(out_path), "--threads", str(args.threads)] + args.inferd_args
    log("inferd: " + " ".join(cmd))
    # inferd's own output goes to stderr so the tables on stdout stay clean.
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr,
                       timeout=args.inferd_timeout)
    if p.returncode != 0:
        raise RuntimeError(f"inferd bench load exited with status {p.returncode}")
    raw = json.loads(out_path.read_text())
    by_name = {r.get("name"): r for r in raw.get("runs", [])}
    results = {}
    for run in runs:
        r = by_name.get(run["name"])
        if r is None:
            results[run["name"]] = {"name": run["name"], "error": "missing from inferd output"}
            continue
        c = run["concurrency"]
        ttft, finish = r.get("ttft_s") or [], r.get("finish_s") or []
        s = summarize(run, ttft, r.get("output_tokens", 0), r.get("wall_s"))
        if r.get("tok_s") is not None:
            s["tok_s"] = r["tok_s"]
        s["cached_tokens"] = r.get("cached_tokens")
        s["ttft_s"], s["finish_s"] = ttft, finish
        want = c * run["max_tokens"]
        if len(ttft) != c or s["output_tokens"] != want:
            s["warning"] = (f"expected {c} requests / {want} output tokens, got "
                            f"{len(ttft)} / {s['output_tokens']}")
            log(f"inferd {run['name']}: {s['warning']}")
        results[run["name"]] = s
    return {"model": raw.get("model"), "kv_tokens": raw.get("kv_tokens"), "raw": raw,
            "runs": results}


# --------------------------------------------------------------- llama.cpp --

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class LlamaServer:
    """One llama-server child on loopback; always terminated by close()."""

    def __init__(self, args, n_parallel, n_ctx, logdir):
        self.args, self.proc = args, None
        self.port = free_port()
        self.log_path = Path(logdir) / f"llama-server-{self.port}.log"
        cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1",
               "--port", str(self.port), "-np", str(n_parallel), "-c", str(n_ctx),
               "-t", str(args.threads)] + args.llama_args
        log("llama.cpp: " + " ".join(cmd))
        self.cmd = cmd
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def log_tail(self, n=20):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                status, body = http_get(self.port, "/health", 2)
                if status == 200 and json.loads(body or b"{}").get("status") == "ok":
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy after {timeout} s:\n" + self.log_tail())

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


class Request(threading.Thread):
    """One streamed POST /completion, sent when `go` is set; t_submit is taken
    right before the request is sent. With preconnect the connection is opened
    before waiting (only for short waits: the server closes a connection that
    stays idle longer than its keep-alive timeout, 5 s)."""

    def __init__(self, port, prompt, max_tokens, go, timeout, first_token_event=None,
                 preconnect=True):
        super().__init__(daemon=True)
        self.preconnect = preconnect
        self.port, self.prompt, self.max_tokens = port, prompt, max_tokens
        self.go, self.timeout, self.first_token_event = go, timeout, first_token_event
        self.connected = threading.Event()
        self.t_submit = self.t_first = self.t_end = None
        self.tokens = None
        self.chunks = 0
        self.error = None
        self.final = None

    def run(self):
        conn = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            if self.preconnect:
                conn.connect()
            self.connected.set()
            if not self.go.wait(self.timeout):
                raise RuntimeError("never released")
            body = json.dumps({"prompt": self.prompt, "n_predict": self.max_tokens,
                               "ignore_eos": True, "temperature": 0, "stream": True,
                               "cache_prompt": True})
            self.t_submit = time.perf_counter()
            conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read(500)!r}")
            counted = 0
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                msg = json.loads(payload)
                if "error" in msg:
                    raise RuntimeError(f"server error: {msg['error']}")
                if "prompt_progress" in msg:
                    continue
                toks = [t for t in (msg.get("tokens") or []) if isinstance(t, int) and t >= 0]
                if msg.get("content") or toks:
                    if self.t_first is None:
                        self.t_first = time.perf_counter()
                        if self.first_token_event is not None:
                            self.first_token_event.set()
                    self.chunks += 1
                    counted += len(toks) if toks else 1
                if msg.get("stop"):
                    self.final = msg
                    break
            self.t_end = time.perf_counter()
            n = None
            if self.final is not None:
                n = self.final.get("tokens_predicted")
                if n is None:
                    n = (self.final.get("timings") or {}).get("predicted_n")
            self.tokens = n if n is not None else counted
            if self.t_first is None:
                raise RuntimeError("stream ended without a token")
        except Exception as e:  # recorded, reported by the caller
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.connected.set()
            if self.first_token_event is not None:
                self.first_token_event.set()  # never leave the others waiting
            if conn is not None:
                conn.close()


def llamacpp_level(args, run, logdir):
    c, prompts = run["concurrency"], run["prompts"]
    n_ctx = c * (max(len(p) for p in prompts) + run["max_tokens"] + 16)
    server = LlamaServer(args, c, n_ctx, logdir)
    reqs = []
    try:
        server.wait_healthy(args.startup_timeout)
        go_first, go_rest, first_tok = threading.Event(), threading.Event(), threading.Event()
        warm = run["warm_first"]
        for i, p in enumerate(prompts):
            if warm:
                go = go_first if i == 0 else go_rest
                ev = first_tok if i == 0 else None
            else:
                go, ev = go_first, None
            reqs.append(Request(server.port, p, run["max_tokens"], go, args.request_timeout, ev,
                                preconnect=go is go_first))
        for r in reqs:
            r.start()
        for r in reqs:
            r.connected.wait(args.request_timeout)
        go_first.set()
        if warm:
            first_tok.wait(args.request_timeout)
            go_rest.set()
        deadline = time.monotonic() + args.request_timeout
        for r in reqs:
            r.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, r in enumerate(reqs) if r.is_alive()]
        if hung:
            raise RuntimeError(f"requests {hung} still running after {args.request_timeout} s")
        errors = [(i, r.error) for i, r in enumerate(reqs) if r.error]
        if errors:
            raise RuntimeError(f"request {errors[0][0]} failed: {errors[0][1]}"
                               + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    finally:
        server.close()
    t0 = min(r.t_submit for r in reqs)
    ttft = [r.t_first - r.t_submit for r in reqs]
    finish = [r.t_end - t0 for r in reqs]
    out_tokens = sum(r.tokens for r in reqs)
    s = summarize(run, ttft, out_tokens, max(r.t_end for r in reqs) - t0)
    s["ttft_s"], s["finish_s"] = ttft, finish
    s["tokens_per_request"] = [r.tokens for r in reqs]
    s["n_ctx"] = n_ctx
    want = c * run["max_tokens"]
    if out_tokens != want:
        s["warning"] = f"expected {want} output tokens, got {out_tokens}"
        log(f"llama.cpp {run['name']}: {s['warning']}")
    return s


def run_llamacpp(args, runs, tmp):
    if not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
        raise RuntimeError(f"{args.llama_server} is not an executable (see --llama-server)")
    results = {}
    for run in runs:
        try:
            results[run["name"]] = llamacpp_level(args, run, tmp)
            s = results[run["name"]]
            log(f"llama.cpp {run['name']}: {fmt(s['tok_s'])} tok/s, "
                f"TTFT median {fmt(s['ttft_median_s'], 3)} s")
        except Exception as e:
            log(f"llama.cpp {run['name']}: {e}")
            results[run["name"]] = {"name": run["name"], "error": str(e)}
    return {"runs": results}


# ------------------------------------------------------------------ report --

def fmt(x, nd=1, suffix=""):
    return "-" if x is None else f"{x:.{nd}f}{suffix}"


def ratio(a, b):
    return a / b if a is not None and b else None


def table(headers, rows):
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
         for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w[i]) for i, h in enumerate(headers)),
             "-|-".join("-" * x for x in w)]
    lines += [" | ".join(v.rjust(w[i]) for i, v in enumerate(r)) for r in rows]
    return "\n".join(lines)


def report(args, runs, inf, llc):
    summary = {}
    for mode in args.modes:
        mruns = [r for r in runs if r["mode"] == mode]
        get = lambda side, r: (side or {}).get("runs", {}).get(r["name"], {})  # noqa: E731
        base_i = next((get(inf, r).get("tok_s") for r in mruns if r["concurrency"] == 1), None)
        base_l = next((get(llc, r).get("tok_s") for r in mruns if r["concurrency"] == 1), None)
        rows, srows = [], []
        for r in mruns:
            a, b = get(inf, r), get(llc, r)
            ti, tl = a.get("tok_s"), b.get("tok_s")
            row = {"concurrency": r["concurrency"], "inferd_tok_s": ti,
                   "inferd_x_c1": ratio(ti, base_i), "llamacpp_tok_s": tl,
                   "llamacpp_x_c1": ratio(tl, base_l), "inferd_over_llamacpp": ratio(ti, tl),
                   "inferd_error": a.get("error"), "llamacpp_error": b.get("error")}
            cells = [str(r["concurrency"]),
                     "ERR" if a.get("error") else fmt(ti), fmt(row["inferd_x_c1"], 2, "x"),
                     "ERR" if b.get("error") else fmt(tl), fmt(row["llamacpp_x_c1"], 2, "x"),
                     fmt(row["inferd_over_llamacpp"], 2)]
            if mode == "plain":
                row.update(inferd_ttft_median_s=a.get("ttft_median_s"),
                           llamacpp_ttft_median_s=b.get("ttft_median_s"))
                cells += [fmt(a.get("ttft_median_s"), 3), fmt(b.get("ttft_median_s"), 3)]
            else:
                for side, d in (("inferd", a), ("llamacpp", b)):
                    for k in ("ttft_first_s", "ttft_later_median_s", "ttft_later_max_s",
                              "later_over_first"):
                        row[f"{side}_{k}"] = d.get(k)
                    cells += [fmt(d.get("ttft_first_s"), 3), fmt(d.get("ttft_later_median_s"), 3),
                              fmt(d.get("ttft_later_max_s"), 3), fmt(d.get("later_over_first"), 2)]
                row["inferd_cached_tokens"] = a.get("cached_tokens")
            rows.append(row)
            srows.append(cells)
        headers = ["conc", "inferd tok/s", "x c=1", "llama.cpp tok/s", "x c=1", "inferd/llama.cpp"]
        if mode == "plain":
            headers += ["inferd TTFT med s", "llama.cpp TTFT med s"]
        else:
            for side in ("inferd", "llama.cpp"):
                headers += [f"{side} TTFT first", "later med", "later max", "later/first"]
        print(f"\n== {mode}: ", end="")
        if mode == "plain":
            print(f"{args.prompt_tokens}-token prompts, {args.max_tokens} output tokens each, "
                  f"all submitted at once")
        else:
            print(f"{args.shared_tokens}-token shared prefix + {args.suffix_tokens}-token "
                  f"suffixes, {args.max_tokens} output tokens each; request 0 first, the "
                  f"rest at its first token")
        print(table(headers, srows))
        # targets, for inferd (llama.cpp's figures are shown for reference)
        up = [f"c={row['concurrency']} {row['inferd_x_c1']:.2f}x "
              f"{'ok' if row['inferd_x_c1'] >= 3.0 else 'MISS'}"
              for row in rows if row["concurrency"] >= 8 and row["inferd_x_c1"] is not None]
        if up:
            print("inferd speed-up vs c=1 (target >= 3x at c >= 8): " + "; ".join(up))
        lof = [f"c={row['concurrency']} {row['inferd_later_over_first']:.2f} "
               f"{'ok' if row['inferd_later_over_first'] <= 0.2 else 'MISS'}"
               for row in rows if row.get("inferd_later_over_first") is not None]
        if lof:
            print("inferd later/first TTFT (target <= 0.2): " + "; ".join(lof))
        summary[mode] = rows
    return summary


# -------------------------------------------------------------------- main --

def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {s!r}")
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers")
    return v


def mode_list(s):
    v = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in v if x not in ("plain", "shared")]
    if not v or bad:
        raise argparse.ArgumentTypeError(f"modes are plain and shared, not {bad or s!r}")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=default_model(),
                    help="GGUF file (default: $INFERD_MODEL or the installed default model)")
    ap.add_argument("--concurrency", type=int_list, default=[1, 2, 4, 8, 16, 32],
                    help="levels, comma-separated (default 1,2,4,8,16,32)")
    ap.add_argument("--modes", type=mode_list, default=["plain", "shared"],
                    help="plain,shared (default both)")
    ap.add_argument("--only", choices=["inferd", "llamacpp"], help="run one engine only")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="plain-mode prompt length")
    ap.add_argument("--shared-tokens", type=int, default=1000, help="shared-mode prefix length")
    ap.add_argument("--suffix-tokens", type=int, default=24, help="shared-mode suffix length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads, both engines")
    ap.add_argument("--inferd", default=str(ROOT / "build"), help="inferd build directory")
    ap.add_argument("--llama-server", default="/tmp/llamacpp-build/bin/llama-server")
    ap.add_argument("--llama-args", default="",
                    help="extra llama-server arguments, space-separated "
                         "(write --llama-args='-fa off' when they start with '-')")
    ap.add_argument("--inferd-args", default="",
                    help="extra inferd bench load arguments, space-separated "
                         "(--inferd-args='--max-batched-tokens 64')")
    ap.add_argument("--json", help="write config, workload, raw and summary results here")
    ap.add_argument("--workload-out", help="keep inferd's workload file at this path")
    ap.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds to wait for llama-server's /health")
    ap.add_argument("--request-timeout", type=float, default=900.0,
                    help="seconds a llama.cpp level's requests may take")
    ap.add_argument("--inferd-timeout", type=float, default=7200.0,
                    help="seconds the whole inferd run may take")
    args = ap.parse_args()
    args.llama_args = args.llama_args.split()
    args.inferd_args = args.inferd_args.split()
    for k in ("max_tokens", "prompt_tokens", "shared_tokens", "suffix_tokens", "threads"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if not os.path.isfile(args.model):
        ap.error(f"model {args.model} not found")

    runs = make_workload(args)
    inf = llc = None
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench_concurrency.") as tmp:
        if args.only != "llamacpp":
            try:
                inf = run_inferd(args, runs, tmp)
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                log(f"inferd: {e}")
                inf = {"error": str(e), "runs": {r["name"]: {"error": str(e)} for r in runs}}
                failed = True
        if args.only != "inferd":
            try:
                llc = run_llamacpp(args, runs, tmp)
            except RuntimeError as e:
                log(f"llama.cpp: {e}")
                llc = {"error": str(e), "runs": {r["name"]: {"error": str(e)} for r in runs}}
                failed = True
        print(f"model {args.model}; threads {args.threads}; seed {args.seed}; "
              f"tokens/s are aggregate output tokens per second; TTFT in seconds"
              + (f"; inferd KV cache {inf['kv_tokens']} tokens" if inf and inf.get("kv_tokens") else ""))
        summary = report(args, runs, inf, llc)
    failed = failed or any(r.get("error") for side in (inf, llc) if side
                           for r in side["runs"].values())
    if args.json:
        cfg = {k: v for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps(
            {"config": cfg, "workload": runs, "inferd": inf, "llamacpp": llc,
             "summary": summary}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
