"""The static decode step, compiled: proof without a GPU that every static method's step has no
graph break, host sync or data-dependent shape (``torch.compile(fullgraph=True)`` refuses them,
the same things that break CUDA-graph capture), and that compiled and eager decoding agree."""

from __future__ import annotations

import re

import pytest
import torch

from atskv.core import dynamo
from atskv.core.engine import Engine
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


def test_the_compiled_steps_projections_are_row_exact_kernel_calls(tiny_model):
    """The compiled decode step runs every projection of every layer (q, k, v, o, gate, up, down)
    and the head through ``atskv::linear_rows`` and leaves no matrix product to the library's GEMV:
    the code inductor generates calls the kernel seven times per layer and once for the head, and
    holds no mm or addmm."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, codes = run_and_get_code(
        lambda: Engine(tiny_model, None, compile=True).generate(
            PROMPT, METHODS.get("full")(), 4, stop_at_eos=False))
    assert out.stats["compiled"] is True
    code = "\n".join(codes)
    layers = tiny_model.config.num_hidden_layers
    assert len(re.findall(r"torch\.ops\.atskv\.linear_rows\.default\(", code)) == 7 * layers + 1
    assert not re.search(r"extern_kernels\.(mm|addmm|bmm)\(", code)


def test_the_models_insides_are_not_guarded_and_the_rest_is(make_tiny_model, monkeypatch):
    """The step's guards on the model's modules, hooks, config and weights are dropped (most of
    its guards); those on the model's type, the method's state and stores, the token and the
    position are kept."""

    seen, filter_guards = [], dynamo.unguarded_model

    def recording(guards):
        keep = filter_guards(guards)
        seen.extend((g.name, g.guard_type, k) for g, k in zip(guards, keep))
        return keep

    monkeypatch.setattr(dynamo, "unguarded_model", recording)
    monkeypatch.setattr(dynamo, "_COMPILED", {})  # compiled afresh, through the recording filter
    model = make_tiny_model()
    out = Engine(model, None, compile=True).generate(PROMPT, METHODS.get("atskv")(budget=0.3), 4,
                                                     stop_at_eos=False)
    assert out.stats["compiled"] is True
    inside = [(n, t) for n, t, keep in seen if not keep]
    kept = [(n, t) for n, t, keep in seen if keep]
    assert inside and all(re.search(r"\bmodel\b", n) and n != "model" for n, _ in inside)
    assert not [n for n, _ in kept if re.search(r"\bmodel\b", n) and n != "model"]
    assert ("model", "TYPE_MATCH") in kept
    assert {t for n, t in inside} >= {"TENSOR_MATCH", "TYPE_MATCH"}  # weights, modules
    stores = [n for n, t in kept if t == "TENSOR_MATCH" and ".stores[" in n]
    # no head holds enough pages to be ranked: the dense step takes k, v and index, not the page
    # summaries nor the pinned pages (each tensor a step takes is checked before every call)
    assert len(stores) == 3 * model.config.num_hidden_layers
    assert not [n for n in stores if re.search(r"\.(summary|pinned)\b", n)]
    assert {"ids", "positions"} <= {n for n, t in kept if t == "TENSOR_MATCH"}
    assert len(inside) > len(kept)


def test_each_kind_of_model_gets_its_own_compiled_step(tiny_model, make_tiny_model):
    """Nothing guards the model's insides, so two kinds of model must not share a compiled step:
    each kind (class, config, device, dtype) compiles its own. The other model here differs in its
    MLP only, so that its KV stores, which are guarded, have the same shapes. Models of one kind
    share a step, which reads each one's weights: a twin with other weights decodes as it does
    eagerly."""

    other = make_tiny_model(intermediate_size=192)
    twin = make_tiny_model()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.25)
    assert type(other) is type(tiny_model)
    assert dynamo.compiled_step(other) is not dynamo.compiled_step(tiny_model)
    assert dynamo.compiled_step(twin) is dynamo.compiled_step(tiny_model)
    method = METHODS.get("sliding_window")(budget=0.3)
    last_logits = []
    for model in (tiny_model, other, twin, tiny_model):
        eager = Engine(model, None).generate(PROMPT, method, 6, stop_at_eos=False,
                                             return_logits=True)
        compiled = Engine(model, None, compile=True).generate(PROMPT, method, 6,
                                                              stop_at_eos=False,
                                                              return_logits=True)
        assert compiled.stats["compiled"] is True
        assert compiled.token_ids == eager.token_ids
        assert max_diff(compiled.stats["logits"], eager.stats["logits"]) < 1e-4
        last_logits.append(eager.stats["logits"][-1])
    assert max_diff(last_logits[2:3], last_logits[:1]) > 1e-3  # the twin's weights count


def test_a_run_compiles_only_when_its_steps_repay_the_compile():
    """The CPU preset compiles a run's decode step only when the run decodes at least
    ``compile_min_steps`` steps; 0 compiles whatever the steps, and ``compile: false`` never."""
    from atskv.core.engine import compile_pays
    from atskv.experiments.compose import compose_run_config

    hw = compose_run_config(["hardware=cpu"]).hardware
    least = hw.compile_min_steps
    assert hw.compile and least > 0
    assert not compile_pays(hw, least - 1)
    assert compile_pays(hw, least) and compile_pays(hw, None)  # None: a run of unknown length
    hw.compile_min_steps = 0
    assert compile_pays(hw, 1)
    hw.compile = False
    assert not compile_pays(hw, 10 * least) and not compile_pays(hw, None)
