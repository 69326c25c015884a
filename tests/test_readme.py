"""The README's first command keeps working: `deploy/setup.sh run` (with
everything installed and built already, as the test command leaves it)
runs the default model, which answers the question it is asked."""
import os
import subprocess

from conftest import BUILD, ROOT


def test_setup_run_answers():
    env = dict(os.environ, INFERD_BUILD_DIR=str(BUILD))
    r = subprocess.run([str(ROOT / "deploy" / "setup.sh"), "run"], capture_output=True, text=True,
                       timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./deploy/setup.sh run", "./deploy/setup.sh test"]
