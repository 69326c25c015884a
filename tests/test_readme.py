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


def readme_blocks(lang):
    text = (ROOT / "README.md").read_text()
    section = text.split("## The server: `inferd serve`", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split("```" + lang + "\n")[1:]]


def check_readme_examples(port):
    """The README's curl and openai examples work as printed (on this port)."""
    import sys
    sh = [b for b in readme_blocks("sh") if "curl" in b]
    assert sh, "no curl example in the README's server section"
    script = sh[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the chat answer (one JSON object), then an SSE stream ending in [DONE]
    decoder = json.JSONDecoder()
    chat, end = decoder.raw_decode(out.stdout)
    assert chat["object"] == "chat.completion" and "Paris" in chat["choices"][0]["message"]["content"]
    stream = out.stdout[end:]
    events = [l[6:] for l in stream.splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 32
    py = readme_blocks("python")
    assert py, "no Python example in the README's server section"
    code = py[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 10


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
        check_readme_examples(port)
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
