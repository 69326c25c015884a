"""Short libFuzzer runs over the parsers of untrusted bytes (json, gguf,
safetensors, the tokenizer, chat templates, the HTTP request path and the
API's request decoding), as DESIGN.md asks of CI. The fuzz build (clang, ASan, UBSan)
is made by deploy/setup.sh test; without clang these tests are skipped.
Each run starts from the committed seed corpus, writes new inputs to a
temporary directory only, and must end without a crash."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

FUZZ_BUILD = ROOT / os.environ.get("INFERD_FUZZ_BUILD_DIR", "build-fuzz")
SECONDS = int(os.environ.get("INFERD_FUZZ_SECONDS", "20"))


@pytest.mark.parametrize("target", ["json", "gguf", "safetensors", "tokenizer", "tokenizer_json",
                                    "chat_template", "http", "api_request"])
def test_fuzz_parser(target, tmp_path):
    exe = FUZZ_BUILD / "tests" / "fuzz" / f"fuzz_{target}"
    if not exe.exists():
        pytest.skip(f"{exe} not built (needs clang; deploy/setup.sh test builds it)")
    work = tmp_path / "corpus"
    shutil.copytree(ROOT / "tests" / "fuzz" / "corpus" / target, work)
    r = subprocess.run([str(exe), f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
                        "-print_final_stats=1", str(work)],
                       capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "Done" in r.stderr, r.stderr[-2000:]
