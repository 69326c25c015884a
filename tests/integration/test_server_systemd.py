"""The daemon under a service manager, with the manager played by the test:
sd_notify's datagrams on $NOTIFY_SOCKET (READY=1 once loaded, WATCHDOG=1
every half $WATCHDOG_USEC, STOPPING=1 on SIGTERM), and socket activation
(a listening socket handed over as fd 3 with LISTEN_FDS / LISTEN_PID).
Also the bounded stream buffer: a client that stops reading has its
request cancelled, the reason logged and its KV blocks freed."""
import json
import os
import signal
import socket
import subprocess
import time

from inferd_serve_harness import CHATML, EXE, TINY, Server, start_server, tiny_args


def recv_until(sock, want, timeout):
    """Datagrams until one contains want; returns them all."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if want in msg:
            return got
    raise AssertionError(f"no {want!r} from the daemon within {timeout} s; got {got}")


def test_notify_watchdog_and_socket_activation(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    lfd = listener.fileno()

    def as_fd3():  # what systemd does before exec
        os.dup2(lfd, 3)

    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000",
               LISTEN_FDS="1")
    log = open(tmp_path / "serve.log", "wb")
    # LISTEN_PID and WATCHDOG_PID must name the daemon itself: the shell
    # exports its own pid, then becomes inferd
    p = subprocess.Popen(["sh", "-c", 'export LISTEN_PID=$$ WATCHDOG_PID=$$; exec "$@"', "sh",
                          str(EXE), "serve", str(TINY), "--chat-template", str(CHATML),
                          "--port", "1"],
                         env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         close_fds=False, preexec_fn=as_fd3)
    try:
        listener.close()  # the daemon holds its copy
        got = recv_until(notify, "READY=1", 60)
        # served on the inherited socket, not on --port 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        # pings every half interval while the (idle) engine is healthy
        t0 = time.monotonic()
        recv_until(notify, "WATCHDOG=1", 3)
        recv_until(notify, "WATCHDOG=1", 3)
        assert time.monotonic() - t0 < 2.5
        p.send_signal(signal.SIGTERM)
        got = recv_until(notify, "STOPPING=1", 10)
        assert p.wait(timeout=30) == 0
        text = (tmp_path / "serve.log").read_text()
        assert "socket(s) from systemd" in text, text[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        notify.close()


def test_reader_that_stops_reading_is_cancelled(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--max-stream-buffer", "8K",
                     "--send-timeout", "30")
    try:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # a small receive window: the kernel cannot absorb the whole stream
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        c.connect(("127.0.0.1", s.port))
        # about 9 MB of stream (16 x 400 chunks of 1.4 KB with 20 logprobs
        # each): more than the kernel's socket buffers hold
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                           "max_tokens": 400, "n": 16, "ignore_eos": True, "stream": True,
                           "logprobs": True, "top_logprobs": 20}).encode()
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # read nothing: the request must be cancelled and its blocks freed,
        # while the daemon keeps answering others
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "not reading its stream" in s.stderr():
                break
            time.sleep(0.1)
        assert "not reading its stream" in s.stderr(), s.stderr()[-2000:]
        assert s.metric("inferd:stream_cancelled_slow_reader_total") >= 1
        used = s.wait_metric("inferd:kv_cache_blocks", lambda v: v == 0, timeout=5,
                             state="used")
        assert used == 0
        assert s.get("/health").status_code == 200
        c.close()
    finally:
        assert s.stop() == 0
