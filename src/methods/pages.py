"""Shared pieces of decode-time sparse attention (Quest, RocketKV stage 2).

Keys are grouped into pages of consecutive stored tokens; each page keeps the elementwise min and
max of its keys, updated as tokens are appended. ``sum_d max(q_d kmax_d, q_d kmin_d)`` is an
upper bound of ``q . k`` for every key of the page. Selection happens once per KV head, with
scores aggregated over its GQA group; the chosen tokens get exact softmax attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import kernels
from atskv.core.method import State
from atskv.core.stores import PackedKV, page_minmax, unreached_pages


def page_upper_bound(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """``sum_d max(q_d kmax_d, q_d kmin_d)`` for every query and page: ``q`` ``(h, g, d)``,
    bounds ``(h, P, d)`` -> ``(h, g, P)``, float32."""
    q = q.float()[:, :, None]  # (h, g, 1, d); as elementwise products and one sum, which a
    # compiled decode step fuses into a single loop (matrix products would be library calls)
    return torch.maximum(q * kmax.float()[:, None], q * kmin.float()[:, None]).sum(-1)


def sparq_page_scores(q: Tensor, kmin: Tensor, kmax: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """RocketKV's approximate page logits: along the ``r`` dims with the largest ``sum |q|`` over
    the group, the page bound, divided by the SparQ scale ``sqrt(d * sum|q_r| / sum|q|)``.
    Returns ``(h, g, P)`` scores and the chosen dims ``(h, r)``."""
    q = q.float()
    h, g, d = q.shape
    dims = torch.topk(q.abs().sum(dim=1), r, dim=-1).indices  # (h, r)
    q_r = q.gather(2, dims[:, None].expand(h, g, r))
    lo = kmin.gather(2, dims[:, None].expand(h, kmin.shape[1], r))
    hi = kmax.gather(2, dims[:, None].expand(h, kmax.shape[1], r))
    frac = q_r.abs().sum(-1) / q.abs().sum(-1).clamp_min(torch.finfo(q.dtype).tiny)
    return page_upper_bound(q_r, lo, hi) / (d * frac).sqrt().clamp_min(1e-6)[..., None], dims


class PageBounds:
    """Per-page key min/max of one layer's stored tokens, per KV head, kept in step with the
    store: each :meth:`sync` folds in the tokens appended since the last one (recomputing only
    the pages they touch). Stored in the cache dtype, preallocated for the store's capacity."""

    def __init__(self, store: PackedKV, page: int):
        self.page = page
        n_pages = -(-max(store.capacities) // page)
        shape = (store.n_heads, n_pages, store.k.shape[1])
        self.kmin = store.k.new_full(shape, float("inf"))
        self.kmax = store.k.new_full(shape, float("-inf"))
        self.seen = [0] * store.n_heads

    def sync(self, heads: slice, keys: Tensor) -> tuple[Tensor, Tensor]:
        """``keys`` ``(h, n, d)``: all stored keys of heads ``heads``; returns their bounds
        ``(h, ceil(n / page), d)``."""
        n = keys.shape[1]
        seen = min(self.seen[heads])
        first = seen // self.page if seen <= n else 0  # tokens only ever appended
        n_pages = -(-n // self.page)
        if first < n_pages:
            lo, hi = page_minmax(keys[:, first * self.page :], self.page)
            self.kmin[heads, first:n_pages] = lo
            self.kmax[heads, first:n_pages] = hi
        self.seen[heads] = [n] * len(self.seen[heads])
        return self.kmin[heads, :n_pages], self.kmax[heads, :n_pages]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.kmin, self.kmax

    def spare_bytes(self, store: PackedKV) -> int:
        """Bytes of the bounds of headroom pages that hold no token yet (the slots that pad a
        head to the longest head's pages are paid for, not spare)."""
        empty = unreached_pages(store.capacities, store.lengths, self.page)
        return empty * 2 * self.kmin.shape[-1] * self.kmin.element_size()


@dataclass
class BoundsState(State):
    """The state of a method that keeps :class:`PageBounds` per layer beside its stores (quest,
    rocket_kv): the bounds are counted, and those of headroom pages not reached are spare."""

    bounds: dict[int, PageBounds] = field(default_factory=dict)

    def own_tensors(self) -> Iterator[Tensor]:
        for b in self.bounds.values():
            yield from b.tensors()

    def spare_bytes(self) -> int:
        return sum(b.spare_bytes(self.stores[layer]) for layer, b in self.bounds.items())


def head_batches(store: PackedKV) -> list[tuple[slice, Tensor, Tensor]]:
    """The store's heads as ``(heads, keys (h, n, d), values)`` batches: one batch when every
    head holds the same number of tokens, else one per head."""
    dense = store.dense()
    if dense is not None:
        return [(slice(0, store.n_heads), *dense)]
    return [(slice(h, h + 1), *(t[None] for t in store.head(h))) for h in range(store.n_heads)]


def attend_tokens(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float,
                  valid: Tensor | None = None) -> Tensor:
    """Exact attention of ``q`` ``(h, g, d)`` over the tokens ``idx`` ``(h, m)`` of ``k``/``v``
    ``(h, n, d)``; ``valid`` ``(h, m)`` masks out padding entries of ``idx``. On CPU in float32,
    the native kernel reads the chosen rows in place (pages of one token); elsewhere they are
    gathered and attended by SDPA."""
    if kernels.usable(k):
        lens = torch.full((k.shape[0],), k.shape[1], dtype=torch.long)
        return kernels.paged_attention(q, k, v, None, lens, idx, valid, 1, scale)
    d = k.shape[-1]
    gather = idx[..., None].expand(*idx.shape, d)
    mask = None if valid is None else valid[:, None, :]
    return F.scaled_dot_product_attention(q, k.gather(1, gather), v.gather(1, gather),
                                          attn_mask=mask, scale=scale)
