"""RocketKV (arXiv 2502.14051): SnapKV++ eviction at prefill + hybrid sparse attention at decode.

Both stages follow a per-step token budget ``t`` (KV traffic per decode step). With ``S =
prompt + max_new``: ``c = max(1, S / t)``, ``alpha = min(0.2 + 0.06 log2 c, 0.8)``, stage-1
capacity ``cap = S / c^alpha`` (at least ``min(2 max_new, S)``), prompt budget ``cap - max_new``;
stage 2: ``c2 = max(1, cap / t)``, pages of ``chunk = ceil(sqrt(c2))`` tokens, ``r = clamp(d *
chunk / c2, 1, d)`` dims, top ``k = t / 2`` tokens.

``budget`` -> ``t`` when ``token_budget`` is null: the ``t`` whose stage-1 capacity is ``budget *
S``, i.e. ``log2 c * alpha(c) = log2(1 / budget)`` solved for ``c`` and ``t = S / c``, so stage 1
stores ``budget`` x full's at the peak (unless the ``2 max_new`` floor applies). A set
``token_budget`` drives the paper's split and ignores ``budget``.

Stage 1 (SnapKV++): window 32, GQA-summed scores, max pooling kernel 63, top (prompt budget - w)
plus the window. Stage 2, each step, layer and KV head: the ``r`` dims with the largest ``sum |q|``
over the group; each page's bound along them (page key min/max kept as tokens are appended),
broadcast to its tokens, softmax with the SparQ scale, summed over the group; exact attention over
the top ``k`` tokens. A step whose cache holds at most ``t`` tokens attends densely (reading it
all costs no more than the budget, and is exact). ``read_bytes``: the ``k`` tokens' K/V plus the
``r`` dims of every page's min and max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.kvcache import PackedKV
from atskv.methods.base import METHODS, AttendResult, Method, PrefillContext
from atskv.methods.pages import PageBounds, attend_tokens, head_batches, sparq_page_scores
from atskv.methods.scoring import snap_keep, topk_sorted
from atskv.types import ConfigError


def token_budget_for(budget: float, total: int) -> float:
    """The per-step token budget whose stage-1 capacity is ``budget * total``."""
    y = math.log2(1.0 / budget)  # = log2(c) * alpha(c), alpha = min(0.2 + 0.06 log2 c, 0.8)
    x = (-0.2 + math.sqrt(0.04 + 0.24 * y)) / 0.12 if y <= 8 else y / 0.8
    return total / 2.0**x


@METHODS.register("rocket_kv")
@dataclass
class RocketKV(Method):
    token_budget: int | None = None
    window: int = 32
    kernel: int = 63
    pooling: str = "max"

    name = "rocket_kv"
    paper = "https://arxiv.org/abs/2502.14051"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"method.token_budget={self.token_budget} must be >= 1 (or null)")
        if self.window < 1 or self.kernel < 1:
            raise ConfigError("method.window and method.kernel must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"method.pooling={self.pooling!r}; choose max or avg")
        self.observation_window = self.window

    def begin(self, prompt_len: int, max_new_tokens: int) -> None:
        super().begin(prompt_len, max_new_tokens)
        total = prompt_len + max_new_tokens
        t = float(self.token_budget or token_budget_for(self.budget, total))
        c = max(1.0, total / t)
        alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
        self.cap = min(total, round(max(total / c**alpha, min(2 * max_new_tokens, total))))
        c2 = max(1.0, self.cap / t)
        self.t, self.chunk = t, math.ceil(math.sqrt(c2))
        self.r_frac = self.chunk / c2  # r = clamp(d * r_frac, 1, d)
        self.top_k = max(1, int(t / 2))
        self.bounds: dict[int, PageBounds] = {}

    def prompt_budget(self) -> int:
        return max(1, min(self.prompt_len, self.cap - self.max_new_tokens))

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        keep = self.prompt_budget()
        if keep >= ctx.prompt_len:
            return None
        return [snap_keep(ctx.queries[i], ctx.keys[i], ctx.scale, self.window, keep, self.kernel,
                          self.pooling) for i in range(ctx.n_layers)]

    def attend(self, layer: int, store: PackedKV, q: Tensor, scale: float) -> AttendResult:
        if max(store.lengths) <= self.t:
            return super().attend(layer, store, q, scale)
        if layer not in self.bounds:
            self.bounds[layer] = PageBounds(store, self.chunk)
        bounds = self.bounds[layer]
        outs, read = [], 0
        for heads, k, v in head_batches(store):
            out, nbytes = self.sparse(q[heads], k, v, scale, self.top_k, bounds, heads)
            outs.append(out)
            read += nbytes
        return AttendResult(torch.cat(outs), read)

    def sparse(self, q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int,
               bounds: PageBounds, heads: slice) -> tuple[Tensor, int]:
        """Stage 2 for KV heads ``heads`` (``q`` ``(h, g, d)``, ``k``/``v`` ``(h, n, d)``):
        the output and the bytes read."""
        h, n, d = k.shape
        kmin, kmax = bounds.sync(heads, k)
        r = max(1, min(d, int(d * self.r_frac)))
        pages, _ = sparq_page_scores(q, kmin, kmax, r)  # (h, g, P)
        tokens = pages.repeat_interleave(self.chunk, dim=-1)[..., :n]
        idx = topk_sorted(torch.softmax(tokens, dim=-1).sum(dim=1), top_k)
        read = idx.numel() * 2 * d + 2 * kmin.shape[0] * kmin.shape[1] * r  # elements
        return attend_tokens(q, k, v, idx, scale), read * k.element_size()
