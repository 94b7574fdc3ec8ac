"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention plus a recent window.

The cache holds ``C = keep`` tokens per layer/KV head (the prompt budget): ``heavy =
round(heavy_fraction * C)`` heavy hitters and ``recent = C - heavy`` newest tokens (paper default:
half and half). Every token's score is the attention it has received, summed over the GQA group:
at prefill from every prompt query (``prefill_window = 0``, exact; a positive value uses only the
last that many prompt queries, a cheaper approximation), then from each decode query. The exact
prefill scores recompute every prompt attention row (fused prefill kernels return none): O(L^2)
extra work, several times the model's prefill on CPU at 2K tokens (computed once per prefill
for every budget that uses it: :meth:`PrefillContext.shared`). After prefill each head keeps
the top ``heavy`` older tokens plus the ``recent`` newest; at each decode step the lowest-scored
token outside the recent window is evicted before the new one is appended, so the cache stays at
``C`` (as in the paper). When the budget covers the prompt nothing is compressed or evicted. The
scores (float32, one per stored token) are part of the stored bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from atskv.core.method import METHODS, AttendResult, Method, PrefillContext, State
from atskv.core.stores import PackedKV
from atskv.methods.pages import head_batches
from atskv.methods.scoring import accumulated_attention, keep_topk_plus_window

ALL_QUERIES = 2**31 - 1  # an observation window longer than any prompt: every prompt query


@dataclass
class H2OState(State):
    heavy: int = 0
    recent: int = 0
    scores: list[Tensor] = field(default_factory=list)  # per layer (H_kv, C): score per stored row

    @property
    def active(self) -> bool:
        """Whether anything is compressed (and evicted while decoding)."""
        return self.keep < self.prompt_len

    def own_tensors(self) -> Iterator[Tensor]:
        return iter(self.scores)


@METHODS.register("h2o")
@dataclass(frozen=True)
class H2O(Method[H2OState]):
    heavy_fraction: float = 0.5
    prefill_window: int = 0

    paper = "https://arxiv.org/abs/2306.14048"
    # H2O varies the heavy-hitter / recent split; prefill_window > 0 only (0: all queries, O(L^2))
    search_space = {
        "heavy_fraction": "interval(0.1, 0.9)",
        "prefill_window": "choice(32, 64, 128, 256)",
    }
    evicts_while_decoding = True
    state_type = H2OState

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("heavy_fraction", self.heavy_fraction, 0.0 <= self.heavy_fraction <= 1.0,
                   "is outside [0, 1]")
        self.check("prefill_window", self.prefill_window, self.prefill_window >= 0, "must be >= 0")

    def queries_needed(self) -> int:
        return self.prefill_window or ALL_QUERIES

    def static_decode(self) -> bool:
        return False  # evicts by the argmin of accumulated scores with host-side lengths

    def begin(self, prompt_len: int, max_new_tokens: int) -> H2OState:
        state = H2OState(prompt_len, max_new_tokens, self.prompt_keep(prompt_len))
        state.heavy = round(self.heavy_fraction * state.keep)
        state.recent = state.keep - state.heavy
        return state

    def select(self, state: H2OState, ctx: PrefillContext) -> list[list[Tensor]] | None:
        if not state.active:
            return None
        keep = []
        for layer in range(ctx.n_layers):
            q, k = ctx.queries[layer], ctx.keys[layer]
            s = ctx.shared(("accumulated_attention", layer, q.shape[1]),
                           functools.partial(accumulated_attention, q, k, ctx.scale))
            old = max(0, ctx.prompt_len - state.recent)
            kept = keep_topk_plus_window(s[:, :old], state.heavy, ctx.prompt_len - old)
            buf = s.new_zeros(s.shape[0], state.keep)
            for h, idx in enumerate(kept):
                buf[h, : idx.numel()] = s[h, idx]
            state.scores.append(buf)
            keep.append(kept)
        return keep

    def make_store(self, state: H2OState, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> PackedKV:
        if not state.active:
            return super().make_store(state, layer, keys, values, keep)
        return PackedKV.from_selection(keys, values, keep, [state.keep - len(k) for k in keep])

    def before_append(self, state: H2OState, layer: int, store: PackedKV) -> None:
        if not state.active:
            return
        s = state.scores[layer]
        for h in range(store.n_heads):
            n = store.lengths[h]
            if n < store.capacities[h]:
                continue
            candidates = max(1, min(n, n + 1 - state.recent))  # older than the recent window
            i = int(torch.argmin(s[h, :candidates]))
            store.evict(h, i)
            s[h, i : n - 1] = s[h, i + 1 : n].clone()
            s[h, n - 1] = 0.0

    def truncate_layer(self, state: H2OState, layer: int, store: PackedKV,
                       drop: list[int]) -> None:
        before = list(store.lengths)
        super().truncate_layer(state, layer, store, drop)
        if state.active:  # the forgotten tokens' scores go with them
            for h, (n, d) in enumerate(zip(before, drop)):
                state.scores[layer][h, n - d : n] = 0.0

    def attend(self, state: H2OState, layer: int, store: PackedKV, q: Tensor,
               scale: float) -> AttendResult:
        if not state.active:
            return super().attend(state, layer, store, q, scale)
        outs = []
        for heads, k, v in head_batches(store):
            logits = torch.einsum("hgd,hnd->hgn", q[heads].float(), k.float()) * scale
            probs = torch.softmax(logits, dim=-1)
            state.scores[layer][heads, : k.shape[1]] += probs.sum(dim=1)
            outs.append(torch.einsum("hgn,hnd->hgd", probs.to(v.dtype), v))
        return AttendResult(torch.cat(outs).to(q.dtype), store.total_tokens() * store.token_bytes())
