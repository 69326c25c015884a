"""The module boundaries of DESIGN.md, kept by grep: the engine never sees
the server's libraries, the server never sees CUDA, and the kernels expose
one header."""
import re

from conftest import ROOT


def includes(directory):
    for path in sorted((ROOT / directory).rglob("*.[ch]")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r'\s*#\s*include\s*[<"]([^>"]+)[>"]', line)
            if m:
                yield path.relative_to(ROOT), n, m.group(1)


def test_engine_has_no_server_libraries():
    bad = [(p, n, h) for p, n, h in includes("engine")
           if re.match(r"(event2?/|event\.h|llhttp|jansson|openssl/|cuda|cublas|nccl)", h)]
    assert not bad, bad


def test_server_has_no_cuda():
    bad = [(p, n, h) for p, n, h in includes("server") if re.match(r"(cuda|cublas|nccl)", h)]
    assert not bad, bad


def test_kernels_expose_one_header():
    outside = [(p, n, h) for d in ("engine", "server") for p, n, h in includes(d)
               if h.startswith("kernels/") and h != "kernels/kernels.h"]
    assert not outside, outside
