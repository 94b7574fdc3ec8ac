"""The native CPU decode-attention kernel (atskv::paged_attention): it equals the PyTorch path of
every static store (SDPA over the store, or over the gathered pages), reads only the rows it is
asked for, compiles as one opaque call under ``fullgraph=True``, and decoding with it gives the
tokens and logits decoding without it gives."""

from __future__ import annotations

import pytest
import torch

from atskv import kernels
from atskv.engine import Engine
from atskv.kvcache import StaticKV, StaticPagedKV
from atskv.methods import METHODS
from atskv.types import ConfigError

D = 16


def test_the_kernel_builds_on_this_machine():
    assert kernels.load() is True, kernels.status()
    assert kernels.status() == "atskv::paged_attention"
    x = torch.zeros(2, 3)
    assert kernels.usable(x)
    assert not kernels.usable(x.double())  # fp32 only: other dtypes keep PyTorch's path


def ragged_store(lengths, page, headroom=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths) + 5
    keys = torch.randn(len(lengths), n, D, generator=g)
    values = torch.randn(len(lengths), n, D, generator=g)
    keep = [torch.randperm(n, generator=g)[:m].sort().values for m in lengths]
    return StaticPagedKV(keys, values, keep, [headroom] * len(lengths), page)


def both(store, *args):
    """The store's attention through the kernel, then through PyTorch's path."""
    assert store.kernel
    out, read = store.attend(*args)
    store.kernel = False
    ref, ref_read = store.attend(*args)
    store.kernel = True
    assert read == ref_read  # the same bytes are reported whichever path runs
    return out, ref


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lengths,page,g", [([37, 5, 64], 16, 3), ([1, 90], 1, 2), ([50], 8, 1)])
def test_every_page_equals_sdpa(lengths, page, g, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one thread: one part per query head; two: parts merged
    try:
        store = ragged_store(lengths, page, headroom=3)
        q = torch.randn(len(lengths), g, D)
        out, ref = both(store, q, 0.3)
    finally:
        torch.set_num_threads(before)
    assert (out - ref).abs().max() < 1e-5


def test_chosen_pages_equal_sdpa_over_the_gathered_pages():
    store = ragged_store([70, 33, 100], page=8)
    pages = torch.tensor([[0, 8, 3, 5], [4, 0, 2, 1], [12, 0, 7, 9]])  # 4: past head 1's rows
    chosen = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    q = torch.randn(3, 2, D)
    out, ref = both(store, q, 0.25, pages, chosen)
    assert (out - ref).abs().max() < 1e-5


def test_rows_not_asked_for_are_never_read():
    """Poison every row the kernel must skip (unchosen pages, rows past a head's length, other
    heads' rows): the output stays finite and equal to attention over the chosen rows alone."""
    store = ragged_store([40, 24], page=8, headroom=8)
    keep_k, keep_v = store.k.clone(), store.v.clone()
    pages = torch.tensor([[0, 2, 4], [1, 2, 0]])
    chosen = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    rows = {0: [*range(0, 8), *range(32, 40)], 1: [*range(8, 24)]}
    read = torch.zeros(store.k.shape[0], dtype=torch.bool)
    for h, rs in rows.items():
        read[int(store.offsets[h]) + torch.tensor(rs)] = True
    store.k[~read] = float("nan")
    store.v[~read] = float("nan")
    q = torch.randn(2, 3, D)
    out, _ = store.attend(q, 0.5, pages, chosen)
    assert torch.isfinite(out).all()
    for h, rs in rows.items():
        idx = int(store.offsets[h]) + torch.tensor(rs)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[h][None], keep_k[idx][None], keep_v[idx][None], scale=0.5)[0]
        assert (out[h] - want).abs().max() < 1e-5


@pytest.mark.parametrize("sinks", [None, 2])
def test_static_kv_equals_sdpa_before_and_after_its_ring_wraps(sinks):
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 30, D, generator=g), torch.randn(2, 30, D, generator=g)
    keep = [torch.arange(20), torch.arange(20)]
    store = StaticKV(keys, values, keep, headroom=0 if sinks else 6, sinks=sinks)
    assert store.kernel
    q = torch.randn(2, 4, D)
    for step in range(8):  # with sinks the ring wraps at once: the count passes the capacity
        out = store.attend(q, 0.2)
        store.kernel = False
        ref = store.attend(q, 0.2)
        store.kernel = True
        assert (out - ref).abs().max() < 1e-5, step
        if sinks or step < 5:
            store.append(torch.randn(2, D, generator=g), torch.randn(2, D, generator=g))


def test_the_kernel_compiles_fullgraph_as_one_call():
    store = ragged_store([45, 17, 60], page=4, headroom=2)
    pages = torch.tensor([[0, 3, 10, 2], [1, 0, 4, 2], [14, 0, 1, 6]])
    chosen = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    q = torch.randn(3, 2, D)

    def step(q, pages, chosen):
        return store.attend(q, 0.3, pages, chosen)[0] * 2

    compiled = torch.compile(step, fullgraph=True)
    assert (compiled(q, pages, chosen) - step(q, pages, chosen)).abs().max() < 1e-5


@pytest.mark.parametrize("name,kw", [("full", {}), ("sliding_window", {}),
                                     ("atskv", {"max_pages": 2, "min_pages": 1, "mass": 0.9,
                                                "window": 16})])
def test_decoding_with_the_kernel_equals_decoding_without_it(tiny_model, monkeypatch, name, kw):
    method = METHODS.get(name)(budget=0.3, **kw)
    prompt = list(range(100, 400))
    with_kernel = Engine(tiny_model, None).generate(prompt, method, 8, stop_at_eos=False,
                                                    return_logits=True)
    monkeypatch.setattr(kernels, "usable", lambda t: False)
    without = Engine(tiny_model, None).generate(prompt, method, 8, stop_at_eos=False,
                                                return_logits=True)
    assert with_kernel.token_ids == without.token_ids
    diff = max((a - b).abs().max().item()
               for a, b in zip(with_kernel.stats["logits"], without.stats["logits"]))
    assert diff < 1e-4
    assert with_kernel.decode_kv_read_bytes == without.decode_kv_read_bytes


def forget(monkeypatch):
    """As if the kernel had not been tried in this process (restored after the test)."""
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_reason", kernels._reason)


def test_the_switch_turns_it_off_and_a_bad_value_is_named(monkeypatch):
    forget(monkeypatch)
    monkeypatch.setenv("ATSKV_CPU_KERNEL", "0")
    assert kernels.load() is False and kernels.status() == "off (ATSKV_CPU_KERNEL=0)"
    assert not kernels.usable(torch.zeros(1))
    forget(monkeypatch)
    monkeypatch.setenv("ATSKV_CPU_KERNEL", "maybe")
    with pytest.raises(ConfigError, match="ATSKV_CPU_KERNEL='maybe'"):
        kernels.load()


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **kw):
        raise RuntimeError("no compiler here")

    forget(monkeypatch)
    monkeypatch.setattr(ext, "load", broken)
    with pytest.warns(UserWarning, match="no compiler here"):
        assert kernels.load() is False
    assert "no compiler here" in kernels.status()
