"""Harness for the `inferd serve` integration tests (test_server_*.py).

A fixture starts the real daemon on a loopback port (--port 0; the port is
read from the `listening on http://HOST:PORT` line it logs), waits for
GET /ready, and kills it at teardown. Everything a test needs to talk to it
lives here: the openai clients, plain HTTP, raw sockets, the SSE and
Prometheus parsers, and validation of every JSON body against
proto/openapi.yaml.

Test modules import these helpers as `from inferd_serve_harness import ...`
(this module registers itself under that name): the name `conftest` is
shared with tests/conftest.py, whose names the other test files import, so
this module also re-exports those names (see the end of the file).
"""
import contextlib
import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = ROOT / os.environ.get("INFERD_BUILD_DIR", "build")
EXE = BUILD / "inferd"
MODELS = ROOT / "tests" / "fixtures" / "models"
TINY = MODELS / "qwen2"                  # 256-token vocab, context 512, random weights
TINY_CTX = 512
CHATML = ROOT / "tests" / "fixtures" / "chatml.jinja"
OPENAPI = ROOT / "proto" / "openapi.yaml"

# Every test of these modules gets this many seconds before SIGALRM fails it,
# so a daemon that stops answering can never hang the suite.
TEST_DEADLINE_S = 240


def default_model():
    """The default model (Qwen2.5-Coder-1.5B-Instruct GGUF) as deploy/setup.sh
    installs it; the tests that need it skip when it is absent, as
    tests/test_run.py does."""
    p = os.environ.get("INFERD_MODEL") or str(
        pathlib.Path(os.environ.get("XDG_DATA_HOME") or pathlib.Path.home() / ".local" / "share")
        / "inferd" / "default.gguf")
    return pathlib.Path(p)


needs_default_model = pytest.mark.skipif(
    not default_model().exists(),
    reason="the default model is not installed (deploy/setup.sh installs it)")


# --------------------------------------------------------------- the schema

def _load_spec():
    import yaml
    with open(OPENAPI) as f:
        return yaml.safe_load(f)


SPEC = _load_spec()
SPEC_URI = "urn:inferd:openapi"


def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
    return Registry().with_resource(
        SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012))


_REGISTRY = _registry()
_VALIDATORS = {}


def _validator(pointer):
    from jsonschema import Draft202012Validator
    v = _VALIDATORS.get(pointer)
    if v is None:
        v = Draft202012Validator({"$ref": SPEC_URI + "#" + pointer}, registry=_REGISTRY)
        _VALIDATORS[pointer] = v
    return v


def _fail_validation(what, obj, errors):
    from jsonschema.exceptions import best_match
    e = best_match(errors)
    where = "/".join(str(p) for p in e.absolute_path)
    raise AssertionError(f"{what}: {e.message} (at /{where})\nbody: "
                         f"{json.dumps(obj)[:2000]}")


def check_schema(name, obj):
    """Validates obj against components/schemas/<name> of proto/openapi.yaml."""
    assert name in SPEC["components"]["schemas"], f"no schema {name} in openapi.yaml"
    errors = list(_validator("/components/schemas/" + name).iter_errors(obj))
    if errors:
        _fail_validation(f"response does not match schema {name}", obj, errors)
    return obj


def _esc(s):
    return s.replace("~", "~0").replace("/", "~1")


def check_response(method, route, resp, media="application/json"):
    """Validates an HTTP response (status, body) against what openapi.yaml says
    `method route` answers: the status must be documented for the route
    (errors of the HTTP layer, which any route may answer, excepted) and the
    body must match its schema. Returns the parsed JSON body."""
    op = SPEC["paths"][route][method.lower()]
    status = str(resp.status_code)
    body = resp.json()
    layer_errors = {"400", "401", "404", "405", "408", "413", "414", "431", "503"}
    if status not in op["responses"]:
        assert status in layer_errors, f"{method} {route}: status {status} is not in openapi.yaml"
        return check_schema("ErrorResponse", body)
    r = op["responses"][status]
    pointer = f"/paths/{_esc(route)}/{method.lower()}/responses/{status}"
    if "$ref" in r:
        pointer = r["$ref"][1:]
        r = SPEC["components"]["responses"][r["$ref"].rsplit("/", 1)[1]]
    assert media in r["content"], f"{method} {route} {status}: no {media} in openapi.yaml"
    errors = list(_validator(f"{pointer}/content/{_esc(media)}/schema").iter_errors(body))
    if errors:
        _fail_validation(f"{method} {route} {status} does not match openapi.yaml", body, errors)
    return body


def check_error(resp, status, param="__any__", code="__any__", type_="invalid_request_error"):
    """An OpenAI error response: status, schema, and the fields named."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    check_schema("ErrorResponse", body)
    err = body["error"]
    if type_ is not None:
        assert err["type"] == type_, err
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------- the daemon

_LIVE = []  # every daemon started, killed at the end whatever happens


class Server:
    """One `inferd serve` process on 127.0.0.1:<free port>."""

    def __init__(self, model, *args, name="tiny", keys=(), tls=None, log_dir=None, env=None,
                 exe=None):
        self.exe = pathlib.Path(exe) if exe else EXE
        self.model = str(model)
        self.name = name
        self.keys = list(keys)
        self.tls = tls                      # (cert, key) or None
        self.args = [str(a) for a in args]
        self.env = env
        self.log_dir = pathlib.Path(log_dir or "/tmp")
        self.proc = None
        self.port = None
        self.scheme = "https" if tls else "http"
        self.host = "127.0.0.1"

    # -- lifecycle
    def command(self):
        cmd = [str(self.exe), "serve", self.model, "--host", self.host, "--port", "0",
               "--served-model-name", self.name, *self.args]
        for k in self.keys:
            cmd += ["--api-key", k]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return cmd

    def start(self, timeout=120):
        if not self.exe.exists():
            pytest.fail(f"{self.exe} not built: run deploy/setup.sh (or ninja -C {BUILD})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"inferd-serve-{os.getpid()}-{len(_LIVE)}.log"
        self.log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        _LIVE.append(self)
        deadline = time.monotonic() + timeout
        pat = re.compile(r"listening on (https?)://([0-9.]+|\[[0-9a-f:]+\]|[A-Za-z0-9.-]+):(\d+)")
        while True:
            m = pat.search(self.stderr())
            if m:
                assert m.group(1) == self.scheme, m.group(0)
                self.port = int(m.group(3))
                break
            if self.proc.poll() is not None:
                pytest.fail(f"inferd serve exited with {self.proc.returncode} before listening:\n"
                            f"$ {' '.join(self.command())}\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"inferd serve did not log 'listening on' within {timeout} s:\n"
                            f"{self.stderr()[-3000:]}")
            time.sleep(0.05)
        while True:  # the model is loaded once /ready says so
            try:
                if self.get("/ready", timeout=5).status_code == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"inferd serve never became ready:\n{self.stderr()[-3000:]}")
            time.sleep(0.1)

    def stderr(self):
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def stop(self, timeout=20):
        """SIGTERM, then SIGKILL after timeout; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(Exception):
            self.log.close()
        if self in _LIVE:
            _LIVE.remove(self)
        return self.proc.returncode

    # -- addresses and clients
    @property
    def url(self):
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def key(self):
        return self.keys[0] if self.keys else None

    def ssl_context(self):
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls[0]))

    def headers(self, key="__default__", extra=None):
        h = {}
        k = self.key if key == "__default__" else key
        if k is not None:
            h["Authorization"] = f"Bearer {k}"
        h.update(extra or {})
        return h

    def http(self, timeout=60):
        import httpx
        return httpx.Client(base_url=self.url, timeout=timeout,
                            verify=self.ssl_context() or True)

    def get(self, path, key="__default__", headers=None, timeout=60):
        with self.http(timeout) as c:
            return c.get(path, headers=self.headers(key, headers))

    def post(self, path, body=None, key="__default__", headers=None, timeout=120, content=None):
        with self.http(timeout) as c:
            if content is not None:
                h = {"Content-Type": "application/json"}
                h.update(self.headers(key, headers))
                return c.post(path, content=content, headers=h)
            return c.post(path, json=body, headers=self.headers(key, headers))

    def stream(self, path, body, key="__default__", headers=None, timeout=120):
        """POSTs a streaming request; returns (response, raw body bytes)."""
        with self.http(timeout) as c:
            with c.stream("POST", path, json=body, headers=self.headers(key, headers)) as r:
                raw = r.read()
                return r, raw

    def openai(self, key="__default__", **kw):
        import httpx
        import openai
        k = self.key if key == "__default__" else key
        return openai.OpenAI(base_url=self.url + "/v1", api_key=k or "unused", max_retries=0,
                             timeout=kw.pop("timeout", 120),
                             http_client=httpx.Client(verify=self.ssl_context() or True), **kw)

    def async_openai(self, key="__default__", max_connections=100, **kw):
        import httpx
        import openai
        k = self.key if key == "__default__" else key
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=k or "unused", max_retries=0,
            timeout=kw.pop("timeout", 120),
            http_client=httpx.AsyncClient(verify=self.ssl_context() or True, limits=limits), **kw)

    def connect(self, timeout=30):
        """A raw socket to the daemon (TLS-wrapped for an HTTPS daemon)."""
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls:
            s = self.ssl_context().wrap_socket(s, server_hostname="localhost")
        return s

    # -- metrics
    def metrics(self):
        r = self.get("/metrics", timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        return parse_prometheus(r.text)

    def metric(self, name, **labels):
        return self.metrics().value(name, **labels)

    def wait_metric(self, name, pred, timeout=2.0, **labels):
        """Polls /metrics until pred(value of name{labels}) holds; returns the
        last value (the caller asserts pred on it)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name, **labels)
            if pred(v) or time.monotonic() > deadline:
                return v
            time.sleep(0.05)

    def tokenize(self, text, add_special_tokens=True):
        r = self.post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]


def start_server(tmp_path_factory, model, *args, **kw):
    kw.setdefault("log_dir", tmp_path_factory.mktemp("serve"))
    return Server(model, *args, **kw).start()


def tiny_args():
    return ["--chat-template", str(CHATML), "--threads", "2"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny fixture model (qwen2, random weights, context 512) with the
    ChatML template, served as "tiny", no key."""
    s = start_server(tmp_path_factory, TINY, *tiny_args(), name="tiny")
    yield s
    rc = s.stop()
    assert rc == 0, f"inferd serve exited {rc} on SIGTERM:\n{s.stderr()[-3000:]}"


ASAN_BUILD_DIR = ROOT / os.environ.get("INFERD_ASAN_BUILD_DIR", "build-asan")


def server_builds():
    out = [BUILD]
    if (ASAN_BUILD_DIR / "inferd").exists():
        out.append(ASAN_BUILD_DIR)
    return out


@pytest.fixture(scope="session", params=server_builds(), ids=lambda b: b.name)
def tiny_any(request, tmp_path_factory):
    """The tiny daemon from each build: release (the `tiny` fixture) and,
    when built, ASan+UBSan, for the tests that send hostile input. A
    sanitizer finding, leaks at exit included, makes its exit status
    non-zero, checked at teardown."""
    if request.param == BUILD:
        yield request.getfixturevalue("tiny")
        return
    s = start_server(tmp_path_factory, TINY, *tiny_args(), name="tiny",
                     exe=request.param / "inferd")
    yield s
    rc = s.stop(timeout=60)
    assert rc == 0, f"inferd serve (ASan) exited {rc}:\n{s.stderr()[-5000:]}"


@pytest.fixture(scope="session")
def big(tmp_path_factory):
    """The default model (GGUF, ~15-20 tokens/s here), served as "qwen"."""
    if not default_model().exists():
        pytest.skip("the default model is not installed (deploy/setup.sh installs it)")
    s = start_server(tmp_path_factory, default_model(), "--threads", "2", "--max-seqs", "64",
                     name="qwen")
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _deadline(request):
    """No test of these modules may hang: SIGALRM fails it after
    TEST_DEADLINE_S seconds."""
    if not request.node.module.__name__.startswith("test_server_"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_DEADLINE_S} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pytest_sessionfinish(session, exitstatus):
    for s in list(_LIVE):
        s.kill()


# ----------------------------------------------------------------- SSE

class SSE:
    """A parsed text/event-stream body: events (the data of each, in order),
    comments (lines starting with ':'), and whether it ended with [DONE]."""

    def __init__(self, raw):
        text = raw.decode("utf-8")
        self.raw = raw
        self.events = []
        self.comments = []
        self.done = False
        # The daemon frames every event as lines ended by \n and a blank line.
        assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-200:]!r}"
        for block in text[:-2].split("\n\n"):
            data = []
            for line in block.split("\n"):
                assert "\r" not in line, f"carriage return in an SSE line: {line!r}"
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("data: "):
                    data.append(line[6:])
                else:
                    raise AssertionError(f"not an SSE data or comment line: {line!r}")
            if not data:
                continue
            assert not self.done, "an event after data: [DONE]"
            payload = "\n".join(data)
            if payload == "[DONE]":
                self.done = True
                continue
            self.events.append(json.loads(payload))
        assert self.done, f"stream did not end with data: [DONE]: {text[-300:]!r}"


def check_chat_stream(raw, n=1, include_usage=False, logprobs=False):
    """Parses and checks a chat.completion.chunk stream; returns
    (texts by index, finish_reason by index, usage or None, chunks)."""
    sse = SSE(raw)
    assert sse.events, "no events"
    for ev in sse.events:
        assert "error" not in ev, f"error event in stream: {ev}"
        check_schema("ChatCompletionChunk", ev)
    first = sse.events[0]
    texts, finish, seen_role = {}, {}, set()
    usage = None
    for i, ev in enumerate(sse.events):
        assert ev["id"] == first["id"] and ev["created"] == first["created"] \
            and ev["model"] == first["model"], "id, created and model differ between chunks"
        if not ev["choices"]:
            assert include_usage, f"a chunk without choices but include_usage is off: {ev}"
            assert i == len(sse.events) - 1, "the usage chunk is not the last before [DONE]"
            assert ev["usage"] is not None
            usage = ev["usage"]
            continue
        assert ev["usage"] is None, f"usage not null on a content chunk: {ev}"
        for ch in ev["choices"]:
            idx = ch["index"]
            assert idx not in finish, f"chunk for index {idx} after its finish chunk"
            d = ch["delta"]
            if idx not in seen_role:
                assert d == {"role": "assistant", "content": ""} or \
                    (d.get("role") == "assistant" and d.get("content") == ""), \
                    f"first chunk of index {idx} has delta {d}"
                seen_role.add(idx)
            else:
                assert "role" not in d, f"role repeated for index {idx}: {d}"
            texts[idx] = texts.get(idx, "") + (d.get("content") or "")
            if ch["finish_reason"] is not None:
                finish[idx] = ch["finish_reason"]
            if logprobs and d.get("content"):
                assert ch.get("logprobs") and ch["logprobs"]["content"], \
                    f"content without logprobs: {ch}"
    assert seen_role == set(range(n)), f"role chunks for {sorted(seen_role)}, want 0..{n - 1}"
    assert set(finish) == set(range(n)), f"finish chunks for {sorted(finish)}, want 0..{n - 1}"
    if include_usage:
        assert usage is not None, "include_usage set but no usage chunk"
    return texts, finish, usage, sse.events


def check_completion_stream(raw, count=1, include_usage=False):
    """Parses and checks a text_completion stream; returns (texts by index,
    finish_reason by index, usage or None, chunks)."""
    sse = SSE(raw)
    for ev in sse.events:
        assert "error" not in ev, f"error event in stream: {ev}"
        check_schema("CompletionChunk", ev)
    first = sse.events[0]
    texts, finish, usage = {}, {}, None
    for i, ev in enumerate(sse.events):
        assert ev["id"] == first["id"] and ev["created"] == first["created"]
        if not ev["choices"]:
            assert include_usage and i == len(sse.events) - 1, f"unexpected chunk {ev}"
            usage = ev["usage"]
            assert usage is not None
            continue
        assert ev["usage"] is None, f"usage not null on a content chunk: {ev}"
        for ch in ev["choices"]:
            idx = ch["index"]
            assert idx not in finish, f"chunk for index {idx} after its finish chunk"
            texts[idx] = texts.get(idx, "") + ch["text"]
            if ch["finish_reason"] is not None:
                finish[idx] = ch["finish_reason"]
    assert set(finish) == set(range(count)), f"finish chunks for {sorted(finish)}"
    if include_usage:
        assert usage is not None, "include_usage set but no usage chunk"
    return texts, finish, usage, sse.events


# ------------------------------------------------------------ Prometheus

_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*")*,?)?\})?'
    r' ([^ ]+)( -?[0-9]+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"')


def _prom_float(s):
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    if s == "NaN":
        return math.nan
    return float(s)


class Metrics:
    def __init__(self, types, helps, samples):
        self.types = types          # family -> counter|gauge|histogram|...
        self.helps = helps          # family -> help text
        self.samples = samples      # [(name, {labels}, value)]

    def find(self, name, **labels):
        return [(lb, v) for n, lb, v in self.samples
                if n == name and all(lb.get(k) == str(x) for k, x in labels.items())]

    def value(self, name, **labels):
        """The sum over the samples of name that carry labels (0 if none):
        a metric absent until first incremented reads as 0."""
        return sum(v for _, v in self.find(name, **labels))

    def has(self, name):
        return any(n == name for n, _, _ in self.samples)


def parse_prometheus(text):
    """Parses the text exposition format 0.0.4 strictly: every line is a
    HELP or TYPE comment or `name{labels} value [timestamp]`, TYPE comes
    before a family's samples, and histograms are well formed (cumulative
    buckets ending with le="+Inf" equal to _count, plus _sum)."""
    types, helps, samples = {}, {}, []
    assert text.endswith("\n"), "metrics text does not end with a newline"
    seen_sample_family = set()
    for line in text.split("\n")[:-1]:
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                fam = parts[2]
                if parts[1] == "TYPE":
                    assert len(parts) == 4 and parts[3] in (
                        "counter", "gauge", "histogram", "summary", "untyped"), line
                    assert fam not in types, f"TYPE given twice for {fam}"
                    assert fam not in seen_sample_family, f"TYPE after samples of {fam}"
                    types[fam] = parts[3]
                else:
                    assert fam not in helps, f"HELP given twice for {fam}"
                    helps[fam] = parts[3] if len(parts) == 4 else ""
            continue
        assert line.strip(), "blank line in metrics"
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels = m.group(1), dict(_LABEL.findall(m.group(2) or ""))
        value = _prom_float(m.group(3))
        fam = name
        for suf in ("_bucket", "_sum", "_count"):
            if name.endswith(suf) and types.get(name[:-len(suf)]) == "histogram":
                fam = name[:-len(suf)]
        seen_sample_family.add(fam)
        samples.append((name, labels, value))
    mx = Metrics(types, helps, samples)
    for fam, t in types.items():
        if t != "histogram":
            continue
        series = {}
        for n, lb, v in samples:
            if n == fam + "_bucket":
                assert "le" in lb, f"bucket without le: {n}{lb}"
                key = tuple(sorted((k, x) for k, x in lb.items() if k != "le"))
                series.setdefault(key, []).append((_prom_float(lb["le"]), v))
        assert series, f"histogram {fam} has no buckets"
        for key, buckets in series.items():
            les = [le for le, _ in buckets]
            assert les == sorted(les), f"{fam}{dict(key)}: buckets not in le order"
            assert les[-1] == math.inf, f"{fam}{dict(key)}: last bucket is not le=\"+Inf\""
            counts = [c for _, c in buckets]
            assert all(a <= b for a, b in zip(counts, counts[1:])), \
                f"{fam}{dict(key)}: buckets not cumulative: {counts}"
            lbl = dict(key)
            cnt = [v for n, lb, v in samples if n == fam + "_count" and lb == lbl]
            sm = [v for n, lb, v in samples if n == fam + "_sum" and lb == lbl]
            assert len(cnt) == 1 and len(sm) == 1, f"{fam}{lbl}: needs one _count and one _sum"
            assert counts[-1] == cnt[0], f"{fam}{lbl}: +Inf bucket {counts[-1]} != _count {cnt[0]}"
            assert sm[0] >= 0
    return mx


# ----------------------------------------------------------- raw HTTP

class RawResponse:
    def __init__(self, status, reason, headers, body):
        self.status_code = status
        self.reason = reason
        self.headers = headers      # lower-case name -> list of values
        self.body = body

    def header(self, name):
        v = self.headers.get(name.lower())
        return v[0] if v else None

    def json(self):
        return json.loads(self.body)

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")


class RawConn:
    """A raw HTTP/1.1 client over one socket: send bytes, read responses one
    at a time (Content-Length, chunked, or to EOF)."""

    def __init__(self, server, timeout=30):
        self.sock = server.connect(timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the daemon")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self):
        status_line = self._line().decode("latin-1")
        m = re.match(r"^HTTP/1\.[01] (\d{3}) ?(.*)$", status_line)
        assert m, f"bad status line {status_line!r}"
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            k, v = line.decode("latin-1").split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        return int(m.group(1)), m.group(2), headers

    def read_response(self, head_only=False):
        status, reason, headers = self.read_head()
        if head_only or status in (100, 204, 304):
            return RawResponse(status, reason, headers, b"")
        te = ",".join(headers.get("transfer-encoding", [])).lower()
        if "chunked" in te:
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                body += self._take(size)
                assert self._take(2) == b"\r\n"
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"][0]))
        else:
            body = self.buf
            self.buf = b""
            with contextlib.suppress(EOFError):
                while True:
                    self._fill()
                    body += self.buf
                    self.buf = b""
        return RawResponse(status, reason, headers, body)

    def read_chunk(self):
        """The next chunk of a chunked body (b"" at the end)."""
        # Consumes nothing until the whole chunk is buffered, so that a
        # socket timeout in between loses no bytes.
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                size = int(self.buf[:i].split(b";")[0], 16)
                if size == 0:
                    k = self.buf.find(b"\r\n\r\n", i)
                    if k >= 0:
                        self.buf = self.buf[k + 4:]
                        return b""
                elif len(self.buf) >= i + 2 + size + 2:
                    data = self.buf[i + 2:i + 2 + size]
                    assert self.buf[i + 2 + size:i + 4 + size] == b"\r\n", "bad chunk framing"
                    self.buf = self.buf[i + 4 + size:]
                    return data
            self._fill()

    # -- a streamed response read piece by piece
    def begin_stream(self):
        """Reads the head of a (streamed) response; then read_piece() gives
        the body as it comes, and self.body collects it."""
        status, reason, headers = self.read_head()
        te = ",".join(headers.get("transfer-encoding", [])).lower()
        self._chunked = "chunked" in te
        self._left = None if self._chunked or "content-length" not in headers \
            else int(headers["content-length"][0])
        self.body = b""
        self.ended = False
        self.eof = False  # the connection closed before the body's end
        return RawResponse(status, reason, headers, b"")

    def read_piece(self):
        """The next bytes of the body (b"" once it has ended)."""
        if self.ended:
            return b""
        if self._chunked:
            data = self.read_chunk()
            if not data:
                self.ended = True
        elif self._left is not None:
            if self._left == 0:
                self.ended = True
                return b""
            if not self.buf:
                self._fill()
            data, self.buf = self.buf[:self._left], self.buf[self._left:]
            self._left -= len(data)
        else:
            if not self.buf:
                try:
                    self._fill()
                except EOFError:
                    self.ended = True
                    return b""
            data, self.buf = self.buf, b""
        self.body += data
        return data

    def read_until(self, pred, timeout=60):
        """Reads the body until pred(body so far) holds; False if the body
        ended or the time ran out first."""
        deadline = time.monotonic() + timeout
        while not pred(self.body):
            if self.ended or time.monotonic() > deadline:
                return False
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.read_piece()
            except (socket.timeout, TimeoutError):
                return False
            except (EOFError, ConnectionResetError):
                self.ended = True
                self.eof = True
                return False
        return True

    def read_rest(self, timeout=120):
        self.read_until(lambda b: False, timeout)
        return self.body

    def closed(self, timeout=5.0):
        """True when the daemon closes the connection within timeout (any
        bytes still in flight are discarded)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False
        except ssl.SSLError:
            return True
        return False

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self):
        """Closes with a reset (SO_LINGER 0), as a crashed client would."""
        import struct
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


def http_request(method, path, body=None, headers=None, host="127.0.0.1"):
    """The bytes of one HTTP/1.1 request (JSON body when body is not bytes)."""
    h = {"Host": host}
    if body is not None:
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    return head.encode("latin-1") + b"\r\n" + (body or b"")


def make_cert(directory):
    """A self-signed certificate for 127.0.0.1/localhost (openssl CLI)."""
    directory = pathlib.Path(directory)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


# This module under a name of its own, for the test modules to import.
sys.modules["inferd_serve_harness"] = sys.modules[__name__]


# tests/conftest.py is also named `conftest`, and the test files of tests/
# collected after this directory import their names from whichever module
# holds that name in sys.modules: this one. Re-export them.
def _reexport_parent():
    spec = importlib.util.spec_from_file_location("_inferd_tests_conftest",
                                                  ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = globals()
    for k, v in vars(mod).items():
        if k.startswith("__") or k in g or callable(getattr(v, "_get_wrapped_function", None)):
            continue
        if type(v).__name__ == "FixtureFunctionDefinition":
            continue
        g[k] = v


_reexport_parent()
