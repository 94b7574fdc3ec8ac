"""AdaKV and Expected Attention: head-wise budgets (totals, floor, concentrated vs diffuse heads),
kept sets that are exactly the top-scored tokens, the RoPE un-rotation against the model's own
rotary embedding, Expected Attention's scores against a direct float64 computation, and its
independence from the last prompt queries beyond their mean and covariance."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import gamma, generate, small_llama

from atskv.core import seam
from atskv.core.types import ConfigError
from atskv.methods import METHODS, PrefillContext
from atskv.methods.expected_attention import average_rotation, unrotate
from atskv.methods.scoring import adaptive_head_budgets, window_scores

PROMPT = list(range(100, 400))  # 300 tokens
#: the relative error of Expected Attention's float32 scores on the hand-built cases below
#: (|q| < 4, |k| = 1.5, scale 0.5, d = 8): a logit sums d^2 + d products, after the statistics
#: over 10 queries, a 2-term un-rotation and float32 angles (u x position, positions < 40):
#: under 320 roundings of terms whose magnitudes sum to under 8; a logit error D moves a
#: probability by a factor exp(2 D); the value norm adds d roundings
EA_REL = math.expm1(2 * gamma(320) * 8.0) + gamma(32)


def test_adaptive_head_budgets_by_hand():
    # top 4 of the layer: 0.9 (head 0), 0.5, 0.4, 0.3 (head 1) -> counts [1, 3]
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2]])
    assert adaptive_head_budgets(scores, 2, 0.0) == [1, 3]
    assert adaptive_head_budgets(scores, 2, 1.0) == [2, 2]  # the uniform split
    # 0.25: ideal [1.25, 2.75] -> floors [1, 2], the larger remainder gets the last token
    assert adaptive_head_budgets(scores, 2, 0.25) == [1, 3]
    # 0.5: ideal [1.5, 2.5], equal remainders -> the lower head
    assert adaptive_head_budgets(scores, 2, 0.5) == [2, 2]
    assert adaptive_head_budgets(scores, 0, 0.2) == [0, 0]
    assert adaptive_head_budgets(scores, 9, 0.2) == [4, 4]  # at most every candidate


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.37, 0.8, 1.0])
@pytest.mark.parametrize("per_head", [1, 7, 32, 100])
def test_adaptive_head_budgets_sum_floor_and_cap(alpha, per_head):
    torch.manual_seed(0)
    m = 100
    concentrated = torch.zeros(m)
    concentrated[[3, 40, 77]] = 10.0
    diffuse = torch.rand(m) * 0.1 + 1.0
    middle = torch.rand(m) ** 8
    scores = torch.stack([concentrated, diffuse, middle, torch.rand(m)])
    b = adaptive_head_budgets(scores, per_head, alpha)
    assert sum(b) == 4 * per_head
    assert all(math.floor(alpha * per_head) <= x <= m for x in b)
    if alpha < 1 and 3 < per_head < m:  # more than the 3 peaks per head
        assert b[0] < b[1]  # the concentrated head gives tokens to the diffuse one


def _ctx(keys, queries, values=None, **kw):
    n = keys[0].shape[1]
    values = values if values is not None else [torch.randn_like(k) for k in keys]
    return PrefillContext(keys, values, queries, n, 4, 0.25, **kw)


def _peaked_and_flat(n=200, d=16, n_layers=2, seed=0):
    """Per layer, KV head 0's window queries (query heads 0 and 1) point at 4 keys; KV head 1's
    (query heads 2 and 3) are tiny, so its attention is flat."""
    torch.manual_seed(seed)
    keys = [torch.nn.functional.normalize(torch.randn(2, n, d), dim=-1) for _ in range(n_layers)]
    queries = []
    for k in keys:
        peaked = k[0, [5, 50, 90, 120]].repeat(2, 1) * 40  # (8, d): the window's queries
        flat = torch.randn(8, d) * 0.01
        queries.append(torch.stack([peaked, peaked, flat, flat]))  # (H_q=4, w=8, d)
    return keys, queries


def test_adakv_moves_budget_to_the_diffuse_head_and_keeps_the_top_scored():
    keys, queries = _peaked_and_flat()
    m = METHODS.get("adakv")(budget=0.2, window=8, kernel=1, floor_alpha=0.2)
    state = m.begin(200, 4)
    ctx = _ctx(keys, queries)
    kept = m.select(state, ctx)
    assert state.keep == 40
    for layer, heads in enumerate(kept):
        lens = [len(idx) for idx in heads]
        assert sum(lens) == 2 * state.keep  # the layer's total is the uniform one
        assert lens[0] < lens[1]
        assert min(lens) >= math.floor(0.2 * (40 - 8)) + 8  # floor + window
        scores = window_scores(queries[layer], keys[layer], 0.25, 8, 1, "max")
        for h, idx in enumerate(heads):
            assert idx[-8:].tolist() == list(range(192, 200))  # the window
            assert torch.equal(idx, idx.sort().values)
            chosen = torch.zeros(192, dtype=torch.bool)
            chosen[idx[:-8]] = True
            # exactly the top-scored: nothing dropped scores above anything kept
            assert scores[h][chosen].min() >= scores[h][~chosen].max()
    # floor_alpha 1 is SnapKV's uniform split
    uni = METHODS.get("adakv")(budget=0.2, window=8, kernel=1, floor_alpha=1.0)
    assert [[len(i) for i in layer] for layer in uni.select(uni.begin(200, 4), ctx)] == [[40, 40]] * 2


def test_adakv_and_expected_attention_keep_the_budget_per_layer(tiny_model):
    """Through the engine: each layer keeps exactly its KV heads x the budget, heads differ, and
    the ragged store holds exactly the kept rows (K and V, float32)."""
    cfg = tiny_model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    for name in ("adakv", "expected_attention"):
        out = generate(tiny_model, METHODS.get(name)(budget=0.2), PROMPT, 1)
        keep = round(0.2 * len(PROMPT))
        kept = out.stats["kept_tokens"]
        assert all(sum(layer) == cfg.num_key_value_heads * keep for layer in kept), (name, kept)
        assert any(len(set(layer)) > 1 for layer in kept), name
        kv = sum(map(sum, kept)) * 2 * d * 4
        assert kv <= out.kv_bytes_after_compression <= kv * 1.05  # + index tensors, flags


def _rotate_with_model(model, x, positions):
    """``x`` ``(H, n, d)`` rotated by the model's own rotary embedding and transformers'
    ``apply_rotary_pos_emb`` at ``positions``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.get_decoder().rotary_emb(x, positions[None])
    rotated, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
    return rotated[0]


@pytest.mark.parametrize("yarn", [False, True])
def test_unrotate_recovers_pre_rope_queries(yarn):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
             "original_max_position_embeddings": 2048} if yarn else None)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      **({"rope_parameters": rope} if rope else {}))
    model = LlamaForCausalLM(cfg).eval()
    inv_freq, scaling = seam.rotary(model)
    assert (scaling != 1.0) == yarn
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    positions = torch.tensor([0, 1, 17, 300, 2047, 8000])
    back = unrotate(_rotate_with_model(model, x, positions), inv_freq, scaling, positions)
    # each output element is a 2-term rotation of a 2-term rotation (cos and sin computed the
    # same way both times, each within a few units of roundoff), then one division: a few
    # dozen roundings of |x_i| + |x_pair(i)| at most
    pair = x.abs() + x.roll(8, dims=-1).abs()
    assert ((back - x).abs() <= gamma(32) * pair).all()


def test_average_rotation_is_the_mean_of_the_model_rotations(tiny_model):
    inv_freq, scaling = seam.rotary(tiny_model)
    d = 2 * inv_freq.numel()
    # row j of the rotated identity: e_j rotated at position t, i.e. column j of R_t
    mats = [_rotate_with_model(tiny_model, torch.eye(d)[None], torch.full((d,), t))[0].T
            for t in range(300, 310)]
    want = torch.stack(mats).double().mean(0)
    got = average_rotation(inv_freq, scaling, 300, 10).double()
    torch.testing.assert_close(got, want, atol=gamma(16), rtol=0)


def _rotation64(inv_freq, t):
    """The RoPE matrix at position ``t`` in float64, from explicit 2D rotations."""
    half = inv_freq.numel()
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i in range(half):
        a = t * float(inv_freq[i])
        c, s = math.cos(a), math.sin(a)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def _ea_case(seed=0, n=24, w=10, d=8):
    """One layer, one KV head with two query heads; queries rotated in float64 at positions
    ``n - w .. n - 1`` from known pre-RoPE vectors."""
    torch.manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pre = torch.randn(2, w, d, dtype=torch.float64) * 0.7
    keys = torch.nn.functional.normalize(torch.randn(1, n, d, dtype=torch.float64), dim=-1) * 1.5
    values = torch.randn(1, n, d, dtype=torch.float64)
    return inv_freq, pre, keys, values


def _rotated(pre, inv_freq, n):
    w = pre.shape[1]
    return torch.stack([torch.stack([_rotation64(inv_freq, n - w + i) @ pre[h, i]
                                     for i in range(w)]) for h in range(pre.shape[0])])


def _ea_scores(method, inv_freq, q, keys, values, sinks):
    ctx = PrefillContext([keys.float()], [values.float()], [q.float()], keys.shape[1], 4, 0.5,
                         inv_freq, 1.0)
    rot = average_rotation(inv_freq, 1.0, keys.shape[1], method.n_future)
    return method.scores(ctx, 0, sinks, rot)


def test_expected_attention_scores_match_a_direct_computation():
    inv_freq, pre, keys, values = _ea_case()
    n, scale, n_future, eps, sinks = keys.shape[1], 0.5, 5, 0.01, 3
    m = METHODS.get("expected_attention")(n_future=n_future, epsilon=eps, n_sink=sinks)
    got = _ea_scores(m, inv_freq, _rotated(pre, inv_freq, n), keys, values, sinks)
    # float64, from the definitions
    rbar = sum(_rotation64(inv_freq, n + t) for t in range(n_future)) / n_future
    probs = []
    for h in range(2):
        mu = pre[h].mean(0)
        cov = (pre[h] - mu).T @ (pre[h] - mu) / pre.shape[1]
        mu_f, cov_f = rbar @ mu, rbar @ cov @ rbar.T
        logits = torch.stack([scale * k @ mu_f + scale**2 / 2 * k @ cov_f @ k
                              for k in keys[0, sinks:]])
        probs.append(torch.softmax(logits, 0))
    want = ((probs[0] + probs[1]) / 2 + eps) * values[0, sinks:].norm(dim=-1)
    assert pre.norm(dim=-1).max() < 4
    assert ((got.double() - want).abs() <= EA_REL * want).all()


def test_expected_attention_reads_the_window_only_through_its_mean_and_covariance():
    inv_freq, pre, keys, values = _ea_case(seed=1)
    n = keys.shape[1]
    m = METHODS.get("expected_attention")(n_future=16, n_sink=2, stats_window=10)
    base = _ea_scores(m, inv_freq, _rotated(pre, inv_freq, n), keys, values, 2)
    # other queries with the same mean and covariance: the queries permuted over the positions,
    # and their point reflection through the mean (every query changes)
    permuted = pre[:, torch.randperm(pre.shape[1])]
    reflected = 2 * pre.mean(1, keepdim=True) - pre
    for other in (permuted, reflected):
        again = _ea_scores(m, inv_freq, _rotated(other, inv_freq, n), keys, values, 2)
        assert ((again - base).abs() <= 2 * EA_REL * base).all()  # both within EA_REL
    # queries before the statistics' window are never read
    q = _rotated(pre, inv_freq, n)
    longer = torch.cat([torch.randn(2, 5, q.shape[-1], dtype=q.dtype) * 100, q], dim=1)
    assert torch.equal(_ea_scores(m, inv_freq, longer, keys, values, 2), base)
    # a different window does change them (the check above can fail)
    other = _ea_scores(m, inv_freq, _rotated(pre * 3, inv_freq, n), keys, values, 2)
    assert not torch.allclose(other, base, rtol=1e-2)


def test_expected_attention_keeps_sinks_and_top_scored_tokens():
    torch.manual_seed(3)
    keys = [torch.randn(2, 120, 16) for _ in range(2)]
    values = [torch.randn(2, 120, 16) for _ in range(2)]
    queries = [torch.randn(4, 120, 16) for _ in range(2)]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    ctx = _ctx(keys, queries, values, rope_inv_freq=inv_freq)
    for headwise in (False, True):
        m = METHODS.get("expected_attention")(kv_size=30, headwise=headwise)
        kept = m.select(m.begin(120, 4), ctx)
        rot = average_rotation(inv_freq, 1.0, 120, m.n_future)
        for layer, heads in enumerate(kept):
            assert sum(len(i) for i in heads) == 2 * 30
            if not headwise:
                assert [len(i) for i in heads] == [30, 30]
            scores = m.scores(ctx, layer, 4, rot)
            for h, idx in enumerate(heads):
                assert idx[:4].tolist() == [0, 1, 2, 3]
                chosen = torch.zeros(116, dtype=torch.bool)
                chosen[idx[4:] - 4] = True
                assert scores[h][chosen].min() >= scores[h][~chosen].max()
    with pytest.raises(ConfigError, match="rotary"):
        m.select(m.begin(120, 4), _ctx(keys, queries, values))


def test_expected_attention_without_rope_model_fails_clearly(monkeypatch):
    model = small_llama()
    monkeypatch.setattr(seam, "rotary", lambda model: None)
    with pytest.raises(ConfigError, match="method=expected_attention needs a model with rotary"):
        generate(model, METHODS.get("expected_attention")(budget=0.2), list(range(40)), 2)


@pytest.mark.parametrize("start,end,spike", [(2, 11, 0.0), (4, 9, 0.0), (4, 9, 60.0)],
                         ids=["whole", "subsampled", "subsampled-far-below"])
def test_scored_attention_matches_naive(start, end, spike):
    """One set of logits, two results: the model's causal attention output over every key, and
    per key in [start, end) the largest probability under KVzip's subsampled softmax (the first
    ``sink`` keys, the range and the fed tokens), both against a float64 loop; ``spike`` puts a
    key outside the subsample 60 logits above the rest, where the subsampled sum is taken from
    its own logits (float32 exponentials relative to the spike would underflow)."""
    from atskv.core import reconstruct

    torch.manual_seed(4)
    sink, prompt, t, d = 2, 11, 37, 8  # 37 fed tokens: blocks of 32 and a partial one
    q, keys, values = torch.randn(4, t, d), torch.randn(2, prompt + t, d), torch.randn(2, prompt + t, d)
    if spike:
        keys[:, prompt - 1] = q.mean(dim=(0, 1)) / q.mean(dim=(0, 1)).norm() * spike / 0.3 ** 0.5
    scale = 0.3
    out, got = reconstruct.scored_attention(q, keys, values, scale, sink, start, end)
    want_out = torch.zeros(4, t, d, dtype=torch.float64)
    want = torch.zeros(2, end - start, dtype=torch.float64)
    for hq in range(4):
        kv = hq // 2
        for i in range(t):
            visible = list(range(prompt + i + 1))
            logits = torch.tensor([scale * float(q[hq, i] @ keys[kv, j]) for j in visible],
                                  dtype=torch.float64)
            want_out[hq, i] = torch.softmax(logits, 0) @ values[kv, visible].double()
            sub = list(range(sink)) + list(range(start, end)) + list(range(prompt, prompt + i + 1))
            p = torch.softmax(logits[sub], 0)[sink : sink + end - start]
            want[kv] = torch.maximum(want[kv], p)
    # float32 logits of 8-term dot products and sums of at most 48 exponentials: relative
    # error a few ulps times the terms, far inside 1e-5
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    if spike:  # the subsampled softmax still gives its keys real mass, which the spike's
        assert float(want.max()) > 0.01  # float32 exponentials alone would have lost
    # without the output (a sliding layer's pass): the same logits, so the same scores
    none, alone = reconstruct.scored_attention(q, keys, values, scale, sink, start, end,
                                               output=False)
    assert none is None and torch.equal(alone, got)


def test_reconstruction_pass_scores_the_attention_the_model_pays(make_tiny_model):
    """The engine's pass over a prefill gives, per prompt token, the largest attention the fed
    tokens pay it: the same as computed from a prefill of the prompt followed by those tokens."""
    from atskv.core.engine import Engine
    from atskv.core.method import Reconstruction
    from atskv.core.reconstruct import reconstruction_scores

    model = make_tiny_model()
    with torch.no_grad():  # peaked attention (a random init attends almost uniformly)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    prompt, fed = PROMPT[:60], tuple(range(500, 512))
    engine = Engine(model, None)
    pre = engine.prefill(prompt)
    before = [k.clone() for k in pre.keys]
    passes = [Reconstruction(fed, 4, 30, 4), Reconstruction(fed[:7], 30, 60, 4)]
    with torch.inference_mode():
        got = reconstruction_scores(model, pre.keys, pre.values, 60, passes)
    assert all(torch.equal(a, b) for a, b in zip(before, pre.keys))  # the prefill is unchanged
    for recon in passes:
        t = len(recon.ids)
        full = engine.prefill(prompt + list(recon.ids), queries=t)
        for layer, scores in enumerate(got):
            k = full.keys[layer]
            q = full.queries[layer].view(2, 2, t, -1)
            sub = torch.cat([k[:, :4], k[:, recon.start : recon.end], k[:, 60:]], dim=1)
            logits = torch.einsum("hgtd,hsd->hgts", q, sub) * pre.scale
            n = recon.end - recon.start
            future = torch.ones(t, t, dtype=torch.bool).triu(1)
            logits[..., 4 + n :] = logits[..., 4 + n :].masked_fill(future, float("-inf"))
            want = torch.softmax(logits, -1)[..., 4 : 4 + n].amax(dim=(1, 2))
            # one model, two schedules (one pass over 60 + t tokens, or 60 then t): float32
            # rounding through 3 layers, as the engine's oracle tests allow
            torch.testing.assert_close(scores[:, recon.start : recon.end], want, atol=1e-4,
                                       rtol=1e-4)
            assert (scores[:, :4] == 0).all()


def _kvzip_ctx(n_layers=3, h=2, n=50, seed=5):
    torch.manual_seed(seed)
    keys = [torch.randn(h, n, 8) for _ in range(n_layers)]
    scores = [torch.rand(h, n) ** (1 + 4 * layer) for layer in range(n_layers)]  # layer 0 flat
    ctx = _ctx(keys, [torch.randn(2 * h, 1, 8) for _ in keys])
    ctx.reconstruction = scores
    return ctx, scores


@pytest.mark.parametrize("allocation", ["global", "layer", "head"])
def test_kvzip_allocations_keep_the_budget_and_the_top_scored(allocation):
    ctx, scores = _kvzip_ctx()
    m = METHODS.get("kvzip")(kv_size=14, allocation=allocation)
    kept = m.select(m.begin(50, 4), ctx)
    lens = [[len(i) for i in layer] for layer in kept]
    assert sum(map(sum, lens)) == 3 * 2 * 14  # the model's total
    if allocation != "global":
        assert all(sum(layer) == 2 * 14 for layer in lens)  # each layer's total
    if allocation == "head":
        assert lens == [[14, 14]] * 3
    if allocation == "global":
        assert sum(lens[0]) > sum(lens[2])  # the flat layer wins over the peaked one
    kept_vals, dropped_vals = [], []
    for layer, heads in enumerate(kept):
        for h, idx in enumerate(heads):
            assert idx[:4].tolist() == [0, 1, 2, 3]
            chosen = torch.zeros(46, dtype=torch.bool)
            chosen[idx[4:] - 4] = True
            s = scores[layer][h, 4:]
            assert s[chosen].min() >= s[~chosen].max()  # every head keeps its best
            kept_vals.append(s[chosen])
            dropped_vals.append(s[~chosen])
    if allocation == "global":  # and the model keeps its best overall
        assert torch.cat(kept_vals).min() >= torch.cat(dropped_vals).max()


def test_kvzip_reconstructs_every_chunk_with_the_repeat_prompt(tiny_model, smollm2_tokenizer):
    m = METHODS.get("kvzip")(budget=0.2, chunk=128)
    passes = m.reconstruction(PROMPT, smollm2_tokenizer)
    assert [(p.start, p.end, p.sink) for p in passes] == [(4, 132, 4), (132, 260, 4),
                                                          (260, 300, 4)]
    text = smollm2_tokenizer.decode(passes[1].ids)
    assert text.startswith("\n\nRepeat the part of the previous context exactly, starting with")
    assert list(passes[1].ids[-128:]) == PROMPT[132:260]
    assert list(passes[1].ids).count(smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1
    assert METHODS.get("kvzip")(budget=1.0).reconstruction(PROMPT, smollm2_tokenizer) == []
    out = generate(tiny_model, m, PROMPT, 2, tokenizer=smollm2_tokenizer)
    kept = out.stats["kept_tokens"]
    assert sum(map(sum, kept)) == 3 * 2 * round(0.2 * len(PROMPT))
    assert len({n for layer in kept for n in layer}) > 1  # budgets moved between heads/layers


@pytest.mark.parametrize("name", ["kvzip", "expected_attention"])
def test_more_sinks_than_the_budget_keep_the_first_tokens(tiny_model, name):
    """A prompt shorter than the sinks (a warm-up) compresses to its first ``keep`` tokens."""
    out = generate(tiny_model, METHODS.get(name)(budget=0.2, n_sink=64), PROMPT[:60], 2,
                   return_logits=True)
    assert out.stats["kept_indices"][0][0].tolist() == list(range(12))


def count_calls(monkeypatch, module, name: str) -> list:
    """A list that grows by one at every call of ``module.name`` (still called) for the test."""
    calls, real = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_a_prefill_runs_each_reconstruction_once_and_charges_it_to_every_compression(
        tiny_model, monkeypatch):
    """Two budgets of kvzip over one prefill ask for the same passes: they run once, the second
    compression reuses the scores (the same tokens kept as from a fresh run) and its time
    includes what the passes took."""
    from atskv.core import engine as engine_mod
    from atskv.core.engine import Engine

    runs = count_calls(monkeypatch, engine_mod, "reconstruction_scores")
    engine = Engine(tiny_model, None)
    pre = engine.prefill(PROMPT[:80])
    engine.compress(pre, METHODS.get("kvzip")(kv_size=30, n_sink=4, chunk=32), 4)
    second = engine.compress(pre, METHODS.get("kvzip")(kv_size=20, n_sink=4, chunk=32), 4)
    assert len(runs) == 1
    (memo,) = pre.memo.values()
    ((_, spent),) = memo.values()
    assert second.seconds >= spent > 0
    fresh = engine.compress(engine.prefill(PROMPT[:80]),
                            METHODS.get("kvzip")(kv_size=20, n_sink=4, chunk=32), 4)
    assert all(torch.equal(a, b) for x, y in zip(second.keep, fresh.keep) for a, b in zip(x, y))


def test_h2o_budgets_over_one_prefill_share_the_accumulated_attention(tiny_model, monkeypatch):
    """The accumulated attention does not depend on the budget: two budgets of h2o over one
    prefill compute it once per layer and keep what fresh prefills keep."""
    from atskv.core.engine import Engine
    from atskv.methods import h2o

    calls = count_calls(monkeypatch, h2o, "accumulated_attention")
    engine = Engine(tiny_model, None)
    make = [METHODS.get("h2o")(budget=b) for b in (0.3, 0.5)]
    pre = engine.prefill(PROMPT, make[0].queries_needed())
    shared = [engine.compress(pre, m, 4) for m in make]
    assert len(calls) == tiny_model.config.num_hidden_layers
    assert shared[1].seconds > 0
    for m, got in zip(make, shared):
        fresh = engine.compress(engine.prefill(PROMPT, m.queries_needed()), m, 4)
        assert all(torch.equal(a, b) for x, y in zip(got.keep, fresh.keep) for a, b in zip(x, y))
