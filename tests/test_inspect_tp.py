"""`inferd inspect --tp N`: the tensor-parallel plan of the committed
Llama-3 shapes (8B, 70B, 405B; --load-format dummy, nothing allocated),
read back from its per-rank table: the heads, MLP columns and vocabulary
ranges tile the model, the ranks' weights add up to the model's plus what
is replicated, the KV cache shrinks by N (down to one head per rank, then
replicated), and a shape that does not split is refused with exit 2 and
the rule it breaks."""
import re
import subprocess

import pytest

from conftest import ROOT

CONFIGS = ROOT / "tests" / "configs"
GIB = 1024 ** 3


def inspect(inferd, config, *args):
    return subprocess.run([inferd, "inspect", "--load-format", "dummy", str(CONFIGS / config),
                           *args], capture_output=True, text=True, timeout=120)


def rng(s):
    m = re.fullmatch(r"\[(\d+),(\d+)\)(\*?)", s)
    assert m, s
    return int(m.group(1)), int(m.group(2)), m.group(3) == "*"


def field(out, label):
    m = re.search(r"^" + re.escape(label) + r"\s+(.*)$", out, re.M)
    assert m, (label, out)
    return m.group(1)


def parse(out):
    """The model's numbers and the per-rank table."""
    model = {
        "heads": int(field(out, "attention heads")),
        "kv_heads": int(field(out, "key/value heads")),
        "ff": int(field(out, "intermediate size")),
        "vocab": int(field(out, "vocabulary")),
        "layers": int(field(out, "layers")),
        "hidden": int(field(out, "hidden size")),
        "head_dim": int(field(out, "head dim")),
        "weight_bytes": int(re.search(r"\((\d+) bytes\)", field(out, "weights")).group(1)),
    }
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("rank "))
    ranks = []
    for l in lines[head + 1:]:
        cols = l.split()
        if not cols or not cols[0].isdigit():
            break
        q, kv, ff, voc = (rng(c) for c in cols[1:5])
        ranks.append({"rank": int(cols[0]), "q": q, "kv": kv, "ff": ff, "vocab": voc,
                      "weights_gib": float(cols[5]), "kv_per_token": int(cols[6]),
                      "kv_gib": float(cols[7])})
    m = re.search(r"\((\d+) bytes\) = unsharded (\d+) \+ replicated (\d+) \+ vocab padding (\d+)",
                  field(out, "weights, all ranks"))
    sums = dict(zip(["all", "unsharded", "replicated", "padding"], map(int, m.groups())))
    return model, ranks, sums


CASES = [("llama3-8b.json", 1), ("llama3-8b.json", 2), ("llama3-8b.json", 4),
         ("llama3-8b.json", 8), ("llama3-70b.json", 4), ("llama3-70b.json", 8),
         ("llama3-405b.json", 16)]


@pytest.mark.parametrize("config,tp", CASES, ids=[f"{c[:-5]}-tp{t}" for c, t in CASES])
def test_plan_tiles_the_model(inferd, config, tp):
    r = inspect(inferd, config, "--tp", str(tp), "--kv-tokens", "8192")
    assert r.returncode == 0, r.stderr
    model, ranks, sums = parse(r.stdout)
    assert [x["rank"] for x in ranks] == list(range(tp))
    # heads, MLP columns and vocabulary: contiguous ranges that tile the whole
    for key, total in (("q", model["heads"]), ("ff", model["ff"]), ("vocab", model["vocab"])):
        edge = 0
        for x in ranks:
            a, b, _ = x[key]
            assert a == edge and b >= a, (key, x)
            edge = b
        assert edge == total, key
    for x in ranks:
        assert x["q"][1] - x["q"][0] == model["heads"] // tp
        assert x["ff"][1] - x["ff"][0] == model["ff"] // tp
    # KV heads: split while there are enough, then one per rank, replicated
    kv, group = model["kv_heads"], model["heads"] // model["kv_heads"]
    replicated = tp > kv
    for x in ranks:
        a, b, star = x["kv"]
        assert star == replicated
        if replicated:
            assert (a, b) == (x["rank"] // (tp // kv), x["rank"] // (tp // kv) + 1)
        else:
            assert (a, b) == (x["rank"] * kv // tp, (x["rank"] + 1) * kv // tp)
        # GQA: the rank's query heads read only the KV heads it holds
        assert a <= x["q"][0] // group and (x["q"][1] - 1) // group < b
        want = model["layers"] * 2 * (b - a) * model["head_dim"] * 2  # bf16 K and V
        assert x["kv_per_token"] == want
        assert x["kv_gib"] == pytest.approx(8192 * want / GIB, abs=1e-3)
    # weights: the unsharded total is the model's; the ranks hold it plus
    # the replicated norms and KV heads and the vocabulary padding, so N x
    # a rank's share is the model plus that (every rank holds the same
    # here), which stays small: 1.1% for 405B over 16 (its KV heads twice)
    assert sums["unsharded"] == model["weight_bytes"]
    assert sums["all"] == sums["unsharded"] + sums["replicated"] + sums["padding"]
    assert sum(x["weights_gib"] for x in ranks) == pytest.approx(sums["all"] / GIB, abs=tp * 1e-3)
    for x in ranks:
        assert x["weights_gib"] * tp == pytest.approx(sums["all"] / GIB, abs=tp * 1e-3)
        assert model["weight_bytes"] / GIB - tp * 1e-3 <= x["weights_gib"] * tp
        assert x["weights_gib"] * tp <= model["weight_bytes"] / GIB * (1.02 if replicated else 1.001)
    if tp == 1:
        assert sums["replicated"] == 0 and sums["padding"] == 0


def test_405b_over_two_nodes(inferd):
    """The README's 405B numbers: 16 ranks, 8 KV heads each on 2 ranks."""
    r = inspect(inferd, "llama3-405b.json", "--tp", "16")
    assert r.returncode == 0, r.stderr
    model, ranks, sums = parse(r.stdout)
    assert model["vocab"] == 128256 and model["layers"] == 126
    assert "replicated on 2 ranks" in field(r.stdout, "KV heads")
    assert all(x["kv_per_token"] == 126 * 2 * 128 * 2 for x in ranks)
    assert "2 x 126 layers x 16384 = 4128768 values" in field(r.stdout, "all-reduce")
    assert "llama3 (factor 8, original context 8192)" in field(r.stdout, "rope")
    assert int(field(r.stdout, "context length")) == 131072


@pytest.mark.parametrize("config,tp,message", [
    ("phi3-mini-4k.json", 3, "n_head 32 cannot be split over 3 ranks"),
    ("llama3-8b.json", 64, "n_head 32 cannot be split over 64 ranks"),
    ("llama3-70b.json", 5, "n_head 64 cannot be split over 5 ranks"),
])
def test_unsplittable_shapes_are_refused(inferd, config, tp, message):
    r = inspect(inferd, config, "--tp", str(tp))
    assert r.returncode == 2, r.stdout
    assert message in r.stderr and r.stdout == "", r.stderr


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_tp_out_of_range_is_a_usage_error(inferd, value):
    r = inspect(inferd, "llama3-8b.json", "--tp", value)
    assert r.returncode == 2 and "--tp" in r.stderr, r.stderr


def test_without_tp_the_output_is_unchanged(inferd):
    r = inspect(inferd, "llama3-8b.json")
    assert r.returncode == 0 and "tensor parallel" not in r.stdout


def test_quantized_split_names_the_block_rule(inferd):
    """A Q4_K file whose row-parallel slices would cut 256-value blocks
    (the kquant fixture's 2 x 64-wide heads over 2 ranks)."""
    model = ROOT / "tests" / "fixtures" / "models" / "llama-kquant" / "model-q4_k_m.gguf"
    if not model.exists():
        pytest.skip("no kquant fixture")
    r = subprocess.run([inferd, "inspect", str(model), "--tp", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert re.search(r"o_proj: \d+ input columns per rank is not a multiple of Q4_K's 256-value"
                     r" blocks", r.stderr), r.stderr
