"""Cache-engine invariants on the tiny random Llama: the full method equals plain transformers,
evicted caches keep original positions, ragged heads really shrink memory, memory is released."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from helpers import generate

from atskv.core import seam
from atskv.core.engine import Engine, StopStrings
from atskv.core.stores import PackedKV, tensor_bytes
from atskv.methods import METHODS, Method, PrefillContext, State

PROMPT = list(range(100, 160))  # 60 tokens


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("chunk", [0, 16])
def test_full_matches_transformers_generate(tiny_model, chunk):
    ref_tokens, ref_logits = seam.reference_greedy(tiny_model, torch.tensor([PROMPT]), 8)
    eng = Engine(tiny_model, None, prefill_chunk=chunk)
    out = eng.generate(PROMPT, METHODS.get("full")(), 8, stop_at_eos=False, return_logits=True)
    assert out.token_ids == ref_tokens
    assert max_diff(out.stats["logits"], ref_logits) < 1e-4
    # the full cache's K/V plus its per-head fill counters (int64)
    cfg = tiny_model.config
    assert out.kv_bytes_peak - out.kv_bytes_uncompressed == (
        8 * cfg.num_hidden_layers * cfg.num_key_value_heads)
    # the attention implementation is restored afterwards
    assert tiny_model.config._attn_implementation != seam.ATTN_NAME


def test_budget_one_sliding_window_equals_full(tiny_model):
    full = generate(tiny_model, METHODS.get("full")(), PROMPT, 6, return_logits=True)
    sw = generate(tiny_model, METHODS.get("sliding_window")(budget=1.0), PROMPT, 6,
                  return_logits=True)
    assert sw.token_ids == full.token_ids
    assert max_diff(sw.stats["logits"], full.stats["logits"]) == 0.0


SEEN_KEYS: list = []


@dataclass(frozen=True)
class KeepSubset(Method):
    """Test method (not registered): keeps a fixed, different subset of prompt tokens per KV
    head."""

    subsets: tuple = ()

    def select(self, state: State, ctx: PrefillContext):
        SEEN_KEYS[:] = [weakref.ref(k) for k in ctx.keys]
        keep = [torch.tensor(s) for s in self.subsets]
        return [keep for _ in range(ctx.n_layers)]


def oracle_logits(model, tokens, prompt_len, subsets, n_q_heads):
    """Plain transformers forward with a 4-D mask: prompt rows causal, each later query row sees
    only its head's kept prompt tokens plus the generated tokens (at their true positions)."""
    n = len(tokens)
    n_kv = len(subsets)
    group = n_q_heads // n_kv
    allowed = torch.ones(n_q_heads, n, n, dtype=torch.bool).tril()
    for h in range(n_q_heads):
        row_ok = torch.zeros(n, dtype=torch.bool)
        row_ok[list(subsets[h // group])] = True
        row_ok[prompt_len:] = True
        for q in range(prompt_len, n):
            allowed[h, q, :] = row_ok & (torch.arange(n) <= q)
    mask = torch.zeros(1, n_q_heads, n, n).masked_fill(~allowed[None], float("-inf"))
    with torch.inference_mode():
        out = model(torch.tensor([tokens]), attention_mask=mask, use_cache=False)
    return out.logits[0]


def test_eviction_keeps_original_positions_and_ragged_heads(tiny_model):
    subsets = ((0, 1, 2, 10, 30, 59), (0, 5, 6, 7, 20, 21, 22, 40, 50, 58, 59))
    method = KeepSubset(subsets=subsets)
    out = generate(tiny_model, method, PROMPT, 5, return_logits=True)
    tokens = PROMPT + out.token_ids[:-1]
    ref = oracle_logits(tiny_model, tokens, len(PROMPT), subsets,
                        tiny_model.config.num_attention_heads)
    for step, logits in enumerate(out.stats["logits"]):
        torch.testing.assert_close(logits, ref[len(PROMPT) - 1 + step], atol=1e-4, rtol=1e-4)
    # ragged storage: K/V bytes are exactly the kept tokens (+ the 4 generated tokens fed back)
    # per head, no padding; plus the (3, heads) int64 index (offsets, lengths, capacities)
    # and the pinned-page mask (bool, heads x page slots; one-token pages here), whose slots for
    # the generated tokens are reserved, not stored, until those tokens come
    d = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    n_layers = tiny_model.config.num_hidden_layers
    index = 3 * len(subsets) * 8
    pinned = len(subsets) * max(len(s) + 4 for s in subsets)
    per_layer = sum(len(s) + 4 for s in subsets) * 2 * d * 4 + index + pinned
    assert out.kv_bytes_peak == n_layers * per_layer
    assert out.kv_bytes_after_compression == n_layers * (
        sum(len(s) for s in subsets) * 2 * d * 4 + index + pinned - 4 * len(subsets))
    assert out.stats["kept_tokens"] == [[6, 11]] * n_layers


def test_prefill_tensors_are_released(tiny_model):
    method = KeepSubset(subsets=((0, 59), (1, 59)))
    generate(tiny_model, method, PROMPT, 2)
    gc.collect()
    assert SEEN_KEYS and all(ref() is None for ref in SEEN_KEYS)


@pytest.mark.parametrize("method", ["full", "snapkv"])
def test_a_generation_leaves_no_reference_cycles(tiny_model, method):
    """What a prefill, a question's extension and decoding built (the sessions, the rows'
    compressed states and their stores) is freed as soon as it is dropped, without Python's
    cyclic collector (which may leave a cycle alive for many batches of a sweep group)."""
    from atskv.core.engine import Request

    m = METHODS.get(method)() if method == "full" else METHODS.get(method)(budget=0.5)
    eng = Engine(tiny_model, None)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        pre = eng.prefill(PROMPT[:40], m.queries_needed())
        aware = eng.prefill(PROMPT[40:], m.queries_needed(), base=pre)
        comps = [eng.compress(pre, m, 20 + 4, question_follows=True), eng.compress(aware, m, 4)]
        reqs = [Request(pre, m, 4, stop_at_eos=False, question=PROMPT[40:], compressed=comps[0]),
                Request(aware, m, 4, stop_at_eos=False, compressed=comps[1])]
        outs = eng.generate_batch(reqs)
        assert [len(o.token_ids) for o in outs] == [4, 4]
        refs = [weakref.ref(x) for c in comps
                for x in (c.state, *c.state.stores, *c.state.tensors())]
        refs += [weakref.ref(t) for p in (pre, aware) for t in (*p.keys, *p.values, *p.queries)]
        del pre, aware, comps, reqs, outs
        alive = sum(r() is not None for r in refs)
        assert alive == 0, f"{alive} of {len(refs)} objects wait for the cyclic collector"
    finally:
        if enabled:
            gc.enable()


def test_sliding_window_keeps_sinks_and_recent_and_stays_in_budget(tiny_model):
    prompt = list(range(100, 300))  # 200 tokens + 10 new; budget 0.25 of the prompt -> 50 tokens
    method = METHODS.get("sliding_window")(budget=0.25, n_sink=4)
    out = generate(tiny_model, method, prompt, 10, return_logits=True)
    kept = out.stats["kept_indices"][0][0].tolist()
    assert kept == list(range(4)) + list(range(154, 200))
    assert out.stats["prompt_tokens_kept"] == {"mean": 50, "min": 50, "max": 50}
    full = generate(tiny_model, METHODS.get("full")(), prompt, 10)
    assert out.kv_bytes_peak == out.kv_bytes_after_compression  # evicts: never grows
    assert out.kv_bytes_peak / full.kv_bytes_after_compression == pytest.approx(0.25, rel=1e-2)


def test_packed_append_and_evict_order():
    keys = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    store = PackedKV.from_selection(keys, keys.clone(), [torch.tensor([0, 2, 4]), torch.tensor([1])],
                                    [1, 2])
    assert tensor_bytes(*store.tensors()) == (4 + 3) * 2 * 4
    assert store.spare_bytes() == 3 * 2 * 4
    store.append(torch.tensor([[100.0], [200.0]]), torch.tensor([[100.0], [200.0]]))
    assert store.head(0)[0].flatten().tolist() == [0, 2, 4, 100]
    assert store.head(1)[0].flatten().tolist() == [6, 200]
    with pytest.raises(RuntimeError, match="capacity"):
        store.append(torch.zeros(2, 1), torch.zeros(2, 1))
    store.evict(0, 1)
    assert store.head(0)[0].flatten().tolist() == [0, 4, 100]


class _Tok:
    """A character-level stand-in tokenizer: token i decodes to chr(i)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_are_found_incrementally_and_cut():
    stop = StopStrings(_Tok(), ["\n\n", "END"])
    toks = [ord(c) for c in "abc\nde"]
    assert not stop.hit(toks)
    assert not stop.hit(toks + [ord("\n")] + [ord("x")])
    assert stop.hit(toks + [ord("\n"), ord("\n")])
    assert stop.hit([ord(c) for c in "x" * 50 + "E"]) is False
    assert stop.hit([ord(c) for c in "x" * 50 + "EN" + "D"])
    assert stop.cut("hello END world\n\n") == "hello "
    assert StopStrings(None, []).cut("abc") == "abc"
    with pytest.raises(ValueError, match="tokenizer"):
        StopStrings(None, ["x"])


def test_generation_ends_at_a_stop_string(tiny_model, smollm2_tokenizer):
    """The engine stops at the first stop string: fewer tokens, fewer KV bytes, text cut."""
    full = METHODS.get("full")()
    free = generate(tiny_model, full, PROMPT, 40, tokenizer=smollm2_tokenizer)
    text = smollm2_tokenizer.decode(free.token_ids, skip_special_tokens=True)
    # a stop string that the unconstrained text contains after a few tokens
    k = next(i for i in range(3, 40) if len(smollm2_tokenizer.decode(free.token_ids[:i])) >= 3)
    stop = smollm2_tokenizer.decode(free.token_ids[k - 1 : k], skip_special_tokens=True)
    assert stop and stop in text
    out = generate(tiny_model, full, PROMPT, 40, tokenizer=smollm2_tokenizer, stop=[stop])
    first = text.find(stop)
    assert out.text == text[:first]
    assert out.stats["stopped_by"] == "stop"
    assert len(out.token_ids) < len(free.token_ids)
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert out.kv_bytes_peak < free.kv_bytes_peak
    assert out.decode_tokens == len(out.token_ids) - 1
