"""Shared pytest fixtures: where the build and the fixture models are."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / os.environ.get("INFERD_BUILD_DIR", "build")
FIXTURES = ROOT / "tests" / "fixtures" / "models"


@pytest.fixture(scope="session")
def inferd():
    exe = BUILD / "server" / "inferd"
    if not exe.exists():
        pytest.fail(f"{exe} not built: run deploy/setup.sh first")
    return str(exe)
