"""Batched decoding: sequences decoded together (one forward pass per step) get exactly what they
get alone: tokens, logits, KV byte counters; also when they end at different steps, have
different prompt lengths, are compressed by different methods, and when the static step is
compiled."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import small_llama

from atskv.core import kernels
from atskv.core.engine import Engine, Request
from atskv.methods import METHODS

_RNG = random.Random(0)
#: prompts of 180-350 tokens of a 96-token vocabulary (the untied model below)
PROMPTS = [[_RNG.randrange(96) for _ in range(n)] for n in (300, 180, 350, 240, 200, 260, 310, 222)]
SAME = ("token_ids", "kv_bytes_peak", "kv_bytes_after_compression", "kv_bytes_uncompressed",
        "decode_kv_read_bytes", "prompt_tokens")


@pytest.fixture(scope="module")
def model():
    """A 2-layer random Llama with untied embeddings: its greedy tokens vary (the tied tiny
    model repeats the prompt's last token), so sequences end at different steps."""
    return small_llama(tie=False)


def method(name: str):
    kw = {"window": 16} if "window" in {f for f in METHODS.get(name).__dataclass_fields__} else {}
    return METHODS.get(name)(budget=0.3, **kw)


def requests(eng: Engine, methods: list, news: list[int]) -> list[Request]:
    reqs = []
    for i, (m, n) in enumerate(zip(methods, news)):
        pre = eng.prefill(PROMPTS[i % len(PROMPTS)], m.queries_needed())
        reqs.append(Request(pre, m, n, stop_at_eos=True, return_logits=True))
    return reqs


def early_eos(out) -> tuple[int, int] | None:
    """A token of ``out`` that first appears after its first token, and how many tokens a
    generation stopping at it makes (None: the generation repeats one token)."""
    ids = out.token_ids
    at = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), None)
    return None if at is None else (ids[at], at + 1)


def check_same(batched, alone):
    for b, a in zip(batched, alone, strict=True):
        for name in SAME:
            assert getattr(b, name) == getattr(a, name), name
        assert len(b.stats["logits"]) == len(a.stats["logits"])
        for x, y in zip(b.stats["logits"], a.stats["logits"]):
            assert torch.equal(x, y)  # bit for bit: each row computed as alone


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_a_batch_decodes_every_sequence_as_alone(model, name, batch):
    """Different prompt lengths and generation lengths (the batch shrinks as they end), and an
    end-of-sequence token that stops one sequence early."""
    eng = Engine(model, None)
    news = [3 + (i * 5) % 9 for i in range(batch)]
    alone = [eng.generate_batch([r])[0] for r in requests(eng, [method(name)] * batch, news)]
    eos = next((e for e in map(early_eos, alone) if e is not None), None) if batch > 1 else None
    eng.eos_ids = {eos[0]} if eos else set()  # some row stops early, at that token
    alone = [eng.generate_batch([r])[0] for r in requests(eng, [method(name)] * batch, news)]
    batched = eng.generate_batch(requests(eng, [method(name)] * batch, news))
    check_same(batched, alone)
    assert all(o.stats["decode_batch_size"] == batch for o in batched)
    if eos:
        assert any(o.stats["stopped_by"] == "eos" and len(o.token_ids) < n
                   for o, n in zip(batched, news))


def test_different_methods_decode_together(model):
    """A sweep's members: every method on the same prompt, one batch."""
    eng = Engine(model, None)
    methods = [method(n) for n in METHODS.names()]
    pre = eng.prefill(PROMPTS[0], max(m.queries_needed() for m in methods))
    make = [Request(pre, m, 6, return_logits=True) for m in methods]
    alone = [eng.generate_batch([r])[0] for r in make]
    make = [Request(pre, m, 6, return_logits=True) for m in methods]
    check_same(eng.generate_batch(make), alone)


@pytest.mark.parametrize("names", [["full", "sliding_window", "snapkv"], ["atskv"] * 3])
def test_the_compiled_step_takes_a_fixed_batch(model, names):
    """Static methods with equal generation lengths: one compiled step for the whole batch
    (fullgraph), a row that ends early keeps running inside its own room, and every row gets
    what it gets alone through the compiled step."""
    eng = Engine(model, None, compile=True)
    methods = [method(n) for n in names]
    alone = [eng.generate_batch([r])[0] for r in requests(eng, methods, [7] * len(methods))]
    eos = next(e for e in map(early_eos, alone) if e is not None)
    eng.eos_ids = {eos[0]}  # a row stops early: the others go on, it keeps running unseen
    alone = [eng.generate_batch([r])[0] for r in requests(eng, methods, [7] * len(methods))]
    batched = eng.generate_batch(requests(eng, methods, [7] * len(methods)))
    check_same(batched, alone)
    assert all(o.stats["compiled"] for o in batched)
    assert any(o.stats["stopped_by"] == "eos" and len(o.token_ids) < 7 for o in batched)
    assert any(len(o.token_ids) == 7 for o in batched)


def test_linear_rows_gives_each_row_what_it_gets_alone():
    """The decode step's projections: every output by the same float operations whatever the
    number of rows and their order, within float32's bound of the float64 product."""
    from helpers import gamma

    if not kernels.load():
        pytest.skip(kernels.status())
    g = torch.Generator().manual_seed(0)
    for k, n in ((576, 1536), (1536, 576), (40, 19), (16, 3)):
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        x = torch.randn(11, k, generator=g)
        every = kernels.linear_rows(x, w, b)
        for i in range(11):
            assert torch.equal(kernels.linear_rows(x[i : i + 1], w, b), every[i : i + 1])
        perm = torch.randperm(11, generator=g)
        assert torch.equal(kernels.linear_rows(x[perm], w, b), every[perm])
        exact = x.double() @ w.double().T + b.double()
        bound = gamma(k + 1) * (x.double().abs() @ w.double().abs().T + b.double().abs())
        assert ((every.double() - exact).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("names", [["full", "sliding_window", "snapkv", "atskv"] * 2])
def test_a_graph_captured_batch_of_eight_decodes_every_sequence_as_alone(model, names):
    """make gpu-check's batched step: eight rows captured in one CUDA graph. cuBLAS picks its
    kernels by the number of rows (no atskv::linear_rows on CUDA), so the rows' logits agree with
    decoding alone to float32 rounding (not bit for bit) and their tokens and byte counters are
    the same."""
    model = model.to("cuda")
    try:
        eng = Engine(model, None, cuda_graph=True)
        methods = [method(n) for n in names]
        alone = [eng.generate_batch([r])[0] for r in requests(eng, methods, [9] * 8)]
        batched = eng.generate_batch(requests(eng, methods, [9] * 8))
        assert all(o.stats["cuda_graph"] for o in batched)
        for b, a in zip(batched, alone, strict=True):
            for name in SAME:
                assert getattr(b, name) == getattr(a, name), name
            diff = max((x - y).abs().max().item()
                       for x, y in zip(b.stats["logits"], a.stats["logits"]))
            assert diff < 1e-3
    finally:
        model.to("cpu")


def test_a_batch_beyond_the_compiled_rows_decodes_eagerly_as_alone(model, monkeypatch):
    """A batch larger than a compiled step may hold is decoded by the eager step (one weight
    read per step, no compile), each row as alone."""
    from atskv.core import decoding

    monkeypatch.setattr(decoding, "MAX_COMPILED_ROWS", 2)
    eng = Engine(model, None, compile=True)
    methods = [method("snapkv") for _ in range(3)]
    alone = [Engine(model, None).generate_batch([r])[0]
             for r in requests(eng, methods, [5] * 3)]
    batched = eng.generate_batch(requests(eng, methods, [5] * 3))
    check_same(batched, alone)
    assert not any(o.stats["compiled"] for o in batched)
    assert all(o.stats["decode_batch_size"] == 3 for o in batched)
