"""Multi-node tensor parallelism on loopback: a leader process (node 0: the
HTTP server and the scheduler, half the ranks) and a follower process
(node 1: the other half, `inferd serve --node-rank 1`), the step plans on
the control plane (proto/control.md), the tensors through the TCP
communicator.

- The pair gives the tokens the whole model gives (greedy completions and
  `logits` within fp32 rounding).
- A follower killed mid-run makes the leader stop serving with a clear
  error: the request in flight fails, later ones get 503, /ready says 503
  naming the node, the log says why; nothing hangs.
- The leader gone makes the follower exit non-zero, saying so.
- A follower with another model is refused by the leader, saying why.
"""
import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from inferd_serve_harness import EXE, MODELS, TINY, start_server, tiny_args

MISTRAL = MODELS / "mistral"   # 4 heads, 2 KV heads: 2 ranks per node over 2 nodes


def free_port_pair():
    """A port p with p and p + 1 free (the communicator and the control
    plane)."""
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p >= 65534:
            continue
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
        finally:
            t.close()
    pytest.fail("no free pair of ports")


def follower(model, port, tp, log_path, extra=()):
    log = open(log_path, "wb")
    return subprocess.Popen([str(EXE), "serve", str(model), "--tensor-parallel-size", str(tp),
                             "--nnodes", "2", "--node-rank", "1", "--master-port", str(port),
                             "--threads", "1", *extra],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_exit(p, timeout):
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail("a node did not exit in time")


def test_logits_over_two_processes(tmp_path):
    ref = json.loads((MISTRAL / "reference.json").read_text())
    toks = ",".join(map(str, ref["prompt"]))
    port = free_port_pair()
    f = follower(MISTRAL, port, 4, tmp_path / "follower.log")
    lead = subprocess.run([str(EXE), "logits", str(MISTRAL), "--tokens", toks, "--all",
                           "--tensor-parallel-size", "4", "--nnodes", "2", "--master-port",
                           str(port), "--threads", "1"], capture_output=True, text=True,
                          timeout=120)
    assert lead.returncode == 0, lead.stderr
    assert wait_exit(f, 30) == 0, (tmp_path / "follower.log").read_text()
    whole = subprocess.run([str(EXE), "logits", str(MISTRAL), "--tokens", toks, "--all"],
                           capture_output=True, text=True, timeout=120)
    a = np.array(json.loads(lead.stdout)["sequences"][0]["logits"])
    b = np.array(json.loads(whole.stdout)["sequences"][0]["logits"])
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert rel <= 2e-5, rel
    want = np.array(ref["variants"][next(iter(ref["variants"]))]["logits"])
    assert a.shape == want.shape


@pytest.fixture()
def pair(tmp_path_factory, tmp_path):
    port = free_port_pair()
    f = follower(TINY, port, 2, tmp_path / "follower.log")
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--tensor-parallel-size", "2",
                     "--nnodes", "2", "--master-port", str(port), name="tiny")
    yield s, f, tmp_path / "follower.log"
    if s.alive():
        s.stop(timeout=30)
    if f.poll() is None:
        f.kill()
        f.wait()


def complete(server, prompt, n=10, timeout=60):
    return server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": n,
                                           "temperature": 0, "ignore_eos": True},
                       timeout=timeout)


def test_same_text_as_one_process_then_a_follower_dies(tiny, pair):
    s, f, flog = pair
    for p in ("Multi node", "Another prompt, longer than the first one"):
        r = complete(s, p)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == complete(tiny, p).json()["choices"][0]["text"]
    assert s.get("/ready").status_code == 200
    f.send_signal(signal.SIGKILL)
    f.wait()
    t0 = time.monotonic()
    r = complete(s, "after the follower died", timeout=60)
    assert time.monotonic() - t0 < 30, "the leader waited on a dead follower"
    assert r.status_code == 503, r.text
    assert "node 1" in r.json()["error"]["message"]
    r = complete(s, "and again", timeout=30)
    assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
    ready = s.get("/ready")
    assert ready.status_code == 503 and "node 1" in ready.json()["error"]["message"]
    assert "tensor parallel job stopped: node 1" in s.stderr()


def test_follower_exits_when_the_leader_dies(pair):
    s, f, flog = pair
    assert complete(s, "hello").status_code == 200
    s.kill()
    rc = wait_exit(f, 30)
    assert rc != 0
    assert "leader" in flog.read_text()


def test_follower_with_another_model_is_refused(tmp_path):
    port = free_port_pair()
    f = follower(MISTRAL, port, 2, tmp_path / "follower.log")
    lead = subprocess.run([str(EXE), "logits", str(TINY), "--tokens", "1,2,3",
                           "--tensor-parallel-size", "2", "--nnodes", "2", "--master-port",
                           str(port), "--threads", "1"], capture_output=True, text=True,
                          timeout=60)
    rc = wait_exit(f, 30)
    log = (tmp_path / "follower.log").read_text()
    assert rc != 0
    assert lead.returncode != 0 or "refused" in lead.stderr
    assert "another shape" in log or "refused" in log or "sizes" in log, log
