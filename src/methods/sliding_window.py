"""StreamingLLM: attention sinks plus the most recent tokens (arXiv 2309.17453).

Keeps the first ``n_sink`` tokens and the most recent ``keep - n_sink`` of the prompt (``keep``:
the prompt budget), and evicts the oldest non-sink token as each generated token arrives, so the
cache stays at its compressed size while decoding, as in the paper. When the budget covers the
whole prompt nothing is compressed and nothing is evicted (the full cache). The cache is a ring
buffer (:class:`atskv.core.stores.StaticKV` with ``sinks``): a new token overwrites the oldest
non-sink row in place, so the decode step is static (compilable, capturable). Keys keep their
original positions (the common comparison setting; the paper re-rotates keys to in-cache
positions instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.core.method import METHODS, Method, PrefillContext, State
from atskv.core.stores import StaticKV


@METHODS.register("sliding_window")
@dataclass(frozen=True)
class SlidingWindow(Method[State]):
    n_sink: int = 4

    paper = "https://arxiv.org/abs/2309.17453"
    # StreamingLLM ablates the number of attention sinks (0 to 8+); the window is the budget
    search_space = {"n_sink": "choice(0, 1, 4, 8, 16)"}
    evicts_while_decoding = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("n_sink", self.n_sink, self.n_sink >= 0, "must be >= 0")

    def prompt_keep(self, prompt_len: int) -> int:
        return min(prompt_len, max(self.n_sink + 1, super().prompt_keep(prompt_len)))

    def select(self, state: State, ctx: PrefillContext) -> list[list[Tensor]] | None:
        cap = state.keep
        if cap >= ctx.prompt_len:
            return None
        dev = ctx.keys[0].device
        keep = torch.cat([torch.arange(self.n_sink, device=dev),
                          torch.arange(ctx.prompt_len - (cap - self.n_sink), ctx.prompt_len, device=dev)])
        return [[keep] * ctx.n_kv_heads for _ in range(ctx.n_layers)]

    def make_store(self, state: State, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> StaticKV:
        if state.keep >= state.prompt_len:  # not compressed: the full cache
            return super().make_store(state, layer, keys, values, keep)
        # a ring: each generated token overwrites the oldest non-sink token (static, in place)
        return StaticKV(keys, values, keep, headroom=0, sinks=min(self.n_sink, state.keep - 1))
