"""Shared scoring and selection pieces (SnapKV-style), used by every score-based method, and
:class:`ScoredSelection`, the base of the methods that keep a per-head top-k of scored prompt
tokens plus the observation window.

Attention weights are not returned by SDPA kernels, so the observation-window attention is
recomputed here: ``softmax(Q_win K^T * scale)``, causal inside the window. Scores are aggregated
over the query heads of a GQA group and selection happens once per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core.method import Method, PrefillContext, S

POOLINGS = ("max", "avg")
#: the search space of :class:`ScoredSelection`'s own knobs, as SnapKV varies them; subclasses
#: take the entries that apply to them (:func:`scoring_space`)
SCORING_SPACE: dict[str, str] = {
    "window": "choice(8, 16, 32, 64)",
    "kernel": "choice(1, 7, 15, 31)",
    "pooling": "choice(max, avg)",
}


def scoring_space(*names: str) -> dict[str, str]:
    """The entries ``names`` of :data:`SCORING_SPACE`."""
    return {n: SCORING_SPACE[n] for n in names}


def window_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Attention probabilities of the last ``w`` prompt queries over all ``L`` prompt keys.

    Args:
        q: ``(H_q, w, d)`` queries of the last ``w`` prompt positions (after RoPE).
        k: ``(H_kv, L, d)`` keys (after RoPE).
    Returns:
        ``(H_kv, g, w, L)`` probabilities (float32); query ``i`` sees keys ``<= L - w + i``.
    """
    h_q, w, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    logits = torch.einsum("hgwd,hld->hgwl", q.view(h_kv, g, w, d).float(), k.float()) * scale
    causal = torch.ones(w, n, dtype=torch.bool, device=q.device).tril(n - w)
    logits = logits.masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pool1d(scores: Tensor, kernel: int, kind: str = "max") -> Tensor:
    """Smooth ``(H, L)`` scores along the sequence (stride 1, same padding)."""
    if kernel <= 1:
        return scores
    x = scores[:, None]
    if kind == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0, : scores.shape[1]]
    if kind == "avg":
        return F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2,
                            count_include_pad=False)[:, 0, : scores.shape[1]]
    raise ValueError(f"pooling {kind!r}; choose max or avg")


def window_scores(q: Tensor, k: Tensor, scale: float, window: int, kernel: int = 1,
                  pool: str = "max", reduce: str = "sum") -> Tensor:
    """SnapKV relevance of every prompt token outside the observation window.

    Returns ``(H_kv, L - w)``: attention mass from the last ``w`` queries, summed over the
    window, aggregated over the GQA group (``reduce``: sum or mean), then pooled.
    """
    probs = window_attention(q[:, -window:], k, scale)  # (H_kv, g, w, L)
    s = probs.sum(dim=2)  # over window queries -> (H_kv, g, L)
    s = s.sum(dim=1) if reduce == "sum" else s.mean(dim=1)
    return pool1d(s[:, : k.shape[1] - window], kernel, pool)


def keep_topk_plus_window(scores: Tensor, budget: int | list[int], window: int) -> list[Tensor]:
    """Per head: the top-``budget`` prefix tokens by score plus the last ``window`` tokens,
    sorted by position. ``scores`` is ``(H, L - w)``; ``budget`` is per head or shared."""
    h, prefix = scores.shape
    budgets = budget if isinstance(budget, list) else [budget] * h
    tail = torch.arange(prefix, prefix + window, device=scores.device)
    out = []
    for i in range(h):
        out.append(torch.cat([topk_sorted(scores[i], budgets[i]), tail]))
    return out


def topk_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last dim, in ascending index order."""
    k = max(0, min(k, scores.shape[-1]))
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


@dataclass(frozen=True)
class ScoredSelection(Method[S]):
    """Keep, per layer and KV head, the top-scored prompt tokens plus the observation window
    (SnapKV and the methods built on it; kvpress's ScorerPress idea).

    Owns the window/kernel/pooling settings, their validation and the top-k. A subclass says how
    it scores (:meth:`scores`; default: SnapKV's observation-window attention, summed over the
    window and the GQA group, pooled) and how many tokens each layer and head keeps beyond the
    window (:meth:`budgets`; default: the uniform prompt budget). The window shrinks to the
    budget when the budget is smaller. Nothing is selected (the full prompt is kept) when the
    budget covers the prompt.
    """

    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    # SnapKV's knobs: the observation window and the pooling (kernel 1: none; max vs avg)
    search_space = SCORING_SPACE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("window", self.window, self.window >= 1, "must be >= 1")
        self.check("kernel", self.kernel, self.kernel >= 1, "must be >= 1")
        self.check("pooling", self.pooling, self.pooling in POOLINGS,
                   f"is unknown; choose one of {', '.join(POOLINGS)}")

    def queries_needed(self) -> int:
        return self.window

    def select(self, state: S, ctx: PrefillContext) -> list[list[Tensor]] | None:
        keep = state.keep
        if keep >= ctx.prompt_len:
            return None
        w = min(self.window, keep)
        scores = [self.scores(ctx, layer, w) for layer in range(ctx.n_layers)]
        budgets = self.budgets(state, ctx, scores, keep - w)
        return [keep_topk_plus_window(s, b, w) for s, b in zip(scores, budgets)]

    def scores(self, ctx: PrefillContext, layer: int, w: int) -> Tensor:
        """``(H_kv, L - w)`` relevance of the prompt tokens before the window."""
        return window_scores(ctx.queries[layer], ctx.keys[layer], ctx.scale, w, self.kernel,
                             self.pooling)

    def budgets(self, state: S, ctx: PrefillContext, scores: list[Tensor],
                per_layer: int) -> list[int | list[int]]:
        """Tokens beyond the window each layer keeps (an int, or one per KV head), given the
        average ``per_layer``."""
        return [per_layer] * ctx.n_layers


def accumulated_attention(q: Tensor, k: Tensor, scale: float, block: int = 1 << 24) -> Tensor:
    """H2O's accumulated attention: for every prompt key, the attention it received from the
    queries ``q`` ``(H_q, n, d)`` (the last ``n`` prompt positions), summed over the queries and
    the GQA group; ``(H_kv, L)`` float32. Queries go in chunks whose logits hold about ``block``
    elements; this is O(n L) work and, unlike fused prefill attention, materialises every row."""
    h_q, n, d = q.shape
    h_kv, total, _ = k.shape
    qg = q.view(h_kv, h_q // h_kv, n, d)
    kt = k.float().transpose(1, 2)[:, None]  # (H_kv, 1, d, L)
    out = torch.zeros(h_kv, total, device=k.device)
    chunk = max(1, block // (h_q * total))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        visible = total - n + e  # keys the last query of this chunk may see
        probs = torch.matmul(qg[:, :, s:e].float() * scale, kt[..., :visible])
        future = torch.ones(e - s, visible, dtype=torch.bool, device=k.device).triu_(visible - e + s + 1)
        probs = torch.softmax(probs.masked_fill_(future, float("-inf")), dim=-1)
        out[:, :visible] += probs.sum(dim=(1, 2))
    return out


def fit_total(budgets: list[int], total: int, caps: list[int]) -> list[int]:
    """Clamp per-layer budgets to ``[0, caps]`` and make them sum to ``total``: the last layer
    absorbs the difference, spilling to earlier layers only where it hits a bound."""
    out = [max(0, min(b, c)) for b, c in zip(budgets, caps)]
    diff = total - sum(out)
    for j in reversed(range(len(out))):
        if diff == 0:
            break
        new = max(0, min(caps[j], out[j] + diff))
        diff -= new - out[j]
        out[j] = new
    return out


def pyramid_budgets(extra: int, n_layers: int, beta: int, limit: int) -> list[int]:
    """PyramidKV's per-layer tokens beyond the window: ``max - l * (max - min) // (N - 1)`` with
    ``min = extra // beta`` and ``max = 2 * extra - min``, made to sum to ``extra * N`` exactly.
    Uniform (``extra`` everywhere) when the lowest layer's share would exceed ``limit``."""
    lo = extra // beta
    hi = 2 * extra - lo
    if n_layers == 1 or hi > limit:
        return [min(extra, limit)] * n_layers
    raw = [hi - layer * (hi - lo) // (n_layers - 1) for layer in range(n_layers)]
    return fit_total(raw, extra * n_layers, [limit] * n_layers)


def adaptive_head_budgets(scores: Tensor, per_head: int, floor_alpha: float) -> list[int]:
    """AdaKV's head-wise budgets (arXiv 2407.11550): one layer's total ``H x per_head`` spread
    over its heads by their scores.

    ``scores`` ``(H, M)``: each head's candidates (higher is kept first), comparable across the
    heads of the layer. ``c_h`` = how many of the layer's top ``H x per_head`` scores (all heads
    pooled) are head ``h``'s: a head whose attention is concentrated on few tokens wins few,
    a diffuse one many. The authors' safeguard blends this with the uniform split, ``b_h =
    floor_alpha x per_head + (1 - floor_alpha) x c_h``, so that every head keeps at least
    ``floor(floor_alpha x per_head)``; the real-valued ``b_h`` are rounded by largest remainder
    so that they sum to exactly ``H x per_head`` (each at most ``M``).
    """
    h, m = scores.shape
    per_head = max(0, min(per_head, m))
    total = h * per_head
    if total == 0:
        return [0] * h
    won = torch.topk(scores.float().flatten(), total).indices // m
    counts = torch.bincount(won, minlength=h).double()
    ideal = floor_alpha * per_head + (1.0 - floor_alpha) * counts
    out = [min(m, int(x)) for x in ideal.floor().tolist()]
    frac = (ideal - ideal.floor()).tolist()
    # the largest fractional parts get one more each (ties: the lower head)
    for i in sorted(range(h), key=lambda i: (-frac[i], i)):
        if sum(out) == total:
            break
        if out[i] < m:
            out[i] += 1
    return out
