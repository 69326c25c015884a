"""Runs the C unit tests (meson test) so that one pytest summary covers
every test the project has."""
import subprocess

import pytest

from conftest import builds


@pytest.mark.parametrize("build", builds(), ids=lambda b: b.name)
def test_meson_unit_tests(build):
    r = subprocess.run(["meson", "test", "-C", str(build), "--print-errorlogs", "--suite", "unit"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
