"""Quest (arXiv 2406.10774): query-aware page selection at decode time; the cache is kept whole.

Stored tokens are grouped into pages of ``page_size``; each page keeps the elementwise min/max
of its keys (updated as tokens are appended). Per decode step, layer and KV head, a page's score
is ``sum_d max(q_d kmax_d, q_d kmin_d)`` (an upper bound of ``q . k`` in the page) summed over
the GQA group; the top ``token_budget // page_size`` pages get exact attention. The first
``dense_layers`` layers attend densely, as do steps whose cache fits in the token budget.
Saves bandwidth, not capacity: the stored bytes are full's plus the page min/max (counted).
``read_bytes`` counts the selected tokens' K/V plus every page's min/max.
``token_budget = None`` reads, per step, what an appending method at the same budget stores: the
prompt budget (``budget`` x prompt, or ``kv_size``) plus the generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core.method import METHODS, AttendResult, Method, headroom
from atskv.core.stores import PackedKV
from atskv.methods.pages import (
    BoundsState,
    PageBounds,
    attend_tokens,
    head_batches,
    page_upper_bound,
)
from atskv.methods.scoring import topk_sorted


@dataclass
class QuestState(BoundsState):
    tokens: int = 0  # tokens read per step and head
    n_pages: int = 0


@METHODS.register("quest")
@dataclass(frozen=True)
class Quest(Method[QuestState]):
    token_budget: int | None = None
    page_size: int = 16
    dense_layers: int = 2

    paper = "https://arxiv.org/abs/2406.10774"
    # Quest varies the page size and keeps the first layers dense (its paper: 16, 2)
    search_space = {
        "page_size": "choice(8, 16, 32)",
        "dense_layers": "choice(0, 1, 2, 4)",
    }
    compresses = False
    sparse_reads = True
    state_type = QuestState

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("token_budget", self.token_budget,
                   self.token_budget is None or self.token_budget >= 1, "must be >= 1 (or null)")
        self.check("page_size", self.page_size, self.page_size >= 1, "must be >= 1")
        self.check("dense_layers", self.dense_layers, self.dense_layers >= 0, "must be >= 0")

    def static_decode(self) -> bool:
        return False  # page bounds synced and pages chosen with host-side lengths

    def begin(self, prompt_len: int, max_new_tokens: int) -> QuestState:
        state = QuestState(prompt_len, max_new_tokens, prompt_len)  # stores every prompt token
        state.tokens = self.token_budget or self.prompt_keep(prompt_len) + headroom(state)
        state.n_pages = max(1, state.tokens // self.page_size)
        return state

    def make_store(self, state: QuestState, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> PackedKV:
        store = PackedKV.from_selection(keys, values, keep, [headroom(state)] * len(keep))
        longest = max(store.capacities)
        if layer >= self.dense_layers and longest > max(state.tokens, state.n_pages * self.page_size):
            state.bounds[layer] = PageBounds(store, self.page_size)
        return store

    def attend(self, state: QuestState, layer: int, store: PackedKV, q: Tensor,
               scale: float) -> AttendResult:
        longest = max(store.lengths)
        if layer not in state.bounds or longest <= max(state.tokens, state.n_pages * self.page_size):
            return super().attend(state, layer, store, q, scale)
        bounds = state.bounds[layer]
        outs, read_tokens = [], 0
        for heads, k, v in head_batches(store):
            n = k.shape[1]
            if n <= state.n_pages * self.page_size:  # a short head of a ragged store: read it all
                outs.append(F.scaled_dot_product_attention(q[heads], k, v, scale=scale))
                read_tokens += k.shape[0] * n
                continue
            kmin, kmax = bounds.sync(heads, k)
            read_tokens += kmin.shape[0] * kmin.shape[1]  # a page's min + max = one token's K + V
            pages = topk_sorted(page_upper_bound(q[heads], kmin, kmax).sum(dim=1), state.n_pages)
            idx = (pages[..., None] * self.page_size
                   + torch.arange(self.page_size, device=k.device)).flatten(1)
            valid = idx < n
            outs.append(attend_tokens(q[heads], k, v, idx.clamp(max=n - 1), scale, valid))
            read_tokens += int(valid.sum())
        return AttendResult(torch.cat(outs), read_tokens * store.token_bytes())
