"""Runs the C unit tests (meson test) so that one pytest summary covers
every test the project has."""
import subprocess

from conftest import BUILD


def test_meson_unit_tests():
    r = subprocess.run(["meson", "test", "-C", str(BUILD), "--print-errorlogs"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
