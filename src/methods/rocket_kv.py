"""RocketKV (arXiv 2502.14051): SnapKV++ eviction at prefill + hybrid sparse attention at decode.

The paper sizes both stages from a per-step token budget ``t`` (KV traffic per decode step). With
``S = prompt + max_new``: ``c = max(1, S / t)``, ``alpha = min(0.2 + 0.06 log2 c, 0.8)``, stage-1
capacity ``cap = S / c^alpha`` (at least ``min(2 max_new, S)``), prompt budget ``cap - max_new``;
stage 2: ``c2 = max(1, cap / t)``, pages of ``chunk = ceil(sqrt(c2))`` tokens, ``r = clamp(d *
chunk / c2, 1, d)`` dims, top ``k = t / 2`` tokens.

The shared budget -> ``t`` (``token_budget`` null): stage 1 keeps exactly the prompt budget ``P``
(``budget`` x prompt, or ``kv_size``) like every other method, and the generated tokens on top,
so its capacity is ``cap = P + max_new``; ``t`` is the per-step budget whose paper capacity is that
``cap``, i.e. ``log2 c * alpha(c) = log2(S / cap)`` solved for ``c`` and ``t = S / c``; stage 2
follows from ``cap`` and ``t`` as above. The paper's ``2 max_new`` floor never applies (it would
take prompt tokens for the generation). A set ``token_budget`` drives the paper's own split
instead, floor included, and ignores ``budget``/``kv_size``.

Stage 1 (SnapKV++): window 32, GQA-summed scores, max pooling kernel 63, top (P - w) plus the
window. Stage 2, each step, layer and KV head: the ``r`` dims with the largest ``sum |q|`` over
the group; each page's bound along them (page key min/max kept as tokens are appended, counted in
the stored bytes), broadcast to its tokens, softmax with the SparQ scale, summed over the group;
exact attention over the top ``k`` tokens. A step whose cache holds at most ``t`` tokens attends
densely (reading it all costs no more than the budget, and is exact). ``read_bytes``: the ``k``
tokens' K/V plus the ``r`` dims of every page's min and max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.core.method import METHODS, AttendResult, headroom
from atskv.core.stores import PackedKV
from atskv.methods.pages import (
    BoundsState,
    PageBounds,
    attend_tokens,
    head_batches,
    sparq_page_scores,
)
from atskv.methods.scoring import SCORING_SPACE, ScoredSelection, topk_sorted


def token_budget_for(fraction: float, total: int) -> float:
    """The per-step token budget whose stage-1 capacity is ``fraction * total``."""
    y = math.log2(1.0 / fraction)  # = log2(c) * alpha(c), alpha = min(0.2 + 0.06 log2 c, 0.8)
    x = (-0.2 + math.sqrt(0.04 + 0.24 * y)) / 0.12 if y <= 8 else y / 0.8
    return total / 2.0**x


@dataclass
class RocketState(BoundsState):
    t: float = 0.0  # per-step token budget
    chunk: int = 1  # stage-2 page size
    r_frac: float = 1.0  # r = clamp(d * r_frac, 1, d)
    top_k: int = 1


@METHODS.register("rocket_kv")
@dataclass(frozen=True)
class RocketKV(ScoredSelection[RocketState]):
    token_budget: int | None = None

    defaults = {"kernel": 63}
    paper = "https://arxiv.org/abs/2502.14051"
    # RocketKV's SnapKV++ stage: observation window and its large pooling kernel (default 63)
    search_space = {**SCORING_SPACE, "kernel": "choice(15, 31, 63, 127)"}
    sparse_reads = True
    state_type = RocketState

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("token_budget", self.token_budget,
                   self.token_budget is None or self.token_budget >= 1, "must be >= 1 (or null)")

    def static_decode(self) -> bool:
        return False  # page bounds synced and pages chosen with host-side lengths

    def begin(self, prompt_len: int, max_new_tokens: int) -> RocketState:
        total = prompt_len + max_new_tokens
        if self.token_budget:  # the paper's own parameterisation
            t = float(self.token_budget)
            c = max(1.0, total / t)
            alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
            cap = min(total, round(max(total / c**alpha, min(2 * max_new_tokens, total))))
            keep = max(1, min(prompt_len, cap - max_new_tokens))
        else:
            keep = self.prompt_keep(prompt_len)
            cap = keep + max_new_tokens
            t = token_budget_for(cap / total, total) if cap < total else float(total)
        c2 = max(1.0, cap / t)
        chunk = math.ceil(math.sqrt(c2))
        return RocketState(prompt_len, max_new_tokens, keep, t=t, chunk=chunk,
                           r_frac=chunk / c2, top_k=max(1, int(t / 2)))

    def make_store(self, state: RocketState, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> PackedKV:
        store = PackedKV.from_selection(keys, values, keep, [headroom(state)] * len(keep))
        if max(store.capacities) > state.t:  # stage 2 will run: page bounds are kept
            state.bounds[layer] = PageBounds(store, state.chunk)
        return store

    def attend(self, state: RocketState, layer: int, store: PackedKV, q: Tensor,
               scale: float) -> AttendResult:
        if max(store.lengths) <= state.t:
            return super().attend(state, layer, store, q, scale)
        bounds = state.bounds[layer]
        outs, read = [], 0
        for heads, k, v in head_batches(store):
            out, nbytes = self.sparse(state, q[heads], k, v, scale, state.top_k, bounds, heads)
            outs.append(out)
            read += nbytes
        return AttendResult(torch.cat(outs), read)

    def sparse(self, state: RocketState, q: Tensor, k: Tensor, v: Tensor, scale: float,
               top_k: int, bounds: PageBounds, heads: slice) -> tuple[Tensor, int]:
        """Stage 2 for KV heads ``heads`` (``q`` ``(h, g, d)``, ``k``/``v`` ``(h, n, d)``):
        the output and the bytes read."""
        h, n, d = k.shape
        kmin, kmax = bounds.sync(heads, k)
        r = max(1, min(d, int(d * state.r_frac)))
        pages, _ = sparq_page_scores(q, kmin, kmax, r)  # (h, g, P)
        tokens = pages.repeat_interleave(state.chunk, dim=-1)[..., :n]
        idx = topk_sorted(torch.softmax(tokens, dim=-1).sum(dim=1), top_k)
        read = idx.numel() * 2 * d + 2 * kmin.shape[0] * kmin.shape[1] * r  # elements
        return attend_tokens(q, k, v, idx, scale), read * k.element_size()
