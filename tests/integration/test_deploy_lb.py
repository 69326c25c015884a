"""inferd behind a real load balancer: deploy/nginx/inferd.conf in front of
two tiny replicas, on loopback.

nginx (Debian's, started as an unprivileged process from a temporary
prefix, its configuration written from deploy/nginx/inferd.conf by
deploy/nginx/render.py with the two replicas as upstreams) proxies 40
concurrent completions, streaming and not, chat and text. Midway one
replica gets SIGTERM. What must hold: every request gets a complete 200
(the streams in flight on the draining replica finish there; the rest go
to the other, nginx retrying what the draining one refused), server-sent
events come through unbuffered, request ids pass through, and the drained
replica exits 0. Skipped, saying why, where nginx is not installed
(deploy/setup.sh installs nginx-light).
"""
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import httpx
import openai
import pytest

from inferd_serve_harness import (CHATML, ROOT, TINY, check_chat_stream, check_completion_stream,
                                  check_schema, start_server)


def _find(name):
    return shutil.which(name) or next(
        (str(p) for p in (pathlib.Path("/usr/sbin") / name, pathlib.Path("/sbin") / name)
         if p.exists()), None)


NGINX = _find("nginx")
HAPROXY = _find("haproxy")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (deploy/setup.sh installs nginx-light)")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (deploy/setup.sh installs it)")

LOAD_DEADLINE_S = 60     # the whole load, SIGTERM and drain included
N_REQUESTS = 40
CONCURRENCY = 16
MAX_TOKENS = 200


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "inferd_nginx_render", ROOT / "deploy" / "nginx" / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _render_module()


@pytest.fixture(autouse=True)
def _deadline():
    """A hung proxy or replica fails the test instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError("test_deploy_lb: over 120 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unprivileged(directory):
    """Popen arguments that run a process as nobody when the tests run as
    root (as CI does), after handing it directory; none otherwise."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    for d, _, files in os.walk(directory):
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
        for f in files:
            os.chown(os.path.join(d, f), nobody.pw_uid, nobody.pw_gid)
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


class Nginx:
    """One nginx master and worker, unprivileged, from a temporary prefix."""

    def __init__(self, upstreams, conf=render.CONF):
        self.upstreams = list(upstreams)
        self.conf = conf
        self.proc = None
        # Not under pytest's tmp_path: when the tests run as root, nginx
        # runs as nobody and must reach its prefix.
        self.prefix = pathlib.Path(tempfile.mkdtemp(prefix="inferd-nginx-"))

    def start(self, timeout=15):
        self.port = free_port()
        self.conf_path = render.write_standalone(self.prefix, self.upstreams,
                                                 f"127.0.0.1:{self.port}", conf=self.conf)
        kw = unprivileged(self.prefix)
        self.log = open(self.prefix / "stderr.log", "wb")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.conf_path), "-e", "stderr"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, **kw)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"nginx exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            if time.monotonic() > deadline:
                self._fail(f"nginx did not listen within {timeout} s")
            time.sleep(0.05)

    def _fail(self, why):
        log = self.stderr()
        self.stop()
        pytest.fail(f"{why}:\n{log}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stderr(self):
        with contextlib.suppress(OSError):
            return (self.prefix / "stderr.log").read_text(errors="replace")[-4000:]
        return ""

    def access_log(self):
        with contextlib.suppress(OSError):
            return (self.prefix / "logs" / "inferd.access.log").read_text(errors="replace")
        return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)      # graceful: finish what is open
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.log.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def render_haproxy(text, upstreams, bind):
    """deploy/haproxy/haproxy.cfg with these replicas and bind address,
    runnable unprivileged (no user/group switch, fewer connections)."""
    lines, servers_done = [], False
    for ln in text.splitlines():
        s = ln.strip()
        if s.startswith("server "):
            if not servers_done:
                indent = ln[:len(ln) - len(ln.lstrip())]
                lines += [f"{indent}server inferd{k + 1} {u}" for k, u in enumerate(upstreams)]
                servers_done = True
            continue
        if s.startswith(("user ", "group ")):
            continue
        if s.startswith("maxconn ") and not servers_done:
            ln = ln.replace(s, "maxconn 1000")    # 2 fds each, within an unprivileged limit
        if s.startswith("bind "):
            ln = ln.replace(s, f"bind {bind}")
        lines.append(ln)
    assert servers_done
    return "\n".join(lines) + "\n"


class HAProxy:
    """One HAProxy process in the foreground, unprivileged, its log on
    stdout."""

    def __init__(self, upstreams):
        self.upstreams = list(upstreams)
        self.proc = None
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="inferd-haproxy-"))

    def start(self, timeout=15):
        self.port = free_port()
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), self.upstreams,
                                      f"127.0.0.1:{self.port}"))
        kw = unprivileged(self.dir)
        self.log = open(self.dir / "out.log", "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, **kw)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"haproxy exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                self._fail(f"haproxy did not listen within {timeout} s")
            time.sleep(0.05)
        # the first /ready checks run at once: every replica passes them
        time.sleep(0.3)
        assert "is DOWN" not in self.stderr(), self.stderr()
        return self

    def _fail(self, why):
        log = self.stderr()
        self.stop()
        pytest.fail(f"{why}:\n{log}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stderr(self):
        with contextlib.suppress(OSError):
            return (self.dir / "out.log").read_text(errors="replace")
        return ""

    access_log = stderr

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)     # soft stop: finish what is open
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------- replicas

def make_paced_model(dest, hidden=512, ff=1536, layers=4, heads=8, kv_heads=2, seed=0):
    """The tiny qwen2 fixture (its tokenizer, vocabulary of 256, context
    512) made wider and deeper, with random f16 weights: 12 M parameters,
    24 MB, written in a fraction of a second. On one thread it makes a
    token in about 2 ms (10 ms for a batch of 16) rather than the
    fixture's 0.03 ms, so a stream lasts long enough to be caught in
    flight by a SIGTERM, and its events come out one at a time."""
    import numpy as np
    from safetensors.numpy import save_file
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY / f, dest / f)
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads,
               layer_types=["full_attention"] * layers, max_window_layers=layers,
               dtype="float16")
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    kv = kv_heads * (hidden // heads)
    t = {"model.embed_tokens.weight": w(256, hidden, scale=1.0),
         "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float16)
        for name, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            t[p + f"self_attn.{name}.weight"] = w(rows, hidden)
            t[p + f"self_attn.{name}.bias"] = w(rows)
        t[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = w(ff, hidden)
        t[p + "mlp.up_proj.weight"] = w(ff, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, ff)
    save_file(t, str(dest / "model.safetensors"))
    return dest


@pytest.fixture(scope="module")
def paced_model(tmp_path_factory):
    return make_paced_model(tmp_path_factory.mktemp("paced-model"))


def replica_args():
    return ["--chat-template", str(CHATML), "--threads", "1", "--kv-cache-memory", "64M",
            "--drain-timeout", "30"]


@pytest.fixture
def replicas(tmp_path_factory, paced_model):
    rs = [start_server(tmp_path_factory, paced_model, *replica_args(), name="tiny")
          for _ in range(2)]
    yield rs
    for r in rs:
        r.stop()


@pytest.fixture
def lb(replicas):
    """nginx in front of the two replicas."""
    if NGINX is None:
        pytest.skip("nginx is not installed (deploy/setup.sh installs nginx-light)")
    n = Nginx([f"127.0.0.1:{r.port}" for r in replicas])
    n.kind = "nginx"
    try:
        yield n.start()
    finally:
        n.stop()


@pytest.fixture(params=[pytest.param("nginx", marks=needs_nginx),
                        pytest.param("haproxy", marks=needs_haproxy)])
def any_lb(request, replicas):
    """nginx, then HAProxy, in front of the two replicas."""
    cls = Nginx if request.param == "nginx" else HAProxy
    n = cls([f"127.0.0.1:{r.port}" for r in replicas])
    n.kind = request.param
    try:
        yield n.start()
    finally:
        n.stop()


# ------------------------------------------------------------ the requests
#
# The load runs in threads that only send and receive; every body is checked
# (schema, [DONE], finish reason, token count) after the load, so that the
# checking does not slow the clients down.

def request_body(i, stream, max_tokens=MAX_TOKENS):
    chat = i % 2 == 0
    body = {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True, "seed": i,
            "temperature": 0.7}
    if chat:
        body["messages"] = [{"role": "user", "content": f"request {i}: tell me a story"}]
    else:
        body["prompt"] = f"request {i}: once upon a time"
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def run_stream(http, i, max_tokens=MAX_TOKENS):
    """One streaming request on the httpx client http; returns its record:
    when its first bytes came (ttfc) and its last (total), in how many
    reads, and the body."""
    path, body = request_body(i, True, max_tokens)
    rid = f"deploy-lb-{i}"
    t0 = time.monotonic()
    with http.stream("POST", path, json=body, headers={"X-Request-Id": rid}) as r:
        pieces = []
        t_first = None
        for piece in r.iter_bytes():      # as it arrives (decoded, if compressed)
            if piece:
                t_first = t_first or time.monotonic()
                pieces.append(piece)
        t_end = time.monotonic()
    return {"i": i, "stream": True, "path": path, "status": r.status_code,
            "type": r.headers.get("content-type", ""), "id": r.headers.get("x-request-id"),
            "sent_id": rid, "t0": t0, "end": t_end, "ttfc": (t_first or t_end) - t0,
            "total": t_end - t0, "pieces": len(pieces), "raw": b"".join(pieces),
            "max_tokens": max_tokens}


def run_plain(client, i):
    """One non-streaming request with the official openai client; returns
    its record."""
    path, body = request_body(i, False)
    rid = f"deploy-lb-{i}"
    t0 = time.monotonic()
    kw = {"model": "tiny", "max_tokens": MAX_TOKENS, "seed": i, "temperature": 0.7,
          "extra_body": {"ignore_eos": True}, "extra_headers": {"X-Request-Id": rid}}
    if path.startswith("/v1/chat"):
        raw = client.chat.completions.with_raw_response.create(messages=body["messages"], **kw)
    else:
        raw = client.completions.with_raw_response.create(prompt=body["prompt"], **kw)
    obj = raw.parse()
    return {"i": i, "stream": False, "path": path, "status": raw.http_response.status_code,
            "id": raw.headers.get("x-request-id"), "sent_id": rid, "t0": t0,
            "end": time.monotonic(), "obj": obj, "raw": raw.http_response.content}


def check_record(r):
    """Every request must have come back whole: a 200, its own id, and a
    body that matches openapi.yaml with all its tokens."""
    assert r["status"] == 200, (r["i"], r["status"], r["raw"][:500])
    assert r["id"] == r["sent_id"], (r["i"], r["id"])
    if r["stream"]:
        assert r["type"].startswith("text/event-stream"), r["type"]
        check = check_chat_stream if r["path"].startswith("/v1/chat") else check_completion_stream
        _, finish, usage, _ = check(r["raw"], include_usage=True)
        assert finish == {0: "length"}, (r["i"], finish)
        assert usage["completion_tokens"] == r["max_tokens"], (r["i"], usage)
    else:
        check_schema("ChatCompletion" if r["path"].startswith("/v1/chat") else "Completion",
                     json.loads(r["raw"]))
        assert r["obj"].choices[0].finish_reason == "length", (r["i"], r["obj"].choices[0])
        assert r["obj"].usage.completion_tokens == MAX_TOKENS, (r["i"], r["obj"].usage)


def unbuffered(r):
    """Whether a stream came through as it was made: its first bytes long
    before its end, and most of its events in a read of their own (a
    buffering proxy hands them over in blocks of kilobytes)."""
    events = r["raw"].count(b"\n\n")
    return r["ttfc"] < r["total"] / 4 and r["pieces"] >= events / 2


@contextlib.contextmanager
def clients(base_url, n):
    """An httpx client for streams and an openai client, each with a pool of
    n connections, both safe to share between threads."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(base_url=base_url, timeout=60, limits=limits) as http, \
            openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                          timeout=60, http_client=httpx.Client(limits=limits)) as client:
        client.chat.completions, client.completions   # noqa: B018 (built once, not per thread)
        yield http, client


def eventually(pred, timeout=5.0):
    """Polls pred until it holds (a log line lands just after the response)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


_ACCESS = re.compile(r" access id=(\S+) .*?(POST|GET) (\S+) status=(\d+)")


def served(replica):
    """{request id: [statuses]} of the POSTs in the replica's access lines."""
    out = {}
    for m in _ACCESS.finditer(replica.stderr()):
        if m.group(2) == "POST":
            out.setdefault(m.group(1), []).append(int(m.group(4)))
    return out


class FakeReplica:
    """A stand-in for a replica in one of the states nginx must handle,
    on a loopback port: "503" answers every request as a draining inferd
    does on a connection it still holds (503, Retry-After, an OpenAI
    error); "reset" reads the request and drops the connection with no
    answer (a replica that died, or closed a keep-alive connection just as
    nginx sent on it); "midstream" starts an event stream, sends one event
    and drops the connection. Records the X-Request-Id of each request."""

    def __init__(self, mode):
        self.mode = mode
        self.ids = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        import struct
        with contextlib.suppress(OSError), c:
            c.settimeout(10)
            while True:        # keep-alive: one request after another
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, body = buf.split(b"\r\n\r\n", 1)
                hdrs = dict(ln.split(b":", 1) for ln in head.split(b"\r\n")[1:] if b":" in ln)
                hdrs = {k.strip().lower(): v.strip() for k, v in hdrs.items()}
                need = int(hdrs.get(b"content-length", b"0"))
                while len(body) < need:
                    body += c.recv(65536)
                if not head.startswith(b"POST "):
                    # HAProxy's GET /ready checks pass: the replica is seen
                    # as ready, as one is until the check after its SIGTERM
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")
                    return
                self.ids.append(hdrs.get(b"x-request-id", b"").decode())
                if self.mode == "503":
                    msg = json.dumps({"error": {
                        "message": "the server is shutting down; retry on another replica",
                        "type": "server_error", "param": None,
                        "code": "server_shutting_down"}}).encode()
                    c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                              b"Content-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(msg) + msg)
                    continue
                if self.mode == "midstream":
                    ev = b'data: {"id":"x","object":"text_completion","choices":[]}\n\n'
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n"
                              + b"%x\r\n" % len(ev) + ev + b"\r\n")
                    time.sleep(0.2)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def one_replica(tmp_path_factory):
    r = start_server(tmp_path_factory, TINY, *replica_args(), name="tiny")
    yield r
    r.stop()


# ------------------------------------------------------------------ tests

def test_sse_is_not_buffered_and_ids_pass_through(any_lb, replicas):
    lb = any_lb
    with clients(lb.url, 4) as (http, _):
        r = run_stream(http, 1, max_tokens=400)
        check_record(r)
        assert unbuffered(r), {k: v for k, v in r.items() if k != "raw"}
        # Without an X-Request-Id the balancer makes one (nginx: 32 hex
        # digits, HAProxy: a UUID), passes it to the replica, and the
        # replica sends it back and logs it.
        resp = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                  "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        rid = resp.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", rid), rid
        assert any(rid in served(rep) for rep in replicas), rid
        logged = f"rid={rid}" if lb.kind == "nginx" else "{" + rid + "}"
        assert eventually(lambda: logged in lb.access_log()), lb.access_log()[-2000:]
        # /metrics is per replica, not through the balancer
        assert http.get("/metrics").status_code == 404
    # a body over the daemon's 8 MiB limit is refused by the balancer itself
    # (which may close the connection before reading it all)
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (8 * 1024 * 1024 + 1) + b" " * 65536)
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]
    s.close()


@needs_nginx
def test_a_buffering_proxy_would_be_caught(replicas, tmp_path):
    """The check above can fail. nginx 1.22 passes a slow stream on as it
    reads it even with proxy_buffering on; what holds one back is
    buffering (the daemon's X-Accel-Buffering ignored) together with gzip
    for event streams, a configuration seen in the wild: the whole stream
    then arrives in one block at its end, and unbuffered() says so."""
    conf = render.CONF.read_text()
    assert "gzip off;" in conf and "proxy_buffering off;" in conf
    conf = conf.replace("gzip off;", "gzip on; gzip_types text/event-stream; gzip_min_length 0;")
    conf = conf.replace("proxy_buffering off;",
                        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;")
    path = tmp_path / "buffering.conf"
    path.write_text(conf)
    n = Nginx([f"127.0.0.1:{replicas[0].port}"], conf=path).start()
    try:
        with clients(n.url, 1) as (http, _):
            r = run_stream(http, 3, max_tokens=400)
        check_record(r)
        assert not unbuffered(r), {k: v for k, v in r.items() if k != "raw"}
    finally:
        n.stop()


def test_sigterm_one_replica_under_load_loses_nothing(any_lb, replicas):
    lb = any_lb
    a, b = replicas
    finished = []
    t_start = time.monotonic()
    with clients(lb.url, CONCURRENCY) as (http, client), \
            concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:

        def job(i):    # half streams, half not; chat and text alternate
            t0 = time.monotonic()
            try:
                r = run_stream(http, i) if i % 4 < 2 else run_plain(client, i)
            except (httpx.HTTPError, openai.APIError) as e:
                r = {"i": i, "sent_id": f"deploy-lb-{i}", "t0": t0, "error": repr(e),
                     "cut": isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError,
                                           openai.APIConnectionError))}
            finished.append(i)
            return r

        # N_REQUESTS requests, CONCURRENCY at a time: the load goes on
        # before, during and after the SIGTERM.
        futures = [pool.submit(job, i) for i in range(N_REQUESTS)]
        deadline = time.monotonic() + 30
        while len(finished) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        while a.metric("inferd:num_requests_in_flight") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert time.monotonic() < deadline, "replica a never had 2 requests in flight"
        t_term = time.monotonic()
        a.signal(signal.SIGTERM)
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result(timeout=LOAD_DEADLINE_S))
            except Exception as e:     # noqa: BLE001 (collected, reported below)
                errors.append(repr(e))
    elapsed = time.monotonic() - t_start
    assert not errors, f"{len(errors)} of {N_REQUESTS} requests raised: {errors[:5]}"
    assert len(results) == N_REQUESTS
    failed = [r for r in results if "error" in r]
    if failed:
        pytest.fail(f"{len(failed)} of {N_REQUESTS} requests failed: "
                    f"{[r['error'] for r in failed][:5]}\n{lb.kind}: {lb.stderr()[-3000:]}\n"
                    f"replica a: {a.stderr()[-2000:]}")
    for r in results:
        check_record(r)
    rc = a.wait(30)
    assert rc == 0, f"the drained replica exited {rc}:\n{a.stderr()[-3000:]}"
    assert "drained; exiting" in a.stderr()
    assert elapsed < LOAD_DEADLINE_S, f"the load took {elapsed:.1f} s"

    # Where each request was answered, from the replicas' access lines: ids
    # pass through nginx, so every 200 is in exactly one replica's log.
    on_a, on_b = served(a), served(b)
    for r in results:
        oks = on_a.get(r["id"], []).count(200) + on_b.get(r["id"], []).count(200)
        assert oks == 1, (r["i"], on_a.get(r["id"]), on_b.get(r["id"]))
    # what was in flight on a when it got SIGTERM finished there, after it
    drained = [r for r in results if 200 in on_a.get(r["id"], []) and r["t0"] < t_term < r["end"]]
    assert drained, "no request in flight on the draining replica finished there"
    # what was sent after the SIGTERM was all answered by b
    late = [r for r in results if r["t0"] > t_term]
    assert late, "the load ended before the SIGTERM"
    assert all(200 in on_b.get(r["id"], []) for r in late), \
        [(r["i"], on_a.get(r["id"]), on_b.get(r["id"])) for r in late]
    # streams came through as they were made, under load too
    streams = [r for r in results if r["stream"]]
    assert all(r["ttfc"] < r["total"] / 2 for r in streams), \
        [(r["i"], round(r["ttfc"], 3), round(r["total"], 3)) for r in streams]
    if lb.kind == "nginx":
        retried = sum(", " in ln.split(" upstream=")[1].split(" upstream_status=")[0]
                      for ln in lb.access_log().splitlines() if " upstream=" in ln)
    else:
        # the /ready check took the stopped replica out
        assert eventually(lambda: "inferd1 is DOWN" in lb.stderr() or
                          "inferd2 is DOWN" in lb.stderr(), 10), lb.stderr()[-3000:]
        retried = len(re.findall(r" \+\d+ ", lb.access_log()))   # retries show as +N
    refused_503 = sum(st.count(503) for st in on_a.values())
    print(f"\n{N_REQUESTS} requests through {lb.kind} in {elapsed:.1f} s: {len(drained)} in "
          f"flight on the replica stopped finished there, {len(late)} sent after its SIGTERM "
          f"went to the other ({retried} retried by {lb.kind}, {refused_503} 503s from the "
          f"draining replica); median time to first chunk "
          f"{sorted(r['ttfc'] for r in streams)[len(streams) // 2] * 1000:.0f} ms of "
          f"{sorted(r['total'] for r in streams)[len(streams) // 2] * 1000:.0f} ms")
    assert b.get("/ready").status_code == 200


PROXIES = [pytest.param(Nginx, id="nginx", marks=needs_nginx),
           pytest.param(HAProxy, id="haproxy", marks=needs_haproxy)]


@pytest.mark.parametrize("proxy", PROXIES)
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_a_post_refused_before_any_answer_is_replayed(one_replica, mode, proxy):
    """Why nginx has `non_idempotent` in proxy_next_upstream, and HAProxy
    `retry-on ... 503` with `option http-buffer-request`: all of the API
    is POST, and without them the client gets the draining replica's 503,
    or a 502 for a connection dropped under the request, instead of the
    next replica's answer. Each request here that met the fake replica
    first was answered by the real one."""
    fake = FakeReplica(mode)
    n = proxy([f"127.0.0.1:{fake.port}", f"127.0.0.1:{one_replica.port}"]).start()
    try:
        with clients(n.url, 1) as (http, _):
            for i in range(6):
                resp = http.post("/v1/completions", headers={"X-Request-Id": f"replay-{i}"},
                                 json={"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                       "ignore_eos": True})
                assert resp.status_code == 200, (i, resp.status_code, resp.text[:300])
                assert resp.json()["usage"]["completion_tokens"] == 4
        assert fake.ids, "nginx never tried the fake replica"
        on_real = served(one_replica)
        assert all(200 in on_real.get(rid, []) for rid in fake.ids), (fake.ids, on_real)
    finally:
        n.stop()
        fake.close()


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_stream_cut_midway_is_not_replayed(one_replica, proxy):
    """Neither balancer retries once part of a response has reached the
    client: a stream that breaks midway ends short (no `data: [DONE]`) and
    is not run again on another replica."""
    fake = FakeReplica("midstream")
    n = proxy([f"127.0.0.1:{fake.port}", f"127.0.0.1:{one_replica.port}"]).start()
    try:
        with clients(n.url, 1) as (http, _):
            for i in range(6):
                rid = f"cut-{i}"
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
                got, broke = b"", False
                try:
                    with http.stream("POST", "/v1/completions", json=body,
                                     headers={"X-Request-Id": rid}) as r:
                        for piece in r.iter_bytes():
                            got += piece
                except httpx.HTTPError:
                    broke = True
                if rid in fake.ids:
                    assert r.status_code == 200 and got.startswith(b"data: ")
                    assert broke or b"[DONE]" not in got, got
                    assert b"[DONE]" not in got, got
                else:
                    assert b"data: [DONE]" in got, got
        assert fake.ids, "nginx never tried the fake replica"
        on_real = served(one_replica)
        assert not any(rid in on_real for rid in fake.ids), (fake.ids, on_real)
    finally:
        n.stop()
        fake.close()


def test_sigterm_delivers_what_was_answered(one_replica):
    """A response the daemon has finished (and logged as 200) must reach
    the client even when SIGTERM comes before the client has read it all:
    the drain has to wait for output to leave, not only for requests to
    end. Through a balancer, a replica that drops those bytes cuts a stream
    nginx can no longer retry. A client that reads slowly makes the case
    certain: the whole answer is queued before it reads a byte."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", one_replica.port))
    body = json.dumps({"model": "tiny", "n": 16, "max_tokens": 200, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 20,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-reader\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
              + body)
    assert eventually(lambda: 200 in served(one_replica).get("slow-reader", []), 20)
    one_replica.signal(signal.SIGTERM)
    got = bytearray()
    with contextlib.suppress(OSError):
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
    s.close()
    head, _, rest = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    assert one_replica.wait(30) == 0
    assert len(rest) == length, f"{len(rest)} of {length} bytes of the body arrived"


def _deploy_files():
    spec = importlib.util.spec_from_file_location("inferd_deploy_files",
                                                  ROOT / "tests" / "test_deploy_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_docker_healthcheck_works_on_a_live_daemon(one_replica):
    """The images' HEALTHCHECK (bash's /dev/tcp, the images have no curl)
    run as is against a daemon: 0 while it answers, not 0 once it is gone."""
    df = _deploy_files()
    cmd = df.healthcheck_command("Dockerfile")
    assert cmd == df.healthcheck_command("Dockerfile.cuda")
    port = f"/dev/tcp/127.0.0.1/{df.daemon_default_port()}"
    assert port in cmd[-1]
    live = [c.replace(port, f"/dev/tcp/127.0.0.1/{one_replica.port}") for c in cmd]
    r = subprocess.run(live, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    dead = [c.replace(port, f"/dev/tcp/127.0.0.1/{free_port()}") for c in cmd]
    assert subprocess.run(dead, capture_output=True, timeout=10).returncode != 0


def test_every_dashboard_metric_is_in_a_live_scrape(one_replica):
    """deploy/grafana/inferd.json against what a daemon really serves (the
    static test checks the names against server/metrics.c)."""
    df = _deploy_files()
    with clients(one_replica.url, 1) as (http, _):
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                  "max_tokens": 4}).status_code == 200
    m = one_replica.metrics()
    names = {n for n, _, _ in m.samples}
    for title, expr in df.dashboard_exprs(df.dashboard()):
        for name in df.promql_metrics(expr):
            assert name in names or name in m.types, f"{title}: {name} is not in /metrics"
    # and the HPA's series
    for rule in df.adapter_rules():
        for name in df.promql_metrics(rule["seriesQuery"]):
            assert name in m.types, name
