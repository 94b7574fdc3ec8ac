"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention plus a recent window.

The cache holds ``C = capacity_tokens()`` tokens per layer/KV head (``budget`` x full's at the
peak): ``heavy = round(heavy_fraction * C)`` heavy hitters and ``recent = C - heavy`` newest
tokens (paper default: half and half). Every token's score is the attention it has received,
summed over the GQA group: at prefill from every prompt query (``prefill_window = 0``, exact; a
positive value uses only the last that many prompt queries, a cheaper approximation), then from
each decode query. The exact prefill scores recompute every prompt attention row (fused prefill
kernels return none): O(L^2) extra work, several times the model's prefill on CPU at 2K tokens. After prefill each head keeps the top ``heavy`` older tokens plus the
``recent`` newest; at each decode step, when the cache is full, the lowest-scored token outside
the recent window is evicted before the new one is appended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.kvcache import PackedKV
from atskv.methods.base import METHODS, AttendResult, Method, PrefillContext
from atskv.methods.pages import head_batches
from atskv.methods.scoring import accumulated_attention, keep_topk_plus_window
from atskv.types import ConfigError

ALL_QUERIES = 2**31 - 1  # an observation window longer than any prompt: every prompt query


@METHODS.register("h2o")
@dataclass
class H2O(Method):
    heavy_fraction: float = 0.5
    prefill_window: int = 0

    name = "h2o"
    paper = "https://arxiv.org/abs/2306.14048"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.heavy_fraction <= 1.0:
            raise ConfigError(f"method.heavy_fraction={self.heavy_fraction} is outside [0, 1]")
        if self.prefill_window < 0:
            raise ConfigError(f"method.prefill_window={self.prefill_window} must be >= 0")
        self.observation_window = self.prefill_window or ALL_QUERIES

    def begin(self, prompt_len: int, max_new_tokens: int) -> None:
        super().begin(prompt_len, max_new_tokens)
        self.cap = self.capacity_tokens()
        self.heavy = round(self.heavy_fraction * self.cap)
        self.recent = self.cap - self.heavy
        self.active = prompt_len + max_new_tokens > self.cap  # will anything be evicted?
        self.scores: list[Tensor] = []  # per layer (H_kv, cap): score of each stored row

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        if not self.active:
            return None
        keep = []
        for layer in range(ctx.n_layers):
            s = accumulated_attention(ctx.queries[layer], ctx.keys[layer], ctx.scale)
            old = max(0, ctx.prompt_len - self.recent)
            kept = keep_topk_plus_window(s[:, :old], self.heavy, ctx.prompt_len - old)
            buf = s.new_zeros(s.shape[0], max(self.cap, ctx.prompt_len))
            for h, idx in enumerate(kept):
                buf[h, : idx.numel()] = s[h, idx]
            self.scores.append(buf)
            keep.append(kept)
        return keep

    def headroom(self, layer: int, kept: list[int]) -> list[int]:
        if not self.active:
            return super().headroom(layer, kept)
        return [max(0, self.cap - n) for n in kept]

    def before_append(self, layer: int, store: PackedKV) -> None:
        if not self.active:
            return
        s = self.scores[layer]
        for h in range(store.n_heads):
            n = store.lengths[h]
            if n < store.capacities[h]:
                continue
            candidates = max(1, min(n, n + 1 - self.recent))  # older than the recent window
            i = int(torch.argmin(s[h, :candidates]))
            store.evict(h, i)
            s[h, i : n - 1] = s[h, i + 1 : n].clone()
            s[h, n - 1] = 0.0

    def attend(self, layer: int, store: PackedKV, q: Tensor, scale: float) -> AttendResult:
        if not self.active:
            return super().attend(layer, store, q, scale)
        outs = []
        for heads, k, v in head_batches(store):
            logits = torch.einsum("hgd,hnd->hgn", q[heads].float(), k.float()) * scale
            probs = torch.softmax(logits, dim=-1)
            self.scores[layer][heads, : k.shape[1]] += probs.sum(dim=1)
            outs.append(torch.einsum("hgn,hnd->hgd", probs.to(v.dtype), v))
        return AttendResult(torch.cat(outs).to(q.dtype), store.total_tokens() * store.token_bytes())
