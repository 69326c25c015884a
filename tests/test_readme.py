"""The README's first command keeps working: `deploy/setup.sh run` (with
everything installed and built already, as the test command leaves it)
serves the default model over HTTP, which answers the question it is asked,
and stops cleanly on SIGTERM."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

from conftest import BUILD, ROOT


def test_setup_run_serves_and_answers():
    env = dict(os.environ, INFERD_BUILD_DIR=str(BUILD))
    # the README's command, on a free port so a running daemon cannot clash
    p = subprocess.Popen([str(ROOT / "deploy" / "setup.sh"), "run", "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         stdin=subprocess.DEVNULL)
    try:
        port, deadline, log = None, time.time() + 600, ""
        while port is None and time.time() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            log += line
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, log[-3000:]
        body = json.dumps({"model": "qwen2.5-coder-1.5b-instruct", "max_tokens": 8,
                           "temperature": 0, "messages": [{"role": "user", "content":
                           "What is the capital of France? Answer in one word."}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./deploy/setup.sh run", "./deploy/setup.sh test"]
