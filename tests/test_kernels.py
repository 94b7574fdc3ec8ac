"""The native CPU decode kernels. atskv::paged_attention equals the PyTorch path of every static
store (SDPA over the store, or over the gathered pages) and reads only the rows it is asked for;
atskv::rank_pages chooses the pages atskv's PyTorch ranking chooses; atskv::paged_decode (append,
ranking, attention) leaves the store as the PyTorch append does and attends as the PyTorch path.
They compile as one opaque call each under ``fullgraph=True``, and decoding with them gives the
tokens and logits decoding without them gives."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_attention_close, attention_rel_bound

from atskv.core import kernels
from atskv.core.engine import Engine
from atskv.core.stores import StaticKV, StaticPagedKV, decode_rows
from atskv.core.types import ConfigError
from atskv.methods import METHODS
from atskv.methods.atskv import ATSKV

D = 16


def test_the_kernel_builds_on_this_machine():
    assert kernels.load() is True, kernels.status()
    assert kernels.status().startswith(kernels.NAME)
    x = torch.zeros(2, 3)
    assert kernels.usable(x)
    assert not kernels.usable(x.double())  # fp32 only: other dtypes keep PyTorch's path


def ragged_store(lengths, page, headroom=0, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths) + 5
    keys = torch.randn(len(lengths), n, d, generator=g)
    values = torch.randn(len(lengths), n, d, generator=g)
    keep = [torch.randperm(n, generator=g)[:m].sort().values for m in lengths]
    return StaticPagedKV(keys, values, keep, [headroom] * len(lengths), page)


def float64(store, q, *args, magnitudes=False):
    """The store's attention in float64 (its PyTorch path over a float64 twin of it); with
    ``magnitudes``, over the values' absolute values (what an error bound is relative to)."""
    twin = copy.copy(store)
    twin.kernel = False
    twin.k = store.k.double()
    twin.v = (store.v.abs() if magnitudes else store.v).double()
    return twin.attend(q.double(), *args)[0]


def check_both(store, q, scale, *args, exact_logits=False):
    """The store's attention through the kernel and through PyTorch's path: the same bytes read,
    and each within float32's error bound (:func:`attention_rel_bound`) of the float64
    attention over the same rows."""
    assert store.kernel
    out, read = store.attend(q, scale, *args)
    store.kernel = False
    ref, ref_read = store.attend(q, scale, *args)
    store.kernel = True
    assert read == ref_read  # the same bytes are reported whichever path runs
    want = float64(store, q, scale, *args)
    mags = float64(store, q, scale, *args, magnitudes=True)
    rows = store.k.shape[0] if store.k.dim() == 2 else store.k.shape[1]  # at least any head's
    rel = attention_rel_bound(q, store.k, scale, rows, exact_logits)
    assert_attention_close(out, want, mags, rel)
    assert_attention_close(ref, want, mags, rel)
    return out


@pytest.mark.parametrize("d", [D, 64, 128])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lengths,page,g", [([37, 5, 64], 16, 3), ([1, 90], 1, 2), ([50], 8, 1),
                                            ([400, 3, 0, 90], 4, 2)])
def test_every_page_equals_sdpa(lengths, page, g, threads, d):
    """Also with very ragged heads (and an empty one), whose slices of pages are dealt to the
    threads by pages read, and merged per query head; at head dims 64 and 128, which the kernel
    compiles apart (fixed-size loops), and at another."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = ragged_store(lengths, page, headroom=3, d=d)
        q = torch.randn(len(lengths), g, d)
        check_both(store, q, 0.3)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d", [D, 64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_decode_gives_each_row_what_append_and_attend_give_it_alone(d, threads):
    """A batch's plain decode layer in one call (:func:`decode_rows`): stores of both layouts
    and of different sizes, a ring that wraps, some rows of the step taken and others not; each
    taken row's output, bytes read and store afterwards are bit for bit those of its own append
    and attention."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(d + threads)

        def stores():
            keys, values = torch.randn(3, 300, d, generator=g), torch.randn(3, 300, d, generator=g)
            return [StaticKV(keys, values, [torch.arange(0, 300, 2)] * 3, headroom=3),
                    ragged_store([37, 5, 64], page=1, headroom=3, d=d),
                    StaticKV(keys[:, :40], values[:, :40], [torch.arange(40)] * 3, headroom=2),
                    ragged_store([250, 1, 90], page=1, headroom=3, d=d),
                    StaticKV(keys[:, :12], values[:, :12], [torch.arange(12)] * 3, headroom=0,
                             sinks=2)]  # full from the start: every append overwrites a row

        taken = [0, 2, 3, 5, 6]  # rows 1 and 4 of the step are not ours
        ours = stores()
        alone = [copy.deepcopy(s) for s in ours]
        q, k, v = (torch.randn(7, 3, *shape, generator=g) for shape in ((2, d), (d,), (d,)))
        for _ in range(2):  # the second step reads what the first appended
            out, reads = decode_rows(taken, ours, q, k, v, 0.3)
            for i, (row, store) in enumerate(zip(taken, alone)):
                if isinstance(store, StaticPagedKV):
                    store.append(k[row], v[row], bounds=False)
                else:
                    store.append(k[row], v[row])
                want, read = store.attend(q[row], 0.3)
                assert torch.equal(out[i], want)
                assert reads[i] == read
        for a, b in zip(ours, alone):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
        counts = [s.counts.clone() for s in ours]  # the third step overfills the 40-token store
        with pytest.raises(RuntimeError, match="row 2, head 0 is full"):
            decode_rows(taken, ours, q, k, v, 0.3)
        assert all(torch.equal(c, s.counts) for c, s in zip(counts, ours))  # nothing written
    finally:
        torch.set_num_threads(before)


def test_attention_is_exact_when_scores_span_the_float_range():
    """The kernel's softmax takes its exponentials in a vectorised polynomial (decode.h): scores
    that fall hundreds below the head's largest give weights from 1 down through the denormal
    range (e^-87 to e^-104) to exactly 0. Keys and queries of small integers make every logit and
    every difference of logits exact in float32, so the output must be within the rounding of
    the exponentials and the sums (:func:`attention_rel_bound` with exact logits) of float64
    attention, as PyTorch's must."""
    g = torch.Generator().manual_seed(3)
    store = ragged_store([300, 77, 150], page=16, d=64)
    store.k.copy_(torch.randint(-4, 5, store.k.shape, generator=g).float())
    q = 3.0 * torch.randint(-2, 3, (3, 2, 64), generator=g).float()  # scores spread over hundreds
    check_both(store, q, 1.0, exact_logits=True)
    tiny = 0
    for h in range(3):
        rows = slice(int(store.offsets[h]), int(store.offsets[h] + store.lens[h]))
        weights = torch.softmax(q[h].double() @ store.k[rows].double().T, dim=-1)
        tiny += int(((weights > 0) & (weights < torch.finfo(torch.float32).tiny)).sum())
    assert tiny > 100  # weights in float32's denormal range were taken


def test_chosen_pages_equal_sdpa_over_the_gathered_pages():
    store = ragged_store([70, 33, 100], page=8)
    pages = torch.tensor([[0, 8, 3, 5], [4, 0, 2, 1], [12, 0, 7, 9]])  # 4: past head 1's rows
    chosen = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    q = torch.randn(3, 2, D)
    check_both(store, q, 0.25, pages, chosen)


def test_heads_further_apart_than_their_rows_give_what_their_contiguous_copy_gives():
    """``(H, n, d)``: the first ``n`` rows of each head of an ``(H, C, d)`` buffer (a store's
    filled rows, read where they are), with chosen single-token pages as Quest and RocketKV
    choose them, bit for bit what the same rows copied together give."""
    assert kernels.load(), kernels.status()
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 50, D, generator=g), torch.randn(3, 50, D, generator=g)
    q = torch.randn(3, 2, D, generator=g)
    lens = torch.full((3,), 30)
    idx = torch.tensor([[0, 3, 4, 29], [1, 2, 17, 18], [5, 6, 7, 8]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    for chosen in (None, valid):
        a = kernels.paged_attention(q, k[:, :30], v[:, :30], None, lens, idx, chosen, 1, 0.25)
        b = kernels.paged_attention(q, k[:, :30].contiguous(), v[:, :30].contiguous(), None,
                                    lens, idx, chosen, 1, 0.25)
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [D, 64])
def test_rows_not_asked_for_are_never_read(d):
    """Poison every row the kernel must skip (unchosen pages, rows past a head's length, other
    heads' rows): the output stays finite and equal to attention over the chosen rows alone."""
    store = ragged_store([40, 24], page=8, headroom=8, d=d)
    keep_k, keep_v = store.k.clone(), store.v.clone()
    pages = torch.tensor([[0, 2, 4], [1, 2, 0]])
    chosen = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    rows = {0: [*range(0, 8), *range(32, 40)], 1: [*range(8, 24)]}
    read = torch.zeros(store.k.shape[0], dtype=torch.bool)
    for h, rs in rows.items():
        read[int(store.offsets[h]) + torch.tensor(rs)] = True
    store.k[~read] = float("nan")
    store.v[~read] = float("nan")
    q = torch.randn(2, 3, d)
    out, _ = store.attend(q, 0.5, pages, chosen)
    assert torch.isfinite(out).all()
    for h, rs in rows.items():
        idx = int(store.offsets[h]) + torch.tensor(rs)
        k, v = keep_k[idx].double(), keep_v[idx].double()
        weights = torch.softmax(q[h].double() @ k.T * 0.5, dim=-1)
        assert_attention_close(out[h], weights @ v, weights @ v.abs(),
                               attention_rel_bound(q[h], keep_k[idx], 0.5, len(rs)))


@pytest.mark.parametrize("sinks", [None, 2])
def test_static_kv_equals_sdpa_before_and_after_its_ring_wraps(sinks):
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 30, D, generator=g), torch.randn(2, 30, D, generator=g)
    keep = [torch.arange(20), torch.arange(20)]
    store = StaticKV(keys, values, keep, headroom=0 if sinks else 6, sinks=sinks)
    assert store.kernel
    q = torch.randn(2, 4, D)
    for step in range(8):  # with sinks the ring wraps at once: the count passes the capacity
        check_both(store, q, 0.2)
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


def chosen_sets(order, chosen):
    return [sorted(o[c].tolist()) for o, c in zip(order, chosen)]


def both_rankings(method, store, q, scale):
    """The pages chosen by the kernel, then by the PyTorch ranking; the kernel's order."""
    assert store.kernel
    order, chosen = kernels.rank_pages(q, store.kmin, store.kmax, store.ksum, store.lens,
                                       store.pinned, store.page, method.max_pages, method.fit(),
                                       method.min_pages, method.mass, scale)
    ref_order, ref_chosen = method.rank_pages(store, q, scale)
    assert order.shape == ref_order.shape and chosen.dtype == torch.bool
    return chosen_sets(order, chosen), chosen_sets(ref_order, ref_chosen), order


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page", [1, 4, 16])
def test_the_ranking_kernel_chooses_the_pages_the_reference_chooses(seed, page):
    """Random ragged stores (heads whose pages all fit the cap and heads whose pages do not,
    pinned pages, headroom slots holding no token yet) and random knobs: ``fit_pages`` by the
    byte rule (None), above ``max_pages`` (heads between the two attend every page) and below it
    (heads above it ranked by the mass rule alone)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300 // page + 40, (3,), generator=g).tolist()
    store = ragged_store(lengths, page, headroom=page + 2, seed=seed)
    store.pinned[:] = torch.rand(store.pinned.shape, generator=g) < 0.05
    for q_scale, max_pages, fit_pages, min_pages, mass in (
            (0.5, 12, None, 2, 0.9), (3.0, 20, None, 4, 0.999), (1.0, 3, None, 1, 0.3),
            (2.0, 200, None, 1, 0.99), (1.0, 8, 30, 2, 0.999), (1.0, 30, 8, 2, 0.9)):
        method = ATSKV(max_pages=max_pages, fit_pages=fit_pages, min_pages=min_pages, mass=mass)
        q = torch.randn(3, 2, D, generator=g) * q_scale
        got, want, order = both_rankings(method, store, q, 0.25)
        assert got == want, (q_scale, max_pages, fit_pages)
        assert order.shape[1] == min(max(max_pages, method.fit()), store.n_pages)
        for chosen, used in zip(got, (store.lens + page - 1) // page):
            assert len(chosen) == used if used <= method.fit() else len(chosen) <= max_pages
        for row in order:  # distinct slots
            assert row.unique().numel() == row.numel()


def test_a_head_whose_pages_all_fit_keeps_every_page_even_with_a_negligible_share():
    """Head 0's 6 pages fit the cap, so all are forced; 5 of them have an estimated share that
    underflows to 0, which ``2 + share`` rounds to the key of the empty slots that pad head 0 to
    head 1's page count. Neither ranking may choose an empty slot over them."""
    q = torch.zeros(2, 1, D)
    q[:, 0, 0] = 40.0
    keys = torch.zeros(2, 60, D)
    keys[0, :, 0] = -5.0
    keys[0, 2, 0] = 5.0  # the one page of head 0 the query attends to
    keys[1] = torch.randn(60, D)
    store = StaticPagedKV(keys, torch.randn(2, 60, D), [torch.arange(6), torch.arange(60)], [0, 0],
                          page=1)
    method = ATSKV(max_pages=10, min_pages=1, mass=0.5)
    got, want, _ = both_rankings(method, store, q, 1.0)
    assert got[0] == want[0] == list(range(6))


def copy_store(store):
    twin = copy.copy(store)
    for name in ("k", "v", "summary", "index", "pinned"):
        setattr(twin, name, getattr(store, name).clone())
    return twin


def assert_same_state(a, b):
    for name in ("k", "v", "summary", "index"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("page,lengths,d", [(16, [150, 30, 230], D), (4, [61, 9, 33], D),
                                            (1, [40, 7, 25], D), (4, [90, 9, 61], 20),
                                            (4, [90, 9, 61], 40), (4, [90, 9, 61], 64),
                                            (8, [150, 9, 61], 128)])
def test_the_decode_kernel_equals_the_pytorch_append_ranking_and_attention(page, lengths, d):
    """Steps of ``decode_ranked`` (the kernel: append, rank, attend) against the store's PyTorch
    append, atskv's PyTorch ranking and attention over the pages it chose, on twin stores: the
    same outputs and bytes, the same store afterwards (rows, page summaries, lengths), with heads
    over the cap and heads under it, and pages filling and starting during the steps. Also at head
    dims 20 and 40 (the kernels sum over head dims in 16 lanes, then the rest) and 64 and 128
    (compiled apart, with fixed-size loops)."""
    g = torch.Generator().manual_seed(page + d)
    store = ragged_store(lengths, page, headroom=2 * page + 3, seed=page + d, d=d)
    store.pinned[:] = torch.rand(store.pinned.shape, generator=g) < 0.1
    ref = copy_store(store)
    ref.kernel = False
    method = ATSKV(max_pages=6, min_pages=2, mass=0.95)
    for _ in range(2 * page + 3):
        q = torch.randn(3, 2, d, generator=g) * 2
        k, v = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
        out, read = store.decode_ranked(q, k, v, 0.3, method.max_pages, method.fit(),
                                        method.min_pages, method.mass)
        ref.append(k, v)
        pages, chosen = method.rank_pages(ref, q, 0.3)
        want_read = ref.attend(q, 0.3, pages, chosen)[1]
        assert_attention_close(out, float64(ref, q, 0.3, pages, chosen),
                               float64(ref, q, 0.3, pages, chosen, magnitudes=True),
                               attention_rel_bound(q, ref.k, 0.3, ref.k.shape[0]))
        assert read == want_read
        assert_same_state(store, ref)


def test_the_decode_kernel_compiles_fullgraph_as_one_call_and_updates_the_store_in_place():
    store = ragged_store([45, 17, 60], page=4, headroom=8)
    twin = copy_store(store)
    tensors = {name: getattr(store, name) for name in ("k", "v", "summary", "index")}

    def step(s, q, k, v):
        return s.decode_ranked(q, k, v, 0.3, 5, 5, 2, 0.8)[0] * 2

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        q, k, v = (torch.randn(*shape, generator=g) for shape in ((3, 2, D), (3, D), (3, D)))
        assert (compiled(store, q, k, v) - step(twin, q, k, v)).abs().max() < 1e-5
    assert_same_state(store, twin)
    assert all(getattr(store, name) is t for name, t in tensors.items())  # written in place


@pytest.mark.parametrize("lengths,full", [([8, 3], 0), ([4, 8], 0), ([5, 4], 1)])
def test_the_decode_kernel_names_a_full_head(lengths, full):
    """A head at its capacity, followed by a longer head or a shorter one, or the last head: an
    error that names it, and nothing written (not the next head's rows, not the other heads)."""
    store = ragged_store(lengths, page=4)
    before = copy_store(store)
    q, k = torch.randn(2, 1, D), torch.randn(2, D)
    with pytest.raises(RuntimeError, match=f"head {full} is full"):
        store.decode_ranked(q, k, k, 0.3, 1, 1, 1, 0.9)
    for name in ("k", "v", "summary", "index"):  # no head was written
        assert torch.equal(getattr(store, name), getattr(before, name)), name


def test_the_ranking_kernel_names_bad_inputs():
    store = ragged_store([20], page=4)
    q = torch.randn(1, 2, D)
    with pytest.raises(RuntimeError, match="float32 only"):
        kernels.rank_pages(q.double(), store.kmin, store.kmax, store.ksum, store.lens,
                           store.pinned, 4, 3, 3, 1, 0.9, 0.3)
    with pytest.raises(RuntimeError, match="do not match q"):
        kernels.rank_pages(torch.randn(1, 2, D + 1), store.kmin, store.kmax, store.ksum,
                           store.lens, store.pinned, 4, 3, 3, 1, 0.9, 0.3)
    with pytest.raises(RuntimeError, match="fit_pages must be >= 1"):
        kernels.rank_pages(q, store.kmin, store.kmax, store.ksum, store.lens, store.pinned, 4,
                           3, 0, 1, 0.9, 0.3)


@pytest.mark.parametrize("name,kw", [("full", {}), ("sliding_window", {}),
                                     ("atskv", {"max_pages": 2, "min_pages": 1, "mass": 0.9,
                                                "window": 16}),
                                     ("atskv", {"max_pages": 1000, "window": 16}),  # all fit
                                     ("quest", {}), ("rocket_kv", {})])  # chosen tokens
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


def built(env: dict) -> tuple[str, Path]:
    """The kernels' status and build folder in a fresh process with ``env``."""
    code = ("from atskv.core import kernels; kernels.load(); print(kernels.status()); "
            "print(kernels._build_dir())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    status, folder = out.stdout.strip().splitlines()[-2:]
    return status, Path(folder)


def uses_avx512(folder: Path) -> bool:
    """Whether the library built in ``folder`` has instructions on AVX-512's zmm registers."""
    so = next(folder.glob("*.so"))
    asm = subprocess.run([shutil.which("objdump"), "-d", str(so)], capture_output=True,
                         text=True, check=True).stdout
    return "%zmm" in asm


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX-512 is x86-64's")
@pytest.mark.skipif(os.environ.get("ATSKV_CPU_KERNEL") == kernels.NO_AVX512,
                    reason="this is the run without AVX-512")
def test_the_kernels_built_without_avx512_pass_these_tests_too():
    """``ATSKV_CPU_KERNEL=no-avx512`` builds the kernels for this CPU less AVX-512: the code that
    every x86-64 CPU without it runs (decode.h's portable lane sums among it), checked here on any
    machine. Every other test of this file passes with that build, whose machine code touches no
    AVX-512 register (and, where the CPU has AVX-512, the default build's does: the check can
    fail)."""
    env = {**os.environ, "ATSKV_CPU_KERNEL": kernels.NO_AVX512}
    status, folder = built(env)
    assert status.endswith(f"({kernels.NO_AVX512})")
    if shutil.which("objdump"):
        assert not uses_avx512(folder)
        if "avx512f" in Path("/proc/cpuinfo").read_text():
            assert uses_avx512(built({**os.environ, "ATSKV_CPU_KERNEL": "1"})[1])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__], env=env, capture_output=True, text=True, timeout=1200,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout.strip().splitlines()[-1]
