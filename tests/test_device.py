"""--device: a build with CUDA still runs on a machine without a GPU (the
CPU is the default), and asking for cuda where there is none, or in a
build without CUDA, fails at once with a message that says which."""
import subprocess

import pytest

from conftest import ROOT

TINY = ROOT / "tests" / "fixtures" / "models" / "qwen2"


def has_gpu():
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU: tests/gpu/run.sh covers it")
@pytest.mark.parametrize("cmd", [["bench", "engine", "--batch", "1", "--prompt", "4", "--gen", "2"],
                                 ["serve", "--port", "0"]])
def test_cuda_without_a_gpu_is_a_clear_error(inferd, cmd):
    r = subprocess.run([inferd, *cmd, "--device", "cuda", str(TINY)], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "no CUDA device" in r.stderr or "built without CUDA" in r.stderr, r.stderr


def test_cpu_is_the_default_and_bad_values_are_usage_errors(inferd):
    r = subprocess.run([inferd, "bench", "engine", "--device", "cpu", str(TINY), "--batch", "1",
                        "--prompt", "4", "--gen", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([inferd, "bench", "engine", "--device", "gpu", str(TINY)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cpu or cuda" in r.stderr, r.stderr
    r = subprocess.run([inferd, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "--device" in r.stdout
