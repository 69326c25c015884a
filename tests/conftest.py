"""Shared pytest fixtures: where the build and the fixture models are."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / os.environ.get("INFERD_BUILD_DIR", "build")
# The sanitizer build (deploy/setup.sh test makes it); tests that feed
# hostile input run against both when it exists.
ASAN_BUILD = ROOT / os.environ.get("INFERD_ASAN_BUILD_DIR", "build-asan")
FIXTURES = ROOT / "tests" / "fixtures" / "models"

# Sanitizer findings (memory errors, undefined behaviour, leaks) exit with
# codes of their own, distinct from inferd's 1 (runtime error) and 2 (usage).
os.environ.setdefault("ASAN_OPTIONS", "exitcode=86:detect_leaks=1:abort_on_error=0")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:exitcode=87:print_stacktrace=1")


@pytest.fixture(scope="session")
def inferd():
    exe = BUILD / "inferd"
    if not exe.exists():
        pytest.fail(f"{exe} not built: run deploy/setup.sh first")
    return str(exe)


def builds():
    """The build directories to run tests against: release, then ASan."""
    out = [BUILD]
    if (ASAN_BUILD / "inferd").exists():
        out.append(ASAN_BUILD)
    return out


@pytest.fixture(scope="session", params=builds(), ids=lambda b: b.name)
def inferd_any(request):
    """inferd from each build (release and, when built, ASan+UBSan)."""
    return str(request.param / "inferd")
