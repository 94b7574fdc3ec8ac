"""Quest (arXiv 2406.10774): query-aware page selection at decode time; the cache is kept whole.

Stored tokens are grouped into pages of ``page_size``; each page keeps the elementwise min/max
of its keys (updated as tokens are appended). Per decode step, layer and KV head, a page's score
is ``sum_d max(q_d kmax_d, q_d kmin_d)`` (an upper bound of ``q . k`` in the page) summed over
the GQA group; the top ``token_budget // page_size`` pages get exact attention. The first
``dense_layers`` layers attend densely, as do steps whose cache fits in the token budget.
Saves bandwidth, not capacity: stored bytes equal full's. ``read_bytes`` counts the selected
tokens' K/V plus every page's min/max (the page metadata itself is not part of the cache bytes).
``token_budget = None`` reads ``budget`` x full's at the peak: ``t = capacity_tokens()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.kvcache import PackedKV
from atskv.methods.base import METHODS, AttendResult, Method
from atskv.methods.pages import PageBounds, attend_tokens, head_batches, page_upper_bound
from atskv.methods.scoring import topk_sorted
from atskv.types import ConfigError


@METHODS.register("quest")
@dataclass
class Quest(Method):
    token_budget: int | None = None
    page_size: int = 16
    dense_layers: int = 2

    name = "quest"
    paper = "https://arxiv.org/abs/2406.10774"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"method.token_budget={self.token_budget} must be >= 1 (or null)")
        if self.page_size < 1 or self.dense_layers < 0:
            raise ConfigError("method.page_size must be >= 1 and method.dense_layers >= 0")

    def begin(self, prompt_len: int, max_new_tokens: int) -> None:
        super().begin(prompt_len, max_new_tokens)
        self.tokens = self.token_budget or self.capacity_tokens()
        self.n_pages = max(1, self.tokens // self.page_size)
        self.bounds: dict[int, PageBounds] = {}

    def attend(self, layer: int, store: PackedKV, q: Tensor, scale: float) -> AttendResult:
        longest = max(store.lengths)
        if layer < self.dense_layers or longest <= max(self.tokens, self.n_pages * self.page_size):
            return super().attend(layer, store, q, scale)
        if layer not in self.bounds:
            self.bounds[layer] = PageBounds(store, self.page_size)
        bounds = self.bounds[layer]
        outs, read_tokens = [], 0
        for heads, k, v in head_batches(store):
            n = k.shape[1]
            if n <= self.n_pages * self.page_size:  # a short head of a ragged store: read it all
                outs.append(F.scaled_dot_product_attention(q[heads], k, v, scale=scale))
                read_tokens += k.shape[0] * n
                continue
            kmin, kmax = bounds.sync(heads, k)
            read_tokens += kmin.shape[0] * kmin.shape[1]  # a page's min + max = one token's K + V
            pages = topk_sorted(page_upper_bound(q[heads], kmin, kmax).sum(dim=1), self.n_pages)
            idx = (pages[..., None] * self.page_size
                   + torch.arange(self.page_size, device=k.device)).flatten(1)
            valid = idx < n
            outs.append(attend_tokens(q[heads], k, v, idx.clamp(max=n - 1), scale, valid))
            read_tokens += int(valid.sum())
        return AttendResult(torch.cat(outs), read_tokens * store.token_bytes())
