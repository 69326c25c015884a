"""`inferd bench serve` against a test double: a small OpenAI-style streaming
server, started here, that sends the first token after TTFT seconds and
then one every ITL seconds. The figures the benchmark reports must match
the delays the double was told to use, and its JSON and PNG must be sound.
"""
import json
import subprocess
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TTFT = 0.2
ITL = 0.02
PNG_SIG = b"\x89PNG\r\n\x1a\n"


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of connects must not hit SYN retries

    def __init__(self, mode):
        self.mode = mode  # "chunked" (keep-alive) or "close" (body ends at EOF)
        self.usage = True
        self.requests = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/v1/models":
            return self.reply_json(404, {"error": {"message": "not found"}})
        self.reply_json(200, {"object": "list", "data": [{"id": "double", "object": "model"}]})

    def do_POST(self):
        srv = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((self.path, dict(self.headers), req))
        if req.get("model") != "double":
            return self.reply_json(404, {"error": {"message": "model 'x' does not exist",
                                                   "type": "invalid_request_error"}})
        chat = self.path.endswith("/chat/completions")
        n = req["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if srv.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()

        def send(text):
            data = text.encode()
            if srv.mode == "chunked":
                data = b"%x\r\n%s\r\n" % (len(data), data)
            self.wfile.write(data)
            self.wfile.flush()

        # A comment and a role-only chunk carry no text: TTFT must skip them.
        send(": ping\r\n\r\n")
        if chat:
            send('data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        threading.Event().wait(TTFT)
        for i in range(n):
            if i:
                threading.Event().wait(ITL)
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            send("data: " + json.dumps({"choices": [choice]}) + "\r\n\r\n")
        if srv.usage:
            prompt = req.get("prompt")
            p = len(prompt) if isinstance(prompt, list) else 5
            send("data: " + json.dumps({"choices": [], "usage": {
                "prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}) + "\n\n")
        send("data: [DONE]\n\n")
        if srv.mode == "chunked":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        else:
            self.close_connection = True


@pytest.fixture
def fake():
    servers = []

    def start(mode="chunked"):
        s = FakeOpenAI(mode)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def bench(inferd, srv, *args, timeout=60):
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    return subprocess.run([inferd, "bench", "serve", "--base-url", url, *args],
                          capture_output=True, text=True, timeout=timeout)


def png_chunks(data):
    """Chunk types of a PNG whose CRCs all check out."""
    assert data[:8] == PNG_SIG
    pos, types = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        body = data[pos + 4:pos + 8 + n]
        assert zlib.crc32(body) == int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big")
        types.append(body[:4])
        pos += 12 + n
    return types


def test_completions_figures_match_the_delays(inferd_any, fake, tmp_path):
    srv = fake("chunked")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = bench(inferd_any, srv, "--num-prompts", "8", "--concurrency", "4", "--input-len", "16",
              "--output-len", "10", "--ignore-eos", "--seed", "7", "--json", str(out_json),
              "--plot", str(out_png))
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stdout and "model double" in r.stdout  # found through GET /v1/models
    d = json.loads(out_json.read_text())
    assert d["model"] == "double" and len(d["runs"]) == 1
    run = d["runs"][0]
    assert run["completed"] == 8 and run["failed"] == 0 and run["max_concurrency"] == 4
    assert run["total_output_tokens"] == 80 and run["total_input_tokens"] == 8 * 16
    assert run["output_lens"] == [10] * 8
    assert abs(run["median_ttft_ms"] - TTFT * 1e3) < 60
    assert abs(run["median_itl_ms"] - ITL * 1e3) < 10
    assert abs(run["mean_tpot_ms"] - ITL * 1e3) < 10
    e2e = (TTFT + 9 * ITL) * 1e3
    assert e2e - 10 < run["median_e2el_ms"] < e2e + 150
    # Two waves of four: about twice one request's latency.
    assert 2 * e2e / 1e3 - 0.05 < run["duration_s"] < 2 * e2e / 1e3 + 1.0
    assert abs(run["output_throughput"] - 80 / run["duration_s"]) < 1e-6 * 80 / run["duration_s"] + 1e-6

    # What the server was sent: token-id prompts from the range, streamed, with usage.
    bodies = [b for p, _, b in srv.requests]
    assert len(bodies) == 8
    for b in bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["ignore_eos"] is True and b["max_tokens"] == 10 and b["temperature"] == 0
        assert len(b["prompt"]) == 16 and all(1000 <= t < 20000 for t in b["prompt"])

    png = out_png.read_bytes()
    assert png_chunks(png) == [b"IHDR", b"IDAT", b"IEND"]
    assert len(zlib.decompress(png[8 + 25 + 8:-12 - 4])) > 0


def test_chat_sweep_without_usage_over_closed_connections(inferd_any, fake, tmp_path):
    srv = fake("close")
    srv.usage = False  # tokens then come from counting the content chunks
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    r = bench(inferd_any, srv, "--endpoint", "/v1/chat/completions", "--model", "double",
              "--api-key", "sk-test", "--num-prompts", "4", "--sweep-concurrency", "1,4",
              "--output-len", "5", "--input-len", "6", "--warmup", "1", "--json", str(out_json),
              "--plot", str(out_png))
    assert r.returncode == 0, r.stderr
    runs = json.loads(out_json.read_text())["runs"]
    assert [x["max_concurrency"] for x in runs] == [1, 4]
    for x in runs:
        assert x["completed"] == 4 and x["failed"] == 0 and x["total_output_tokens"] == 20
        assert abs(x["median_ttft_ms"] - TTFT * 1e3) < 60
        assert abs(x["median_itl_ms"] - ITL * 1e3) < 10
    # Concurrency 4 runs the four at once: about four times the request rate of 1.
    assert runs[1]["request_throughput"] > 2.5 * runs[0]["request_throughput"]
    assert png_chunks(out_png.read_bytes())[0] == b"IHDR"
    path, headers, body = srv.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["messages"][0]["role"] == "user"
    assert len(body["messages"][0]["content"].split()) == 6


def test_failures_are_counted_and_explained(inferd_any, fake, tmp_path):
    srv = fake("chunked")
    out_json = tmp_path / "f.json"
    r = bench(inferd_any, srv, "--model", "x", "--num-prompts", "3", "--json", str(out_json))
    assert r.returncode == 1  # nothing succeeded
    assert "3 request(s) failed" in r.stderr and "HTTP 404: model 'x' does not exist" in r.stderr
    run = json.loads(out_json.read_text())["runs"][0]
    assert run["completed"] == 0 and run["failed"] == 3 and run["mean_ttft_ms"] is None
    # A port with nothing listening: a connection error, not a crash.
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    r = subprocess.run([inferd_any, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                        "--model", "double", "--num-prompts", "2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "connection" in r.stderr.lower()


def test_bad_flags_are_usage_errors(inferd):
    for args in (["--request-rate", "0"], ["--token-range", "5:5"], ["--base-url", "ftp://x"],
                 ["--extra-body", "[1]"], ["--concurrency", "0"]):
        r = subprocess.run([inferd, "bench", "serve", *args], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 2, (args, r.stderr)
    r = subprocess.run([inferd, "bench", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--sweep-concurrency" in r.stdout
