"""Reference test of the CPU kernels against code no one here wrote.

Random weights in GGUF's byte layouts (random quant bytes with sane f16
scales) are dequantized by the `gguf` package (gguf.quants.dequantize) and
multiplied by numpy. Through tests/unit/kernel_ref_runner we check that:
  - k_dequant_row matches gguf's dequantization bit for bit;
  - k_matmul matches numpy's float64 product on the dequantized weights:
    float weights within 1e-5 of sum|w*x| per output; int8 paths within the
    bound of rounding x to 127 levels per block (sum|w| * amax / 254), and
    within 1.5e-2 normwise relative error over the whole output;
  - every SIMD path (INFERD_ISA) gives the same bytes.
The runner is found in $INFERD_BUILD_DIR (default "build"), relative to the
repository root unless absolute.
"""
import os
import pathlib
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("INFERD_BUILD_DIR", "build"))
if not BUILD.is_absolute():
    BUILD = ROOT / BUILD
RUNNER = BUILD / "tests" / "unit" / "kernel_ref_runner"

# name -> (gguf type, elements per block, bytes per block)
DTYPES = {
    "f32": (QT.F32, 1, 4),
    "f16": (QT.F16, 1, 2),
    "bf16": (QT.BF16, 1, 2),
    "q8_0": (QT.Q8_0, 32, 34),
    "q4_k": (QT.Q4_K, 256, 144),
    "q6_k": (QT.Q6_K, 256, 210),
}
QUANT = {"q8_0": 32, "q4_k": 256, "q6_k": 256}


def f16_bytes(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def make_weights(name, rows, cols, rng):
    """Raw GGUF bytes, shape (rows, row_bytes)."""
    _, blk, bb = DTYPES[name]
    if name == "f32":
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32).view(np.uint8)
    if name == "f16":
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float16).view(np.uint8)
    if name == "bf16":
        f = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    nb = rows * cols // blk
    b = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    if name == "q8_0":
        b[:, 0:2] = f16_bytes(rng, nb, 0.0005, 0.01)
    elif name == "q4_k":
        b[:, 0:2] = f16_bytes(rng, nb, 0.0002, 0.003)
        b[:, 2:4] = f16_bytes(rng, nb, 0.0002, 0.005)
    else:
        b[:, 208:210] = f16_bytes(rng, nb, 0.00005, 0.0005)
    return b.reshape(rows, -1)


def run(name, rows, cols, w, x, isa=None, threads=2, tmp=None):
    tmp = pathlib.Path(tmp)
    (tmp / "w.bin").write_bytes(w.tobytes())
    (tmp / "x.bin").write_bytes(x.astype(np.float32).tobytes())
    env = dict(os.environ, INFERD_THREADS=str(threads))
    if isa:
        env["INFERD_ISA"] = isa
    else:
        env.pop("INFERD_ISA", None)
    nx = x.shape[0]
    subprocess.run([str(RUNNER), name, str(rows), str(cols), str(tmp / "w.bin"),
                    str(tmp / "x.bin"), str(nx), str(tmp / "out.bin")],
                   check=True, env=env, timeout=300)
    out = np.fromfile(tmp / "out.bin", dtype=np.float32)
    assert out.size == rows * cols + nx * rows
    return out[:rows * cols].reshape(rows, cols), out[rows * cols:].reshape(nx, rows)


def reference_weights(name, w, rows, cols):
    qtype = DTYPES[name][0]
    return np.asarray(dequantize(w, qtype), dtype=np.float32).reshape(rows, cols)


def shapes(name):
    blk = DTYPES[name][1]
    if blk == 1:
        return [(1, 1, 1), (7, 33, 3), (67, 300, 5), (130, 1000, 9)]
    return [(1, blk, 1), (9, 2 * blk, 4), (67, 5 * blk, 7), (200, 8 * blk, 16)]


@pytest.fixture(scope="module", autouse=True)
def runner_built():
    if not RUNNER.exists():
        pytest.skip(f"{RUNNER} not built (ninja -C {BUILD} tests/unit/kernel_ref_runner)")


@pytest.mark.parametrize("name", list(DTYPES))
def test_dequant_matches_gguf(name, tmp_path):
    rng = np.random.default_rng(1234)
    for rows, cols, nx in shapes(name):
        w = make_weights(name, rows, cols, rng)
        x = rng.standard_normal((nx, cols)).astype(np.float32)
        got, _ = run(name, rows, cols, w, x, tmp=tmp_path)
        ref = reference_weights(name, w, rows, cols)
        assert got.shape == ref.shape
        diff = np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32))
        assert diff == 0, f"{name} {rows}x{cols}: {diff} values differ from gguf"


@pytest.mark.parametrize("name", list(DTYPES))
def test_matmul_matches_numpy(name, tmp_path):
    rng = np.random.default_rng(99)
    for rows, cols, nx in shapes(name):
        w = make_weights(name, rows, cols, rng)
        x = rng.standard_normal((nx, cols)).astype(np.float32)
        _, y = run(name, rows, cols, w, x, tmp=tmp_path)
        wd = reference_weights(name, w, rows, cols).astype(np.float64)
        xd = x.astype(np.float64)
        ref = xd @ wd.T
        mag = np.abs(xd) @ np.abs(wd).T
        err = np.abs(y.astype(np.float64) - ref)
        if name in QUANT:
            blk = QUANT[name]
            amax = np.abs(xd).reshape(nx, -1, blk).max(axis=2)          # (nx, nb)
            wsum = np.abs(wd).reshape(rows, -1, blk).sum(axis=2)       # (rows, nb)
            bound = amax @ wsum.T / 254.0 * 1.0001 + 2e-6 * mag
            assert np.all(err <= bound), f"{name} {rows}x{cols}: outside the int8 bound"
            if rows * nx >= 1000:
                rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
                assert rel < 1.5e-2, f"{name}: relative error {rel:.3g}"
        else:
            assert np.all(err <= 1e-5 * mag + 1e-30), \
                f"{name} {rows}x{cols}: max err/mag {np.max(err / (mag + 1e-30)):.3g}"


@pytest.mark.parametrize("name", list(DTYPES))
def test_isas_agree(name, tmp_path):
    rng = np.random.default_rng(7)
    blk = DTYPES[name][1]
    rows, cols, nx = 45, (3 * blk if blk > 1 else 517), 6
    w = make_weights(name, rows, cols, rng)
    x = rng.standard_normal((nx, cols)).astype(np.float32)
    outs = {}
    for isa in ("scalar", "avx2", "avx512"):
        for threads in (1, 3):
            outs[(isa, threads)] = run(name, rows, cols, w, x, isa=isa,
                                       threads=threads, tmp=tmp_path)[1]
    base = outs[("scalar", 1)].view(np.uint32)
    for key, y in outs.items():
        assert np.array_equal(y.view(np.uint32), base), f"{name}: {key} differs from scalar"
