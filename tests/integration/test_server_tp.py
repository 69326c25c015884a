"""The daemon with its model split over two ranks (--tensor-parallel-size
2, threads on the CPU): the same greedy completions as the whole model,
streaming and concurrent requests included, and the KV cache sized for
every rank's heads (the tiny model's single KV head is replicated)."""
import concurrent.futures as cf

import pytest

from inferd_serve_harness import TINY, start_server, tiny_args


@pytest.fixture(scope="module")
def tiny_tp2(tmp_path_factory):
    s = start_server(tmp_path_factory, TINY, *tiny_args(), "--tensor-parallel-size", "2",
                     name="tiny")
    yield s
    rc = s.stop(timeout=60)
    assert rc == 0, f"inferd serve --tensor-parallel-size 2 exited {rc}:\n{s.stderr()[-3000:]}"


def completions(server):
    bodies = [{"model": "tiny", "prompt": f"Tensor {i}: parallel " * (1 + i % 3),
               "max_tokens": 12, "temperature": 0, "ignore_eos": True} for i in range(8)]
    with cf.ThreadPoolExecutor(4) as ex:
        return list(ex.map(lambda b: server.post("/v1/completions", b).json()["choices"][0]["text"],
                           bodies))


def test_same_greedy_text_as_one_rank(tiny, tiny_tp2):
    assert completions(tiny_tp2) == completions(tiny)


def test_stream_and_kv_accounting(tiny_tp2):
    r, raw = tiny_tp2.stream("/v1/completions", {"model": "tiny", "prompt": "Stream", "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True, "stream": True})
    assert r.status_code == 200
    assert raw.rstrip().endswith(b"data: [DONE]")
    m = tiny_tp2.metrics()
    assert m.value("inferd:kv_cache_blocks", state="used") == 0
    assert "tensor parallel: 2 ranks" in tiny_tp2.stderr()
