"""StreamingLLM: attention sinks plus the most recent tokens (arXiv 2309.17453).

Keeps the first ``n_sink`` tokens and the most recent ``budget_tokens - n_sink``; evicts from the
middle after prefill and again as decoding appends, so the cache never exceeds the budget. Keys
keep their original positions (the common comparison setting; the paper re-rotates keys to
in-cache positions instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.kvcache import PackedKV
from atskv.methods.base import METHODS, Method, PrefillContext
from atskv.types import ConfigError


@METHODS.register("sliding_window")
@dataclass
class SlidingWindow(Method):
    n_sink: int = 4

    name = "sliding_window"
    paper = "https://arxiv.org/abs/2309.17453"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ConfigError(f"method.n_sink={self.n_sink} must be >= 0")

    def capacity(self) -> int:
        return max(self.n_sink + 1, self.capacity_tokens())

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        cap = self.capacity()
        if cap >= ctx.prompt_len:
            return None
        dev = ctx.keys[0].device
        keep = torch.cat([torch.arange(self.n_sink, device=dev),
                          torch.arange(ctx.prompt_len - (cap - self.n_sink), ctx.prompt_len, device=dev)])
        return [[keep] * ctx.n_kv_heads for _ in range(ctx.n_layers)]

    def headroom(self, layer: int, kept: list[int]) -> list[int]:
        # The window stays at its capacity: decoded tokens replace the oldest non-sink ones.
        return [max(0, self.capacity() - n) for n in kept]

    def before_append(self, layer: int, store: PackedKV) -> None:
        for h in range(store.n_heads):
            if store.lengths[h] >= store.capacities[h]:
                store.evict(h, min(self.n_sink, store.lengths[h] - 1))
