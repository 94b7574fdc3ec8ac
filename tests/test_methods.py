"""KV-cache methods: scorers against naive loops, kept sets, budgets of the prompt, equality with
the full cache at budget 1, every stored byte counted, settings frozen, and one SmolLM2 smoke run
per method. Parametrised from the method registry and the capabilities each class declares, so
a new method is picked up without editing this file."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import generate

from atskv.core.stores import PackedKV, page_minmax
from atskv.methods import METHODS, PrefillContext
from atskv.methods.pages import (
    PageBounds,
    attend_tokens,
    page_upper_bound,
    sparq_page_scores,
)
from atskv.methods.rocket_kv import token_budget_for
from atskv.methods.scoring import (
    ScoredSelection,
    accumulated_attention,
    fit_total,
    keep_topk_plus_window,
    pyramid_budgets,
    window_scores,
)

ALL = METHODS.names()
COMPRESSING = [n for n in ALL if METHODS.get(n).compresses]
SCORED = [n for n in ALL if issubclass(METHODS.get(n), ScoredSelection)]
PROMPT = list(range(100, 400))  # 300 tokens


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def naive_attention_rows(q, k, scale, first_pos):
    """probs[h_q][i][j] for query i at absolute position first_pos + i (loops, float64)."""
    h_q, n_q, _ = q.shape
    g = h_q // k.shape[0]
    out = torch.zeros(h_q, n_q, k.shape[1], dtype=torch.float64)
    for hq in range(h_q):
        for i in range(n_q):
            pos = first_pos + i
            logits = [float(q[hq, i] @ k[hq // g, j]) * scale for j in range(pos + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            for j in range(pos + 1):
                out[hq, i, j] = e[j] / sum(e)
    return out


def test_window_scores_match_naive():
    torch.manual_seed(0)
    q, k = torch.randn(4, 5, 8), torch.randn(2, 20, 8)
    w, kernel, n = 5, 3, 20
    probs = naive_attention_rows(q, k, 0.3, n - w)
    raw = torch.zeros(2, n - w, dtype=torch.float64)
    for hq in range(4):
        for j in range(n - w):
            raw[hq // 2, j] += probs[hq, :, j].sum()
    pooled = torch.stack([torch.stack([raw[h, max(0, j - 1) : j + 2].max() for j in range(n - w)])
                          for h in range(2)])
    got = window_scores(q, k, 0.3, w, kernel, "max")
    torch.testing.assert_close(got.double(), pooled, atol=1e-5, rtol=1e-5)
    avg = window_scores(q, k, 0.3, w, 1, "max", reduce="mean")
    torch.testing.assert_close(avg.double(), raw / 2, atol=1e-5, rtol=1e-5)


def test_accumulated_attention_matches_naive():
    torch.manual_seed(1)
    q, k = torch.randn(4, 12, 8), torch.randn(2, 12, 8)
    probs = naive_attention_rows(q, k, 0.25, 0)
    want = torch.stack([probs[2 * h : 2 * h + 2].sum(dim=(0, 1)) for h in range(2)])
    for chunk in (1, 5, 64):
        got = accumulated_attention(q, k, 0.25, block=chunk * 4 * 12)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # only the last 4 queries (positions 8..11)
    got = accumulated_attention(q[:, 8:], k, 0.25, block=3 * 4 * 12)
    want = torch.stack([naive_attention_rows(q[:, 8:], k, 0.25, 8)[2 * h : 2 * h + 2].sum((0, 1))
                        for h in range(2)])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_page_bounds_match_naive_and_bound_qk():
    torch.manual_seed(2)
    keys, q = torch.randn(2, 37, 6), torch.randn(2, 3, 6)
    lo, hi = page_minmax(keys, 16)
    assert lo.shape == (2, 3, 6)
    for h in range(2):
        for p in range(3):
            seg = keys[h, p * 16 : (p + 1) * 16]
            assert torch.equal(lo[h, p], seg.min(0).values)
            assert torch.equal(hi[h, p], seg.max(0).values)
    ub = page_upper_bound(q, lo, hi)
    for h in range(2):
        for i in range(3):
            for p in range(3):
                want = sum(max(q[h, i, d] * hi[h, p, d], q[h, i, d] * lo[h, p, d]) for d in range(6))
                assert ub[h, i, p].item() == pytest.approx(float(want), abs=1e-5)
                dots = keys[h, p * 16 : (p + 1) * 16] @ q[h, i]
                assert (dots <= ub[h, i, p] + 1e-5).all()


def test_sparq_page_scores_match_naive():
    torch.manual_seed(3)
    q, lo, hi = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    got, dims = sparq_page_scores(q, lo, hi, r=3)
    for h in range(2):
        mass = [sum(abs(float(q[h, i, d])) for i in range(3)) for d in range(8)]
        top = sorted(range(8), key=lambda d: -mass[d])[:3]
        assert sorted(dims[h].tolist()) == sorted(top)
        for i in range(3):
            frac = sum(abs(float(q[h, i, d])) for d in top) / sum(abs(float(x)) for x in q[h, i])
            for p in range(5):
                bound = sum(max(float(q[h, i, d] * hi[h, p, d]), float(q[h, i, d] * lo[h, p, d]))
                            for d in top)
                assert got[h, i, p].item() == pytest.approx(bound / math.sqrt(8 * frac), abs=1e-5)


def test_page_bounds_follow_appends():
    torch.manual_seed(4)
    keys = torch.randn(2, 21, 4)
    store = PackedKV.from_selection(keys, keys.clone(), [torch.arange(21)] * 2, [12, 12])
    bounds = PageBounds(store, 8)
    for _ in range(12):
        k, _ = store.dense()
        lo, hi = bounds.sync(slice(0, 2), k)
        want_lo, want_hi = page_minmax(k, 8)
        assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
        new = torch.randn(2, 4) * 3
        store.append(new, new)


def test_keep_topk_plus_window_and_snapkv_picks_attended_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]])
    kept = keep_topk_plus_window(scores, 2, 3)
    assert kept[0].tolist() == [1, 3, 5, 6, 7] and kept[1].tolist() == [0, 1, 5, 6, 7]
    # crafted: the window queries equal the keys of tokens 3 and 11 (scaled): those win
    torch.manual_seed(5)
    k = torch.randn(1, 30, 16)
    k = k / k.norm(dim=-1, keepdim=True)
    q = torch.stack([k[0, 3], k[0, 11]] * 2)[None].repeat(2, 1, 1) * 20  # (2 q heads, 4, 16)
    snap = METHODS.get("snapkv")(kv_size=6, window=4, kernel=1)
    state = snap.begin(30, 2)
    kept = snap.select(state, PrefillContext([k], [k.clone()], [q], 30, 2, 1.0))
    assert len(kept) == 1 and kept[0][0].tolist() == [3, 11, 26, 27, 28, 29]


def test_budget_split_helpers():
    assert fit_total([5, 5, 5], 12, [10, 10, 10]) == [5, 5, 2]
    assert fit_total([5, 5, 1], 9, [10, 10, 10]) == [5, 4, 0]
    b = pyramid_budgets(100, 7, 20, 1000)
    assert sum(b) == 700 and b == sorted(b, reverse=True) and b[0] > b[-1]
    assert pyramid_budgets(100, 7, 20, 150) == [100] * 7  # too short for the pyramid: uniform
    assert token_budget_for(1.0, 512) == pytest.approx(512)


@pytest.mark.parametrize("budget", [0.05, 0.25, 0.5])
@pytest.mark.parametrize("max_new", [16, 512])
def test_rocket_kv_budget_is_of_the_prompt(budget, max_new):
    """Stage 1 keeps budget x prompt tokens whatever the generation length, and the per-step
    budget t is the one whose paper capacity S / c^alpha is exactly that plus the generation."""
    m = METHODS.get("rocket_kv")(budget=budget)
    state = m.begin(2048, max_new)
    assert state.keep == round(budget * 2048)
    total = 2048 + max_new
    c = total / state.t
    alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
    assert total / c**alpha == pytest.approx(state.keep + max_new, rel=1e-6)
    assert state.top_k == int(state.t / 2)
    # the paper's own parameterisation: its 2 x max_new floor takes prompt tokens
    paper = METHODS.get("rocket_kv")(token_budget=64).begin(2048, 512)
    assert paper.keep == 2 * 512 - 512


def _ctx(keys, queries, max_new=4):
    n = keys[0].shape[1]
    return PrefillContext(keys, [k.clone() for k in keys], queries, n, max_new, 1.0)


def test_dynamic_kv_budgets_sum_and_flat_layer_wins():
    torch.manual_seed(6)
    n, n_layers = 200, 6
    keys = [torch.randn(2, n, 16) for _ in range(n_layers)]
    queries = []
    for layer in range(n_layers):
        if layer % 2:  # flat: small queries attend almost uniformly
            queries.append(torch.randn(4, 8, 16) * 0.05)
        else:  # peaked on a few tokens
            queries.append(keys[layer][:, [5, 50, 90, 120]].repeat_interleave(2, 0).repeat(1, 2, 1)
                           * 5)
    m = METHODS.get("dynamic_kv")(budget=0.2, kernel=1)
    state = m.begin(n, 4)
    kept = m.select(state, _ctx(keys, queries))
    base = state.keep - 8
    assert state.keep == 40
    assert sum(state.budgets) == base * n_layers
    lens = [len(layer[0]) for layer in kept]
    assert all(lens[odd] > lens[odd - 1] for odd in range(1, n_layers, 2))
    assert sum(lens) == state.keep * n_layers
    for layer in kept:
        for idx in layer:
            assert idx[-8:].tolist() == list(range(n - 8, n))  # the window is always kept
            assert torch.equal(idx, idx.sort().values)


def test_h2o_evicts_lowest_older_token_and_keeps_recent():
    m = METHODS.get("h2o")(kv_size=4)
    state = m.begin(6, 2)  # capacity 4: 2 heavy + 2 recent
    assert (state.keep, state.heavy, state.recent) == (4, 2, 2)
    keys = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    store = PackedKV.from_selection(keys, keys.clone(), [torch.tensor([0, 2, 4, 5])] * 2, [0, 0])
    state.scores = [torch.tensor([[3.0, 1.0, 9.0, 9.0], [0.5, 1.0, 9.0, 9.0]])]
    m.before_append(state, 0, store)
    assert store.head(0)[0].flatten().tolist() == [0, 4, 5]  # 2 (score 1) goes, not recent ones
    assert store.head(1)[0].flatten().tolist() == [2, 4, 5]
    assert state.scores[0][0, :3].tolist() == [3.0, 9.0, 9.0]


def _method(name, budget, **kw):
    return METHODS.get(name)(budget=budget, **kw)


@pytest.fixture(scope="module")
def full_out(tiny_model):
    """The full cache's generation on PROMPT (8 new tokens, logits), computed once."""
    return generate(tiny_model, _method("full", 1.0), PROMPT, 8, return_logits=True)


@pytest.mark.parametrize("name,kw", [(n, {}) for n in ALL]
                         + [("quest", {"token_budget": 10**6}),
                            ("rocket_kv", {"token_budget": 10**6}),
                            ("h2o", {"prefill_window": 16})])
def test_budget_one_equals_full(tiny_model, full_out, name, kw):
    budget = 0.3 if kw.get("token_budget") else 1.0
    full = full_out
    out = generate(tiny_model, _method(name, budget, **kw), PROMPT, 8, return_logits=True)
    assert out.token_ids == full.token_ids
    # the same attention up to summation order (static stores mask rows, packed ones do not)
    assert max_diff(out.stats["logits"], full.stats["logits"]) <= 1e-5
    assert out.stats["prompt_tokens_kept"]["min"] == len(PROMPT)
    if not METHODS.get(name).sparse_reads:
        assert out.kv_bytes_peak == full.kv_bytes_peak


def test_sparse_stage_with_everything_selected_is_full_attention():
    torch.manual_seed(7)
    k, v, q = torch.randn(2, 40, 16), torch.randn(2, 40, 16), torch.randn(2, 2, 16)
    keep = [torch.arange(40)] * 2
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(attend_tokens(q, k, v, torch.arange(40).repeat(2, 1), 0.25), want)
    m = _method("rocket_kv", 0.5, token_budget=8)
    state = m.begin(30, 1)
    store = PackedKV.from_selection(k, v, keep, [0, 0])
    out, read = m.sparse(state, q, k, v, 0.25, 40, PageBounds(store, state.chunk), slice(0, 2))
    torch.testing.assert_close(out, want)
    # quest with a budget covering every page reads everything exactly
    qm = _method("quest", 0.5, token_budget=48, dense_layers=0)
    state = qm.begin(40, 1)
    store = qm.make_store(state, 0, k, v, keep)
    res = qm.attend(state, 0, store, q, 0.25)
    torch.testing.assert_close(res.out, want)
    assert res.read_bytes == store.total_tokens() * store.token_bytes()


def test_quest_and_rocket_read_only_selected_pages():
    torch.manual_seed(8)
    k, v, q = torch.randn(2, 64, 16), torch.randn(2, 64, 16), torch.randn(2, 2, 16)
    keep = [torch.arange(64)] * 2
    qm = _method("quest", 0.5, token_budget=32, page_size=16, dense_layers=0)
    state = qm.begin(64, 1)
    store = qm.make_store(state, 0, k, v, keep)
    res = qm.attend(state, 0, store, q, 0.25)
    # 2 pages of 16 tokens per head + min/max of 4 pages per head
    assert res.read_bytes == (2 * 32 + 2 * 4) * store.token_bytes()
    scores = page_upper_bound(q, *page_minmax(k, 16)).sum(1)
    pages = scores.topk(2, dim=-1).indices.sort(dim=-1).values
    idx = (pages[..., None] * 16 + torch.arange(16)).flatten(1)
    torch.testing.assert_close(res.out, attend_tokens(q, k, v, idx, 0.25))
    rm = _method("rocket_kv", 0.5, token_budget=16)
    state = rm.begin(64, 1)
    store = rm.make_store(state, 0, k, v, keep)
    res = rm.attend(state, 0, store, q, 0.25)
    assert res.read_bytes < store.total_tokens() * store.token_bytes()
    assert res.out.shape == q.shape


def _expected_kept(name: str, budget: float, prompt_len: int) -> tuple[float, float]:
    """The range ``prompt_tokens_kept`` (mean over layers and heads) must fall in: the budget's
    tokens (less what the method pays out of them for metadata), up to one 16-token chunk under
    it for methods that select by chunks."""
    method = METHODS.get(name)(budget=budget)
    if not method.compresses:
        return prompt_len, prompt_len
    target = method.prompt_target(prompt_len)
    assert target <= round(budget * prompt_len)
    return max(1, target - 16), target


@pytest.mark.parametrize("budget", [0.1, 0.5])
@pytest.mark.parametrize("name", ALL)
def test_methods_keep_budget_x_prompt_whatever_the_generation_length(tiny_model, full_out, name,
                                                                    budget):
    """budget is a fraction of the prompt: the prompt tokens kept do not depend on how many
    tokens are generated, and the stored bytes are those tokens plus the generated ones
    (appending methods) or stay at the compressed size (evicting ones), plus metadata."""
    method = _method(name, budget)
    short = generate(tiny_model, method, PROMPT, 8)
    long = generate(tiny_model, method, PROMPT, 64)
    lo, hi = _expected_kept(name, budget, len(PROMPT))
    for out in (short, long):
        assert lo <= out.stats["prompt_tokens_kept"]["mean"] <= hi, out.stats["prompt_tokens_kept"]
    assert long.stats["prompt_tokens_kept"] == short.stats["prompt_tokens_kept"]
    assert len(short.token_ids) == 8 and len(long.token_ids) == 64
    cfg = tiny_model.config
    per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads  # K+V bytes of one token
                 * (cfg.hidden_size // cfg.num_attention_heads) * 4)
    kept = short.stats["prompt_tokens_kept"]["mean"]
    if METHODS.get(name).evicts_while_decoding:
        assert long.kv_bytes_peak == short.kv_bytes_peak  # stays at the compressed size
        assert kept * per_token <= short.kv_bytes_peak <= 1.1 * kept * per_token  # + scores
    else:  # appends: 63 generated tokens fed back instead of 7
        grown = long.kv_bytes_peak - short.kv_bytes_peak
        assert grown >= 56 * per_token
        assert short.kv_bytes_peak >= (kept + 7) * per_token
    if not METHODS.get(name).compresses:
        assert short.kv_bytes_peak >= full_out.kv_bytes_peak
    if METHODS.get(name).sparse_reads:
        assert short.decode_kv_read_bytes < full_out.decode_kv_read_bytes


def _tensors_reachable(obj, seen=None, out=None):
    """Every tensor reachable from ``obj`` through attributes, dataclass fields and containers."""
    seen = set() if seen is None else seen
    out = [] if out is None else out
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_reachable(v, seen, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors_reachable(v, seen, out)
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        for v in vars(obj).values() if hasattr(obj, "__dict__") else ():
            _tensors_reachable(v, seen, out)
    return out


def _held_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("budget", [0.1, 0.5])
@pytest.mark.parametrize("name", ALL)
def test_every_stored_byte_is_counted(tiny_model, name, budget):
    """Walk every tensor reachable from the method's per-generation state (its stores, page
    bounds, scores, index tensors, ...) and compare with the bytes the run reports: a method
    cannot keep metadata outside the count. Also: the settings object holds no tensor."""
    method = _method(name, budget)
    out = generate(tiny_model, method, PROMPT, 8, return_logits=True)
    state = out.stats["state"]
    walked = _tensors_reachable(state)
    assert walked, "the state holds no tensor"
    assert _held_bytes(walked) == state.allocated_bytes()
    assert out.kv_bytes_peak == state.allocated_bytes()  # generation ran to max_new_tokens
    assert not _tensors_reachable(method)


@pytest.mark.parametrize("name", ALL)
def test_room_reserved_for_generated_tokens_is_not_stored_bytes(tiny_model, name):
    """Rows, and page bounds/summaries of pages, reserved for tokens not generated yet are not
    counted: the bytes after compression do not depend on max_new_tokens (atskv: up to the
    pinned flags that pad each head to the longest head's pages, which are paid for)."""
    method = _method(name, 0.3)
    short = generate(tiny_model, method, PROMPT, 4).kv_bytes_after_compression
    long = generate(tiny_model, method, PROMPT, 40).kv_bytes_after_compression
    if name == "atskv":
        cfg = tiny_model.config
        pad = cfg.num_hidden_layers * cfg.num_key_value_heads * 3  # <= 3 one-byte flags a head
        assert 0 <= long - short <= pad
    else:
        assert long == short


@pytest.mark.parametrize("name", ALL)
def test_method_settings_are_frozen(name):
    cls = METHODS.get(name)
    assert cls.__dataclass_params__.frozen and cls.name == name
    m = cls()
    field = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(m, field, getattr(m, field))


@pytest.mark.parametrize("name", SCORED)
def test_kept_sets_keep_the_window(tiny_model, name):
    method = _method(name, 0.25)
    out = generate(tiny_model, method, PROMPT, 4, return_logits=True)
    w = min(method.window, round(0.25 * len(PROMPT)))
    for layer in out.stats["kept_indices"]:
        for idx in layer:
            assert idx[-w:].tolist() == list(range(len(PROMPT) - w, len(PROMPT)))
            assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)


def test_every_method_has_a_config(compose):
    from atskv.experiments.config import build_method

    for name in METHODS:
        cfg = compose(f"method={name}")
        assert cfg.method.name == name
        assert isinstance(build_method(cfg), METHODS.get(name))


def test_budget_and_kv_size_are_exclusive_and_checked():
    from atskv.core.types import ConfigError

    with pytest.raises(ConfigError, match="budget=0.2 and kv_size=64 are both set"):
        METHODS.get("snapkv")(budget=0.2, kv_size=64)
    with pytest.raises(ConfigError, match="kv_size=0"):
        METHODS.get("snapkv")(kv_size=0)
    assert METHODS.get("snapkv")(kv_size=64).prompt_keep(300) == 64
    assert METHODS.get("snapkv")(kv_size=640).prompt_keep(300) == 300
    assert METHODS.get("snapkv")(budget=0.2).prompt_keep(300) == 60


@pytest.mark.slow
def test_every_method_runs_on_smollm2(smollm2_model, smollm2_tokenizer):
    from atskv.benchmarks.synthetic import SyntheticBenchmark

    cfg = SimpleNamespace(name="synthetic", n_samples=None, tasks=["single_needle"], data_dir=None,
                          haystack="generated", max_new_tokens=4)
    (sample,) = SyntheticBenchmark(cfg).load(smollm2_tokenizer, 512, 1, seed=0)
    for name in COMPRESSING:
        out = generate(smollm2_model, _method(name, 0.5), sample.input_ids, sample.max_new_tokens,
                       tokenizer=smollm2_tokenizer)
        assert len(out.token_ids) == sample.max_new_tokens, name
        lo, hi = _expected_kept(name, 0.5, 512)
        assert lo <= out.stats["prompt_tokens_kept"]["mean"] <= hi, name
