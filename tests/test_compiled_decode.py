"""The static decode step, compiled: proof without a GPU that every static method's step has no
graph break, host sync or data-dependent shape (``torch.compile(fullgraph=True)`` refuses them,
the same things that break CUDA-graph capture), and that compiled and eager decoding agree."""

from __future__ import annotations

import pytest
import torch

from atskv.engine import Engine
from atskv.methods import METHODS

PROMPT = list(range(100, 400))  # 300 tokens
STATIC = [n for n in METHODS.names() if METHODS.get(n)().static_decode()]
VARIANTS = [(n, {}) for n in STATIC] + [
    ("atskv", {"max_pages": 2, "min_pages": 1, "mass": 0.9, "window": 16}),  # sparse ranking
    ("atskv", {"sparse_decode": False}),
]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_the_static_methods_are_the_ones_the_issue_names():
    assert {"full", "sliding_window", "snapkv", "pyramidkv", "dynamic_kv", "atskv"} <= set(STATIC)
    assert not {"h2o", "quest", "rocket_kv"} & set(STATIC)  # data-dependent decode steps


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{'-' + str(i) if i else ''}" for i, (n, _)
                                                   in enumerate(VARIANTS)])
@pytest.mark.parametrize("budget", [0.2, 1.0])
def test_compiled_decoding_equals_eager(tiny_model, name, kw, budget):
    method = METHODS.get(name)(budget=budget, **kw)
    eager = Engine(tiny_model, None).generate(PROMPT, method, 10, stop_at_eos=False,
                                              return_logits=True)
    compiled = Engine(tiny_model, None, compile=True).generate(PROMPT, method, 10,
                                                               stop_at_eos=False,
                                                               return_logits=True)
    assert compiled.stats["compiled"] is True and eager.stats["compiled"] is False
    assert compiled.token_ids == eager.token_ids
    assert max_diff(compiled.stats["logits"], eager.stats["logits"]) < 1e-4
    assert compiled.kv_bytes_peak == eager.kv_bytes_peak
    assert compiled.decode_kv_read_bytes == eager.decode_kv_read_bytes
    # a second generation of another length reuses the compiled step (sizes become dynamic)
    again = Engine(tiny_model, None, compile=True).generate(PROMPT[:250], method, 6,
                                                            stop_at_eos=False)
    assert again.stats["compiled"] is True


def test_compile_time_is_kept_out_of_the_decode_rate(tiny_model):
    torch._dynamo.reset()  # a cold start: the first compiled step compiles
    method = METHODS.get("snapkv")(budget=0.3)
    out = Engine(tiny_model, None, compile=True).generate(PROMPT, method, 8, stop_at_eos=False)
    assert out.stats["compile_s"] > 0
    assert out.decode_tokens == 8 - 1 - 1  # the compiling step is compile time, not decoding
    warm = Engine(tiny_model, None, compile=True).generate(PROMPT, method, 8, stop_at_eos=False)
    assert warm.stats["compile_s"] == 0 and warm.decode_tokens == 7


def test_non_static_methods_decode_eagerly_when_compile_is_asked(tiny_model):
    out = Engine(tiny_model, None, compile=True).generate(PROMPT, METHODS.get("h2o")(budget=0.3),
                                                          4, stop_at_eos=False)
    assert out.stats["compiled"] is False


def test_one_row_products_are_compiled_as_fused_multiply_and_sum(tiny_model):
    """The compiled step decomposes every projection of the decode step (one row times a weight)
    into a fused multiply-and-sum instead of a GEMV call: each layer's q, k, v, o, gate, up and
    down projections (the head is written as one in the seam)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = Engine(tiny_model, None, compile=True).generate(PROMPT, METHODS.get("full")(), 4,
                                                          stop_at_eos=False)
    assert out.stats["compiled"] is True
    layers = tiny_model.config.num_hidden_layers
    assert counters["inductor"]["decompose_mm"] + counters["inductor"]["decompose_addmm"] == 7 * layers
