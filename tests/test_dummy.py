"""--load-format dummy: a model's shape from its config alone, with random
weights. The committed configs (tests/configs/) have the parameter counts
of the real checkpoints, and a dummy model runs the engine end to end."""
import json
import re
import subprocess

import pytest

from conftest import ROOT, builds

CONFIGS = ROOT / "tests" / "configs"
# Parameter counts of the published checkpoints (Hugging Face model cards).
REAL_PARAMS = {"llama3-8b.json": 8030261248, "phi3-mini-4k.json": 3821079552}


@pytest.mark.parametrize("name", sorted(REAL_PARAMS))
def test_config_shapes_match_the_real_models(inferd, name):
    r = subprocess.run([inferd, "inspect", "--load-format", "dummy", str(CONFIGS / name)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"parameters\s+(\d+)", r.stdout)
    assert m and int(m.group(1)) == REAL_PARAMS[name], r.stdout


@pytest.mark.parametrize("build", builds(), ids=lambda b: b.name)
@pytest.mark.parametrize("fixture", ["qwen2", "phi3", "llama3"])
def test_dummy_model_runs_the_engine(build, fixture, tmp_path):
    cfg = ROOT / "tests" / "fixtures" / "models" / fixture / "config.json"
    out = tmp_path / "bench.json"
    r = subprocess.run([str(build / "inferd"), "bench", "engine", "--load-format", "dummy",
                        str(cfg), "--batch", "1,3", "--prompt", "8", "--gen", "4",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower().replace("inferd", "")
    json.loads(text)


def test_dummy_refuses_a_missing_config(inferd, tmp_path):
    r = subprocess.run([inferd, "bench", "engine", "--load-format", "dummy",
                        str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "none.json" in r.stderr, r.stderr
