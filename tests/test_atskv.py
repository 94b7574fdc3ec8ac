"""atskv: static vs dynamic decode, exactness at budget 1, allocation, page bounds, CUDA graph."""

from __future__ import annotations

import pytest
import torch

from atskv.core.engine import Engine
from atskv.core.stores import StaticPagedKV, page_minmax
from atskv.methods import METHODS
from atskv.methods.atskv import ATSKV, allocate, chunk_sum, consensus

PROMPT = list(range(100, 400))  # 300 tokens


def gen(model, method, n=12, prompt=PROMPT):
    return Engine(model, None).generate(prompt, method, n, stop_at_eos=False, return_logits=True)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def full_out(tiny_model):
    return gen(tiny_model, METHODS.get("full")())


@pytest.mark.parametrize("static", [True, False])
def test_budget_one_without_sparse_decode_equals_full(tiny_model, full_out, static):
    out = gen(tiny_model, ATSKV(budget=1.0, sparse_decode=False, static=static))
    assert out.token_ids == full_out.token_ids
    assert max_diff(out.stats["logits"], full_out.stats["logits"]) < 1e-5


@pytest.mark.parametrize("static", [True, False])
def test_sparse_decode_over_every_page_is_exact_attention(static):
    torch.manual_seed(0)
    keys, values = torch.randn(2, 90, 8), torch.randn(2, 90, 8)
    keep = [torch.arange(0, 90, 3), torch.arange(50)]
    store = StaticPagedKV(keys, values, keep, [5, 5], page=4)
    q = torch.randn(2, 3, 8)
    m = ATSKV(max_pages=1000, mass=1.0, min_pages=1, static=static)
    state = m.begin(90, 1)
    state.dense = False  # rank pages even though they all fit
    got = m.attend(state, 0, store, q, 0.3).out
    for h in range(2):
        k, v = keys[h, keep[h]], values[h, keep[h]]
        ref = torch.softmax(q[h] @ k.T * 0.3, dim=-1) @ v
        torch.testing.assert_close(got[h], ref, atol=1e-5, rtol=1e-5)
    few = ATSKV(max_pages=2, mass=0.5, min_pages=1, static=static).attend(state, 0, store, q, 0.3)
    assert few.read_bytes < m.attend(state, 0, store, q, 0.3).read_bytes
    # with room for every page and mass 1 the ranking itself chooses every live page
    order, chosen = ATSKV(max_pages=store.n_pages, mass=1.0).rank_pages(store, q, 0.3)
    live = store.page_counts() > 0
    for h in range(2):
        assert sorted(order[h][chosen[h]].tolist()) == torch.nonzero(live[h]).flatten().tolist()


@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_static_path_gives_the_same_tokens_as_the_dynamic_path(tiny_model, budget):
    kw = dict(budget=budget, window=16, max_pages=4, min_pages=1, mass=0.6, dense_small=False)
    static = gen(tiny_model, ATSKV(static=True, **kw), n=20)
    dynamic = gen(tiny_model, ATSKV(static=False, **kw), n=20)
    assert static.token_ids == dynamic.token_ids
    assert max_diff(static.stats["logits"], dynamic.stats["logits"]) < 1e-4
    # the dynamic path reads only the adaptively chosen pages, the static one max_pages
    assert dynamic.decode_kv_read_bytes <= static.decode_kv_read_bytes


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("costs", [{"dense_small": False, "consensus_top": 0}, {}])
def test_stored_bytes_stay_within_the_budget(tiny_model, full_out, budget, costs):
    """Page summaries and page rounding are paid out of the prompt budget: the compressed cache
    (before any generated token) stays within budget x the prompt's full KV bytes."""
    prompt = list(range(100, 1100))  # long enough that window and sinks are a small part
    full = gen(tiny_model, METHODS.get("full")(), n=24, prompt=prompt)
    out = gen(tiny_model, ATSKV(budget=budget, window=16, **costs), n=24, prompt=prompt)
    frac = out.kv_bytes_after_compression / full.kv_bytes_after_compression
    assert budget * 0.85 <= frac <= budget * 1.03, frac  # rounding varies with few heads
    kept = out.stats["prompt_tokens_kept"]["mean"]
    assert budget * 0.8 * len(prompt) <= kept <= budget * len(prompt)


def test_allocations_sum_to_the_global_budget():
    torch.manual_seed(0)
    scores = torch.rand(5, 3, 40)
    scores = scores / scores.sum(-1, keepdim=True)
    counts = allocate(scores, 123, min_share=0.2)
    assert int(counts.sum()) == 123
    floor = int(0.2 * 123 / 15)
    assert int(counts.min()) >= floor
    assert int(allocate(scores, 10_000, 0.2).sum()) == 5 * 3 * 40  # capped at what exists


def test_small_budget_decodes_densely_and_spends_no_bytes_on_pages(tiny_model):
    """dense_small: a budget whose heads cannot need ranking stores no page summaries and
    spends their bytes on prompt tokens instead; no head is capped (the global allocation may
    give one head more than fit() pages: it is attended densely)."""
    prompt = list(range(100, 700))
    m = ATSKV(budget=0.2, window=16, dense_small=True, page_size=8, max_pages=6, fit_pages=30)
    assert m.unranked(m.prompt_keep(len(prompt)))
    ctx_out = gen(tiny_model, m, n=12, prompt=prompt)
    paged = gen(tiny_model, ATSKV(budget=0.2, window=16, page_size=8, max_pages=6,
                                  fit_pages=30, dense_small=False), n=12, prompt=prompt)
    kept = [n for layer in ctx_out.stats["kept_tokens"] for n in layer]
    assert sum(kept) > sum(n for layer in paged.stats["kept_tokens"] for n in layer)
    full = gen(tiny_model, METHODS.get("full")(), n=12, prompt=prompt)
    assert ctx_out.kv_bytes_after_compression <= 0.2 * full.kv_bytes_after_compression * 1.03
    # bytes per kept token: a full cache's (K and V; index tensors are ~1% of a tiny head's
    # 128-byte token), where the paged store adds its page summaries
    per_token = ctx_out.kv_bytes_after_compression / sum(kept)
    assert per_token <= full.kv_bytes_after_compression / (len(prompt) * len(kept)) * 1.05
    paged_kept = sum(n for layer in paged.stats["kept_tokens"] for n in layer)
    assert paged.kv_bytes_after_compression / paged_kept > per_token
    assert not ATSKV(budget=0.9, dense_small=True, page_size=8, fit_pages=30).unranked(540)
    # the boundary: an average head of fit() pages is attended whole, one more token ranks
    assert ATSKV(page_size=8, fit_pages=30).unranked(240)
    assert not ATSKV(page_size=8, fit_pages=30).unranked(241)
    assert not ATSKV(page_size=8, fit_pages=30, dense_small=False).unranked(8)


def test_a_small_budget_caps_no_head():
    """dense_small decodes densely without capping heads: where reconstruction needs one head
    most, the global allocation gives it more than fit() pages' tokens, and the heads together
    keep no more than the budget."""
    from atskv.core.method import PrefillContext

    torch.manual_seed(3)
    d, n, layers, heads = 16, 400, 2, 2
    keys = [torch.randn(heads, n, d) for _ in range(layers)]
    values = [torch.randn(heads, n, d) for _ in range(layers)]
    queries = [torch.randn(2 * heads, 8, d) for _ in range(layers)]
    recon = [torch.rand(heads, n) * 1e-3 for _ in range(layers)]
    recon[0][0, 100:300] += 1.0  # one head needs 200 tokens
    m = ATSKV(budget=0.1, signal="recon", window=8, chunk=1, span=0, min_share=0.0,
              consensus=0.0, question_boost=0.0, page_size=8, fit_pages=10)
    assert m.unranked(m.prompt_keep(n))  # 40 tokens a head, at most 10 pages of 8
    state = m.begin(n, 4)
    keep = m.select(state, PrefillContext(keys, values, queries, n, 4, d**-0.5,
                                          reconstruction=recon))
    sizes = [int(k.numel()) for layer in keep for k in layer]
    assert m.unranked(state.keep) and max(sizes) > m.fit() * m.page_size
    assert sum(sizes) <= layers * heads * m.prompt_keep(n)


def test_summaries_are_paid_per_page_a_head_owns():
    """One summary slot per page of the buffers: a short head beside a long one pays for its own
    pages, not for the long head's (a per-head ``(H, P)`` layout padded to the longest would
    hold 3 x 60 slots here, not 60 + 2 + 2)."""
    keys = torch.randn(3, 240, 8)
    store = StaticPagedKV(keys, keys.clone(), [torch.arange(240), torch.arange(5),
                                               torch.arange(7)], [0, 0, 0], page=4)
    assert store.capacities == [240, 8, 8]
    assert store.summary_bytes() == (60 + 2 + 2) * 3 * 8 * 4
    assert store.kmin.shape == (3, 60, 8)  # the per-head view, for the ranking


def test_a_skewed_allocation_stores_within_the_budget():
    """When the global allocation gives one head most of a layer's budget, the page summaries of
    the heads beside it cost only their own pages: the stored bytes (keys, values, summaries,
    pinned flags, index tensors) stay within budget x the prompt's K and V."""
    from atskv.core.method import PrefillContext

    torch.manual_seed(3)
    d, n, layers, heads, budget = 16, 2000, 2, 3, 0.2
    keys = [torch.randn(heads, n, d) for _ in range(layers)]
    values = [torch.randn(heads, n, d) for _ in range(layers)]
    queries = [torch.randn(2 * heads, 8, d) for _ in range(layers)]
    recon = [torch.rand(heads, n) * 1e-3 for _ in range(layers)]
    for layer in range(layers):
        recon[layer][0, 100:1100] += 1.0  # one head per layer wants half of the context
    m = ATSKV(budget=budget, signal="recon", window=8, chunk=1, span=0, min_share=0.0,
              consensus=0.0, question_boost=0.0, page_size=16, fit_pages=4, dense_small=False)
    state = m.begin(n, 0)
    keep = m.select(state, PrefillContext(keys, values, queries, n, 0, d**-0.5,
                                          reconstruction=recon))
    sizes = [[int(k.numel()) for k in layer] for layer in keep]
    assert all(layer[0] > 4 * sum(layer[1:]) for layer in sizes)  # skewed: one head holds most
    state.stores = [m.make_store(state, i, keys[i], values[i], keep[i]) for i in range(layers)]
    full = layers * heads * n * 2 * d * 4
    assert state.nbytes() <= budget * full * 1.01, state.nbytes() / full


def test_consensus_of_the_top_heads_keeps_what_few_heads_single_out():
    """consensus(top=k): a token that one head attends sharply outweighs tokens that every head
    attends a little (a shared preamble), which the mean over every head favours."""
    n_layers, n_heads, m = 2, 6, 40
    rel = torch.full((n_layers, n_heads, m), 0.5 / m)
    rel[..., :4] += 0.5 / 4  # every head: half of its mass on the preamble's 4 tokens
    rel[1, 2] = 0.0
    rel[1, 2, 30] = 1.0  # one retrieval head: all of its mass on token 30
    mean = consensus(rel)
    assert float(mean[30]) < float(mean[:4].min())
    torch.testing.assert_close(mean, rel.mean(dim=(0, 1)))
    for top in (1, 3):
        shared = consensus(rel, top)
        assert int(shared.argmax()) == 30
        assert abs(float(shared.sum()) - 1.0) < 1e-6
    torch.testing.assert_close(consensus(rel, 100), mean)  # every head: the mean again


def test_concentrated_head_gets_less_than_uniform_head():
    n = 64
    concentrated = torch.full((n,), 1e-4)
    concentrated[17] = 1.0
    uniform = torch.ones(n)
    scores = torch.stack([concentrated, uniform])[None]
    scores = scores / scores.sum(-1, keepdim=True)
    counts = allocate(scores, 40, min_share=0.2)[0]
    assert counts[0] < counts[1]
    assert int(counts.sum()) == 40


def test_relevance_follows_attention_concentration():
    """End to end from queries/keys: a head whose window queries all point at one key keeps fewer
    tokens than a head whose queries see every key alike."""
    torch.manual_seed(0)
    d, n, w = 16, 200, 8
    k = torch.randn(2, n, d)
    q = torch.zeros(2, w, d)  # one query head per KV head
    q[0] = k[0, 50] * 4.0  # head 0: attention concentrated on token 50
    v = torch.ones(2, n, d)
    m = ATSKV(budget=0.3, window=w, chunk=1, kernel=1, signal="attn", n_sink=0)
    rel = m.relevance(q, k, v, d**-0.5, 0)
    counts = allocate(chunk_sum(rel, 1)[None], 60, 0.2)[0]
    assert counts[0] < counts[1]
    assert rel[0].argmax() == 50


def test_chunks_keep_whole_spans(tiny_model):
    prompt = list(range(100, 700))
    out = gen(tiny_model, ATSKV(budget=0.2, chunk=8, window=16, n_sink=4), n=2, prompt=prompt)
    for layer in out.stats["kept_indices"]:
        for kept in layer:
            middle = kept[(kept >= 4) & (kept < len(prompt) - 16)] - 4
            # every kept middle token belongs to a fully kept chunk of 8
            assert torch.isin(middle // 8 * 8 + torch.arange(8)[:, None], middle).all()


def test_non_adaptive_is_uniform_and_adaptive_is_not(tiny_model):
    prompt = list(range(100, 700))
    uni = gen(tiny_model, ATSKV(budget=0.2, adaptive=False, window=16), n=2, prompt=prompt)
    ada = gen(tiny_model, ATSKV(budget=0.2, adaptive=True, window=16), n=2, prompt=prompt)
    assert len({n for layer in uni.stats["kept_tokens"] for n in layer}) == 1
    assert len({n for layer in ada.stats["kept_tokens"] for n in layer}) > 1
    total = sum(map(sum, uni.stats["kept_tokens"]))
    assert abs(sum(map(sum, ada.stats["kept_tokens"])) - total) <= 8 * 6  # same global budget


def test_static_store_keeps_true_page_bounds():
    torch.manual_seed(0)
    keys = torch.randn(2, 50, 4)
    keep = [torch.arange(0, 50, 2), torch.arange(7)]
    store = StaticPagedKV(keys, keys.clone(), keep, [9, 12], page=4)
    for _ in range(9):
        new = torch.randn(2, 4)
        store.append(new, new)
    for h in range(2):
        n = int(store.lens[h])
        seg = store.k[int(store.offsets[h]) : int(store.offsets[h]) + n]
        lo, hi = page_minmax(seg, 4)
        torch.testing.assert_close(store.kmin[h, : lo.shape[0]], lo)
        torch.testing.assert_close(store.kmax[h, : hi.shape[0]], hi)
        sums = torch.nn.functional.pad(seg, (0, 0, 0, -n % 4)).view(-1, 4, 4).sum(1)
        torch.testing.assert_close(store.ksum[h, : sums.shape[0]], sums)
        assert store.page_counts()[h].tolist()[: sums.shape[0]] == [min(4, n - 4 * i) for i in range(sums.shape[0])]
    assert store.capacities == [36, 20]  # 25 + 9 -> 36, 7 + 12 -> 20: whole pages, ragged


def test_ablation_switches_are_config_fields(compose):
    cfg = compose("method=atskv", "method.signal=vnorm", "method.adaptive=false",
                  "method.sparse_decode=false", "method.static=false", "method.chunk=1",
                  "method.consensus_top=3", "method.dense_small=false")
    assert cfg.method.signal == "vnorm" and cfg.method.adaptive is False
    assert cfg.method.consensus_top == 3 and cfg.method.dense_small is False


def test_bad_signal_is_rejected():
    from atskv.core.types import ConfigError

    with pytest.raises(ConfigError, match="signal='keys'.*attn, attn_vnorm, vnorm"):
        ATSKV(signal="keys")


def test_a_head_is_ranked_only_when_that_takes_less_time():
    """fit(): the most pages a head may hold and still be attended whole, unranked. Ranking a
    head of n pages costs RANK_TOKENS tokens' attention per page and then attends at most
    max_pages pages of page tokens; attending it whole attends its n pages: ranking must cost
    less exactly above fit()."""
    from atskv.core.types import ConfigError
    from atskv.methods.atskv import RANK_TOKENS

    def cost(n, page, max_pages):  # ranked, attended whole (in tokens' attention)
        return RANK_TOKENS * n + page * max_pages, page * n

    for page in (RANK_TOKENS + 1, 8, 16, 64):
        for max_pages in (1, 3, 48):
            fit = ATSKV(page_size=page, max_pages=max_pages).fit()
            assert fit >= max_pages
            for n in range(1, fit + 1):
                ranked, whole = cost(n, page, max_pages)
                assert ranked >= whole, (page, max_pages, n)
            ranked, whole = cost(fit + 1, page, max_pages)
            assert ranked < whole, (page, max_pages)
    assert ATSKV().fit() == 69  # the defaults: 16-token pages, max_pages 48
    for page in (1, RANK_TOKENS):  # a page's ranking costs as much as attending it: never ranked
        assert ATSKV(page_size=page).fit() > 2**40
    assert ATSKV(fit_pages=40).fit() == 40
    with pytest.raises(ConfigError, match="fit_pages=0"):
        ATSKV(fit_pages=0)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(tiny_model):
    model = tiny_model.to("cuda")
    try:
        kw = dict(budget=0.3, window=16, max_pages=4)
        eager = Engine(model, None).generate(PROMPT, ATSKV(**kw), 16, stop_at_eos=False,
                                             return_logits=True)
        graphed = Engine(model, None, cuda_graph=True).generate(
            PROMPT, ATSKV(**kw), 16, stop_at_eos=False, return_logits=True)
        assert graphed.stats["cuda_graph"] is True
        assert graphed.token_ids == eager.token_ids
        assert max_diff(graphed.stats["logits"], eager.stats["logits"]) < 1e-3
    finally:
        model.to("cpu")


def test_reconstruction_signal_scores_what_reconstructing_the_context_needs(smollm2_tokenizer):
    """``signal=recon``: KVzip's passes (the same ones kvzip asks for, so a sweep computes them
    once) and relevance from their scores as they are, the window's attention unused; without
    the passes the method says what it needs."""
    torch.manual_seed(1)
    prompt = list(range(10, 300))
    m = ATSKV(budget=0.2, signal="recon")
    assert m.reconstruction(prompt, smollm2_tokenizer) == \
        METHODS.get("kvzip")(budget=0.2).reconstruction(prompt, smollm2_tokenizer)
    assert ATSKV(budget=0.2, signal="attn_vnorm").reconstruction(prompt, smollm2_tokenizer) == []
    from atskv.core.types import ConfigError

    chunked = ATSKV(budget=0.2, recon_chunk=100).reconstruction(prompt, smollm2_tokenizer)
    assert chunked == METHODS.get("kvzip")(budget=0.2, chunk=100).reconstruction(
        prompt, smollm2_tokenizer)
    assert len(chunked) == 3  # 286 tokens after the sinks, in passes of at most 100
    with pytest.raises(ConfigError, match="recon_chunk=0"):
        ATSKV(recon_chunk=0)
    d, n, w = 16, 120, 8
    k, v = torch.randn(2, n, d), torch.ones(2, n, d)
    q = torch.zeros(2, w, d)
    q[:] = k[:, 30:31] * 4.0  # the window attends token 30
    recon = torch.rand(2, n) * 0.01
    recon[:, 70] = 1.0  # reconstruction needs token 70
    rel = m.relevance(q, k, v, d**-0.5, 4, recon)
    assert torch.equal(rel, recon[:, 4 : n - w])
    with pytest.raises(ValueError, match="reconstruction passes"):
        m.relevance(q, k, v, d**-0.5, 4, None)


def question_select(**fields):
    """atskv's selection (signal=recon) on a hand-built 400-token prefill of 2 layers and 2
    heads: the last 32 queries attend token 50, reconstruction needs tokens 200-299 (more than a
    0.1 budget holds) and token 50 a little."""
    from atskv.core.method import PrefillContext

    torch.manual_seed(2)
    d, n, layers, heads = 16, 400, 2, 2
    keys = [torch.randn(heads, n, d) for _ in range(layers)]
    values = [torch.randn(heads, n, d) for _ in range(layers)]
    queries = [k[:, 50:51].repeat(1, 32, 1) * 4.0 for k in keys]
    recon = [torch.rand(heads, n) * 0.01 for _ in range(layers)]
    for r in recon:
        r[:, 200:300] += 1.0
        r[:, 50] += 0.5
    fields = {"question_boost": 0.0, "budget": 0.1, **fields}
    follows = fields.pop("question_follows", False)
    m = ATSKV(signal="recon", window=8, chunk=1, span=0, min_share=0.0, **fields)
    ctx = PrefillContext(keys, values, queries, n, 4, d**-0.5, reconstruction=recon,
                         question_follows=follows)
    return m.select(m.begin(n, 4), ctx)


def test_question_share_keeps_what_the_question_attends_within_the_same_budget():
    """``question_share`` (with ``signal=recon``): that share of each head's middle tokens is
    picked by the last prompt queries' attention (and the tokens after them), the rest by
    reconstruction; the heads keep as many tokens as without the share, none twice."""
    at = {"budget": 0.2, "question_below": 0.25}  # a budget the share asks at
    without, with_share = question_select(**at), question_select(question_share=0.25, **at)
    assert sum(map(len, sum(without, []))) == sum(map(len, sum(with_share, [])))
    for a, b in zip(without, with_share):
        for x, y in zip(a, b):
            assert len(torch.unique(y)) == len(y)
            # the question's token 50, pooled over its neighbours and spread forward: a
            # quarter of the head's ~68 middle tokens lie in 47..69 with the share, none but
            # 50 itself without
            near = set(range(47, 70)) - {50}
            assert not near & set(x.tolist()) and len(near & set(y.tolist())) >= 15
    with pytest.raises(ValueError, match="question_share"):
        ATSKV(question_share=1.5)


def test_question_boost_lifts_what_reconstruction_and_the_question_both_ask_for():
    """``question_boost``: reconstruction scores times (1 + boost * the question's attention
    relative to uniform): token 50 (reconstruction 0.5, the question's target) outranks the
    tokens reconstruction alone prefers (1.0); no boost keeps it out."""
    plain, boosted = question_select(), question_select(question_boost=1.0)
    assert sum(map(len, sum(plain, []))) == sum(map(len, sum(boosted, [])))
    for a, b in zip(plain, boosted):
        for x, y in zip(a, b):
            assert 50 not in x.tolist() and 50 in y.tolist()


def same_selection(a, b):
    return all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("knob", [{"question_boost": 1.0}, {"question_share": 0.25}])
def test_the_question_is_asked_only_where_it_is_in_view(knob):
    """With ``question_follows`` (the question-agnostic protocol: the prompt ends with the
    context) neither the boost nor the share reads the prompt's last queries: the selection is
    the one without them, token for token."""
    plain = question_select()
    assert not same_selection(question_select(**knob), plain)  # it matters where it is asked
    assert same_selection(question_select(question_follows=True, **knob), plain)


def test_the_question_is_asked_only_at_small_budgets():
    """``question_below``: a head keeping that share of the prompt or more selects by
    reconstruction alone (budget 0.2 against the default 0.15); a larger threshold asks."""
    plain = question_select(budget=0.2)
    assert same_selection(question_select(budget=0.2, question_boost=1.0), plain)
    assert not same_selection(question_select(budget=0.2, question_boost=1.0,
                                              question_below=0.25), plain)


def test_the_question_alone_scores_from_its_share():
    """``question_alone_from``: where the question is in view and a head keeps that share of the
    prompt or more, the question's attention (token 50) replaces reconstruction (tokens 200-299)
    as the relevance; below the share, or with the question after compression, the selection is
    reconstruction's, token for token."""
    plain = question_select(budget=0.2)
    alone = question_select(budget=0.2, question_alone_from=0.15)
    def in_recon(selection):
        return sum(int(((t >= 200) & (t < 300)).sum()) for layer in selection for t in layer)

    assert all(50 in t.tolist() for layer in alone for t in layer)
    assert in_recon(plain) >= 0.6 * sum(t.numel() for layer in plain for t in layer)
    assert in_recon(alone) < in_recon(plain) / 2
    assert same_selection(question_select(budget=0.2, question_alone_from=0.25), plain)
    assert same_selection(question_select(budget=0.2, question_alone_from=0.15,
                                          question_follows=True), plain)


def test_no_reconstruction_passes_where_the_question_scores_alone(smollm2_tokenizer):
    prompt = list(range(10, 300))
    m = ATSKV(budget=0.2, question_alone_from=0.15)
    assert m.reconstruction(prompt, smollm2_tokenizer) == []
    assert m.reconstruction(prompt, smollm2_tokenizer, question_follows=True) == \
        ATSKV(budget=0.2).reconstruction(prompt, smollm2_tokenizer) != []
