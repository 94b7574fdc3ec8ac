"""atskv: the Adaptive Token-Relevance Sparse KV-Cache (this project's method).

Three components, each with an ablation switch:

1. **Token relevance at prefill** (``signal``). By default (``recon``) what reconstructing the
   context needs: KVzip's context-reconstruction attention (the engine's extra passes of
   ``recon_chunk`` tokens each, several prefills' time), which asks no question, so it holds
   when the question comes after compression; lifted by the question's attention where the
   question is in view (``question_boost``: each score times ``1 + question_boost * r``, ``r``
   the last :data:`QUESTION_QUERIES` prompt queries' attention to the token relative to
   uniform), and only where a head keeps less than ``question_below`` of the prompt (from
   ``question_alone_from``, off by default, the question's attention alone). Where the
   caller says the question comes after compression (``PrefillContext.question_follows``, the
   question-agnostic protocol) the prompt's last queries are the context's, which attend the
   text near them and the preamble, and nothing is lifted. The alternatives are the
   observation window's attention (the last ``window`` prompt queries), summed over the GQA
   group and max-pooled so neighbours share relevance (``attn``), weighted by the token's value
   norm (``attn_vnorm``, the value-aware pruning idea), or the value norm alone (``vnorm``).
   docs/atskv_research.md has each signal's dev numbers.
   Relevance is then mixed with a consensus shared by every layer and head (``consensus``): a
   fact that the question's retrieval heads single out is kept in every head, not only in those
   whose window attention happened to find it (measured on SmolLM2: without it, most heads
   dropped some digits of the needle and answers came out truncated). A token's consensus is
   its mean relevance over the ``consensus_top`` heads that give it the most (0: over every
   head, which favours what all heads attend a little, such as the prompt's preamble: at 512
   tokens that took the whole budget; see :func:`consensus` and docs/atskv_research.md).
   Relevance also flows forward over ``span`` tokens: what follows a relevant token (the value
   after its key) inherits its score.
2. **Span-aware, adaptive budgets** (``chunk``, ``adaptive``). Selection is by chunks of
   ``chunk`` consecutive tokens (facts span several tokens: SmolLM2 writes every digit as its own
   token), not single tokens. One global budget - the shared ``budget`` of every layer and head
   together - is spread over all (layer, KV head) pairs by relevance: each head's scores are
   normalised to a distribution, every head keeps a floor of ``min_share`` of the uniform share
   (none by default: the floor cost at 4096 tokens on dev, docs/atskv_research.md idea 16),
   and the rest goes to the globally most relevant chunks, so concentrated heads keep few tokens
   and diffuse ones many. Sinks and the observation window are always kept. Storage is ragged
   per head (no padding, no masks). A budget whose average head holds at most
   :meth:`ATSKV.fit`'s pages (``dense_small``) decodes densely and stores neither page
   summaries nor page rounding: their bytes (about 1/6 of the budget at 512 tokens and budget
   0.2) hold tokens. No head is capped there: the global allocation may give
   one head most of its context (capping heads at ``fit()`` pages cost 6-23 points without the
   question at 2048 and 4096 tokens on dev, docs/atskv_research.md idea 14); a dense step then
   reads every kept token, the budget's bytes.
3. **Sparse decode** (``sparse_decode``). Each step, per KV head, page summaries (Quest-style
   key min/max plus the key sum over ``page_size`` tokens) estimate every page's share of the
   attention (see :meth:`ATSKV.rank_pages`); pages are ranked by it and the smallest set whose
   estimated mass reaches ``mass`` is attended exactly, at least ``min_pages`` and at most
   ``max_pages``; the first page (sinks), the newest page and the pages holding the
   ``pin_chunks`` most relevant chunks of the prefill are always included (the query-aware prior:
   without it the needle's last digit was lost on some steps). A head is ranked only when that
   can save time (see :meth:`ATSKV.fit`): one holding at most ``fit_pages`` pages attends all of
   them, as attending densely would; when every head of every layer fits, the decode is dense
   and the page summaries are neither read nor updated. (Ranking by
   the upper bound alone, as Quest does, captured only ~76% of the true attention mass at
   ``mass=0.95`` on SmolLM2; the two-sided estimate captured ~97% at 0.99.)

The decode state lives in :class:`atskv.core.stores.StaticPagedKV`: preallocated, on the device.
With ``static=True`` the step has fixed shapes (always ``max_pages`` pages gathered, the ones
beyond the adaptive count masked) and no host sync, so ``hardware.cuda_graph`` captures it; with
``static=False`` the same selection is computed with data-dependent shapes (exactly the chosen
pages), which reads less but cannot be captured. Both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import kernels
from atskv.core.method import (
    METHODS,
    AttendResult,
    PrefillContext,
    Reconstruction,
    State,
    headroom,
)
from atskv.core.stores import StaticPagedKV
from atskv.methods.kvzip import reconstruction_passes
from atskv.methods.pages import page_upper_bound
from atskv.methods.scoring import ScoredSelection, pool1d, window_attention, window_scores

SIGNALS = ("attn", "attn_vnorm", "vnorm", "recon")
#: KVzip's reconstruction overlap (its default), for the ``recon`` signal
RECON_OVERLAP = 8
#: the prompt queries whose attention picks ``question_share`` of a head's tokens, and the span
#: that what follows each of them inherits
QUESTION_QUERIES, QUESTION_SPAN = 32, 16


@dataclass
class ATSKVState(State):
    #: per layer and head, the rows of the most relevant chunks (consumed by make_store)
    pins: list[list[Tensor] | None] = field(default_factory=list)
    #: every layer's pages fit ``max_pages``: decode attends densely everywhere (one decision
    #: per generation, so that a compiled step does not branch differently per layer)
    dense: bool = True

    def own_tensors(self) -> Iterator[Tensor]:
        for layer in self.pins:
            yield from layer or ()


#: a page cap no store reaches: every head's pages fit, so the kernel attends all of them unranked
EVERY_PAGE = 2**62
#: what ranking one page of a head costs, in tokens' attention: 2-4 in a loop and 4.8 inside
#: decode steps for the CPU kernel on SmolLM2's stores at 4096 tokens (docs/performance.md),
#: not the 1.5 that its bytes alone (3 key rows a page) would cost
RANK_TOKENS = 5


@METHODS.register("atskv")
@dataclass(frozen=True)
class ATSKV(ScoredSelection[ATSKVState]):
    # signal, chunk, span and min_share: chosen on the dev split by hand (reconstruction
    # relevance, single tokens, no forward span, no per-head floor: docs/atskv_research.md ideas
    # 7, 10 and 16); window, question_boost and consensus: what atskv's own dev tuning chose (the
    # same 12 trials as every baseline; conf/method/tuned/atskv.yaml, rounded to two decimals)
    signal: str = "recon"
    window: int = 8
    chunk: int = 1
    consensus: float = 0.96
    span: int = 0
    adaptive: bool = True
    min_share: float = 0.0
    n_sink: int = 4
    sparse_decode: bool = True
    page_size: int = 16
    max_pages: int = 48
    fit_pages: int | None = None  # None: the pages for which ranking cannot pay (see fit())
    min_pages: int = 16
    pin_chunks: int = 4
    mass: float = 0.999
    static: bool = True
    # consensus_top and dense_small: chosen on the dev split by hand (docs/atskv_research.md)
    consensus_top: int = 3
    dense_small: bool = True
    # with signal=recon: the share of each head's middle budget that the question's attention
    # (the last QUESTION_QUERIES prompt queries) picks, the rest by reconstruction
    question_share: float = 0.0
    # with signal=recon: reconstruction scores times (1 + question_boost * r), r the question's
    # attention relative to uniform (docs/atskv_research.md idea 12); both only where the
    # question is in view (not with ctx.question_follows: idea 13)
    question_boost: float = 3.0
    # ... and only where a head keeps less than this share of the prompt (with more,
    # reconstruction keeps what the question asks for and the boost cost on dev: idea 15)
    question_below: float = 0.15
    # where the question is in view and a head keeps at least this share of the prompt, the
    # question's attention alone is the relevance, in place of ``signal``'s (1: never;
    # docs/atskv_research.md idea 18)
    question_alone_from: float = 1.0
    # with signal=recon: tokens per reconstruction pass (KVzip's default as kvpress runs it)
    recon_chunk: int = 2048

    paper = "this project (see src/methods/atskv.py)"
    # the relevance knobs (the baselines' 12 trials over three knobs, not more); the other
    # switches are ablations, the sparse-decode knobs keep their defaults
    search_space = {
        "window": "choice(1, 8, 16, 32)",
        "question_boost": "choice(0.1, 0.3, 1.0, 3.0)",
        "consensus": "interval(0.0, 1.0)",
    }
    sparse_reads = True
    state_type = ATSKVState

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("signal", self.signal, self.signal in SIGNALS,
                   f"is unknown; choose one of {', '.join(SIGNALS)}")
        for name in ("chunk", "page_size", "max_pages", "min_pages", "recon_chunk"):
            self.check(name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
        if self.fit_pages is not None:
            self.check("fit_pages", self.fit_pages, self.fit_pages >= 1,
                       "must be >= 1 (or null: the pages for which ranking cannot pay)")
        for name in ("n_sink", "span", "pin_chunks", "consensus_top", "question_boost",
                     "question_below"):
            self.check(name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        for name, lo, hi in (("min_share", 0.0, 1.0), ("consensus", 0.0, 1.0), ("mass", 1e-9, 1.0),
                             ("question_share", 0.0, 1.0), ("question_alone_from", 0.0, 1.0)):
            value = getattr(self, name)
            self.check(name, value, lo <= value <= hi, f"must be in [{lo:g}, {hi:g}]")

    def static_decode(self) -> bool:
        return self.static

    def queries_needed(self) -> int:
        question = self.asks() or self.question_alone_from < 1
        return max(self.window, QUESTION_QUERIES if question else 0)

    def fit(self) -> int:
        """The most pages a head may hold and attend all of them, unranked (``fit_pages``, or by
        default the most for which ranking cannot pay). Ranking a head of ``n`` pages costs
        about :data:`RANK_TOKENS` tokens' attention per page, to skip the pages past
        ``max_pages``: it takes less time than attending all ``page`` tokens of every page only
        when ``RANK_TOKENS n + page max_pages < page n`` (at 16-token pages and ``max_pages``
        48: 70 pages or more; counting a page's bytes alone, 1.5 tokens, ranks heads whose
        ranking costs more time than it saves, docs/performance.md). With pages of at most
        ``RANK_TOKENS`` tokens ranking never pays: no head is ranked unless ``fit_pages`` says
        so."""
        if self.fit_pages is not None:
            return self.fit_pages
        p = self.page_size
        if p <= RANK_TOKENS:
            return EVERY_PAGE
        return max(self.max_pages, p * self.max_pages // (p - RANK_TOKENS))

    def prompt_target(self, prompt_len: int) -> int:
        """Prompt tokens per head whose storage fits the prompt budget's bytes when the page
        summaries of the prompt's pages (min, max and sum of keys: 1.5 tokens' worth of K+V per
        page) and the page rounding (half a page per head on average) are paid out of it.
        Generated tokens, and their pages' summaries, come on top as for every appending
        method."""
        keep = self.prompt_keep(prompt_len)
        if not self.sparse_decode or keep >= prompt_len or self.unranked(keep):
            return keep  # no summaries, no rounding
        p = self.page_size
        return max(0, int(keep * p / (p + 1.5) - (p - 1) / 2))

    def unranked(self, keep: int) -> bool:
        """Whether a budget of ``keep`` tokens per head decodes densely (``dense_small``): the
        average head holds at most :meth:`fit`'s pages, so no head is ranked, and neither page
        summaries nor page rounding are stored (their bytes go to tokens instead). Chosen on
        dev (docs/atskv_research.md idea 20): at 4096 tokens and budget 0.2 (51 pages a head on
        average) the ranking's skipped pages cost 11 points with the question in view."""
        return (self.dense_small and self.sparse_decode
                and keep <= self.fit() * self.page_size)

    # -- prefill: relevance and allocation ----------------------------------------------------
    def reconstruction(self, prompt: Sequence[int], tokenizer: Any,
                       question_follows: bool = False) -> list[Reconstruction]:
        """KVzip's context-reconstruction passes, for the ``recon`` signal where the question
        does not score alone (none otherwise)."""
        n = len(prompt)
        keep = self.prompt_keep(n)
        if self.signal != "recon" or keep >= n or self.question_alone(n, question_follows):
            return []
        return reconstruction_passes(prompt, tokenizer, min(self.n_sink, keep),
                                     self.recon_chunk, RECON_OVERLAP)

    def relevance(self, q: Tensor, k: Tensor, v: Tensor, scale: float, n_sink: int,
                  recon: Tensor | None = None) -> Tensor:
        """``(H_kv, M)`` relevance of the middle tokens ``[n_sink, L - w)`` (``w``: the
        window queries given), normalised to sum to 1 per head (comparable across heads and
        layers). ``signal=recon``: the layer's reconstruction scores ``recon`` ``(H_kv, L)``
        instead (what reconstructing the context needs, which asks no question), as they are:
        attention probabilities, already comparable across heads (normalised per head, they
        lost the needles on dev: docs/atskv_research.md)."""
        n = k.shape[1]
        w = q.shape[1]
        if self.signal == "recon":
            if recon is None:
                raise ValueError("signal 'recon' scores with the engine's reconstruction "
                                 "passes; this PrefillContext has none")
            return recon[:, n_sink : n - w].float()
        if self.signal == "vnorm":
            s = v[:, n_sink : n - w].float().norm(dim=-1)
        else:
            s = window_scores(q, k, scale, w, self.kernel, self.pooling)[:, n_sink:]
            if self.signal == "attn_vnorm":
                s = s * v[:, n_sink : n - w].float().norm(dim=-1)
        return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def select(self, state: ATSKVState, ctx: PrefillContext) -> list[list[Tensor]] | None:
        n = ctx.prompt_len
        tokens = self.prompt_target(n)
        if state.keep >= n or tokens >= n:
            return None
        sinks_n = min(self.n_sink, tokens)  # a budget below sinks + window shrinks them
        w = max(1, min(self.window, tokens - sinks_n))
        middle = n - w - sinks_n
        per_head = max(0, tokens - w - sinks_n)  # middle tokens
        if middle <= 0:
            return None
        if self.question_alone(n, ctx.question_follows):
            rel = self.question_relevance(ctx, sinks_n, w)
            asks = None
        else:
            recon = ctx.reconstruction or [None] * len(ctx.keys)
            rel = torch.stack([self.relevance(q[:, -w:], k, v, ctx.scale, sinks_n, r)
                               for q, k, v, r in zip(ctx.queries, ctx.keys, ctx.values, recon)])
            rel = self.with_consensus(rel)
            if self.span:
                rel = spread_forward(rel.flatten(0, 1), self.span).view_as(rel)
            asks = self.question_relevance(ctx, sinks_n, w) if self.asks(ctx) else None
        if asks is not None and self.question_boost:
            rel = rel * (1 + self.question_boost * asks * asks.shape[-1])
        asked = self.question_picks(asks, per_head)  # (N, H, m)
        if asked is not None:  # ranked last by reconstruction: picked already
            rel = rel.scatter(-1, asked, -1.0)
        m = 0 if asked is None else asked.shape[-1]
        chunk_scores = [chunk_sum(r, self.chunk) for r in rel]
        n_chunks = chunk_scores[0].shape[1]
        total = int((per_head - m) / self.chunk * ctx.n_kv_heads * ctx.n_layers)
        if self.adaptive:
            counts = allocate(torch.stack(chunk_scores), total, self.min_share)
        else:
            counts = torch.full((ctx.n_layers, ctx.n_kv_heads), total // (ctx.n_layers * ctx.n_kv_heads))
        dev = ctx.keys[0].device
        sinks = torch.arange(sinks_n, device=dev)
        tail = torch.arange(n - w, n, device=dev)
        # a store that is never ranked takes no pins (they would be held for nothing)
        takes_pins = self.sparse_decode and not self.unranked(state.keep)
        keep = []
        for layer, scores in enumerate(chunk_scores):
            heads, pins = [], []
            for h in range(ctx.n_kv_heads):
                c = int(min(counts[layer, h], n_chunks))
                top = torch.topk(scores[h], c).indices if c else sinks[:0]  # best first
                tok = (top[:, None] * self.chunk + torch.arange(self.chunk, device=dev))
                tok = tok[tok < middle].view(-1) + sinks_n if c else sinks[:0]
                if m:  # the question's picks first (best first), none twice
                    tok = torch.cat([asked[layer, h] + sinks_n, tok])
                    tok = tok[first_occurrence(tok)]
                kept = torch.cat([sinks, tok.sort().values, tail])
                heads.append(kept)
                best = tok[: self.pin_chunks * self.chunk]  # the most relevant chunks' tokens
                pins.append(torch.searchsorted(kept, best))  # their rows in the head's segment
            keep.append(heads)
            state.pins.append(pins if takes_pins else None)
        return keep

    def with_consensus(self, rel: Tensor) -> Tensor:
        """``(N, H, M)`` per-head relevance mixed with the top heads' consensus (``consensus``
        of it; unchanged at 0)."""
        if not self.consensus:
            return rel
        return (1 - self.consensus) * rel + self.consensus * consensus(rel, self.consensus_top)

    def asks(self, ctx: PrefillContext | None = None) -> bool:
        """Whether the question's attention enters the selection: with the reconstruction
        signal and a boost or a share (the window's attention is the whole signal otherwise),
        and for ``ctx`` neither when it says the question comes after compression (its prompt
        ends with the context, whose last queries attend what is near them, not what a question
        asks: docs/atskv_research.md, idea 13) nor when a head keeps ``question_below`` of the
        prompt or more (idea 15)."""
        if ctx is not None and (ctx.question_follows or self.prompt_keep(ctx.prompt_len)
                                >= self.question_below * ctx.prompt_len):
            return False
        return self.signal == "recon" and bool(self.question_share or self.question_boost)

    def question_alone(self, prompt_len: int, question_follows: bool) -> bool:
        """Whether the question's attention alone scores the middle tokens
        (``question_alone_from``): the question is in view (not ``question_follows``) and a head
        keeps that share of the prompt or more."""
        return (not question_follows
                and self.prompt_keep(prompt_len) >= self.question_alone_from * prompt_len)

    def question_picks(self, asks: Tensor | None, per_head: int) -> Tensor | None:
        """``(N, H, m)`` middle-token indices (best first) that the question's attention
        ``asks`` picks per layer and head, ``m = question_share * per_head``; None without a
        share."""
        m = int(self.question_share * per_head)
        if asks is None or m <= 0:
            return None
        return asks.topk(min(m, asks.shape[-1]), dim=-1).indices

    def question_relevance(self, ctx: PrefillContext, sinks_n: int, w: int) -> Tensor:
        """``(N, H, M)`` relevance of the middle tokens to the last :data:`QUESTION_QUERIES`
        prompt queries, each head's summing to 1: atskv's window relevance of those queries
        (pooled, the top-heads consensus mixed in, spread forward over :data:`QUESTION_SPAN`
        tokens)."""
        rel = []
        for q, k in zip(ctx.queries, ctx.keys):
            n = k.shape[1]
            probs = window_attention(q[:, -min(QUESTION_QUERIES, q.shape[1]):], k, ctx.scale)
            s = pool1d(probs.sum(dim=(1, 2))[:, sinks_n : n - w], self.kernel, self.pooling)
            rel.append(s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30))
        rel = self.with_consensus(torch.stack(rel))
        rel = spread_forward(rel.flatten(0, 1), QUESTION_SPAN).view_as(rel)
        return rel / rel.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    # -- decode -------------------------------------------------------------------------------
    def make_store(self, state: ATSKVState, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> StaticPagedKV:
        rows = [headroom(state)] * len(keep)
        if not self.sparse_decode or self.unranked(state.keep):
            return StaticPagedKV(keys, values, keep, rows, page=1, bounds=False)
        store = StaticPagedKV(keys, values, keep, rows, self.page_size)
        state.dense = state.dense and store.n_pages <= self.fit()
        if layer < len(state.pins) and state.pins[layer] is not None:
            for h, rows in enumerate(state.pins[layer]):
                store.pinned[h, rows.to(keys.device) // self.page_size] = True
            state.pins[layer] = None  # consumed: the store's pinned pages hold it now
        return store

    def plain_decode(self, state: ATSKVState) -> bool:
        return state.dense or not self.sparse_decode  # decode_layer's first branch

    def decode_layer(self, state: ATSKVState, layer: int, store: StaticPagedKV, q: Tensor, k: Tensor,
                     v: Tensor, scale: float) -> AttendResult:
        if state.dense or not self.sparse_decode:
            # no head is ranked in this generation: the page summaries are neither read nor
            # updated, and a compiled step does not take them (each tensor a step takes is
            # checked before every call)
            store.append(k, v, bounds=False)
            return self.attend(state, layer, store, q, scale)
        if self.static and store.kernel:
            # the append, the ranking and the attention in one native call
            out, read = store.decode_ranked(q, k, v, scale, int(self.max_pages), int(self.fit()),
                                            int(self.min_pages), float(self.mass))
            return AttendResult(out, read + store.summary_bytes())
        return super().decode_layer(state, layer, store, q, k, v, scale)

    def attend(self, state: ATSKVState, layer: int, store: StaticPagedKV, q: Tensor,
               scale: float) -> AttendResult:
        if not self.sparse_decode or state.dense:
            # no head of any layer holds more than fit() pages: exact attention over all of them
            return AttendResult(*store.attend(q, scale))
        pages, chosen = self.rank_pages(store, q, scale)
        meta = store.summary_bytes()
        if self.static:
            out, read = store.attend(q, scale, pages, chosen)
            return AttendResult(out, read + meta)
        rows, valid = store.token_index(pages)
        valid = valid & chosen.repeat_interleave(store.page, dim=1)
        outs, read = [], 0
        for h in range(store.n_heads):  # exactly the chosen tokens: data-dependent shapes
            r = rows[h][valid[h]]
            outs.append(F.scaled_dot_product_attention(q[h : h + 1], store.k[r][None],
                                                       store.v[r][None], scale=scale))
            read += r.numel()
        return AttendResult(torch.cat(outs), read * store.token_bytes() + meta)

    def rank_pages(self, store: StaticPagedKV, q: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """The ``K = min(max(max_pages, fit()), n_pages)`` best pages per head ``(H, K)``, best
        first, and which of them the adaptive rule attends ``(H, K)`` (fixed shapes, no host
        sync): every page of a head holding at most :meth:`fit` pages, at most ``max_pages`` of
        the others.

        A page's share of the attention is estimated from its log-sum-exp, approximated as the
        mean of an upper bound (Quest's ``q . kmax/kmin``, which overestimates) and a lower bound
        (the logit of the mean key, Jensen), plus ``log`` of its token count; estimates are
        averaged over the query heads of the GQA group. Pages are taken best first until the
        estimated mass reaches ``mass``.

        On the CPU in float32 a static decode step runs this in the native kernel instead
        (``atskv::paged_decode``: the append, ``atskv::rank_pages`` and the attention in one
        call per layer, see :meth:`decode_layer`; compiled PyTorch runs the ranking as a chain of
        small kernels); this is the path on CUDA and for other dtypes, the dynamic path's, and
        what the kernel is tested against.
        """
        counts = store.page_counts()  # (H, P)
        live = counts > 0
        kmin, kmax, ksum = store.page_summaries().unbind(2)  # each (H, P, d)
        upper = page_upper_bound(q, kmin, kmax)  # (H, g, P)
        mean_key = ksum / counts.clamp_min(1)[..., None].to(ksum.dtype)
        lower = (q.float()[:, :, None] * mean_key.float()[:, None]).sum(-1)  # (H, g, P), fused
        logit = (upper + lower) * (scale / 2) + counts.clamp_min(1).log()[:, None]
        logit = logit.masked_fill(~live[:, None], float("-inf"))
        est = torch.softmax(logit, dim=-1).mean(dim=1)  # (H, P)
        slot = torch.arange(store.n_pages, device=q.device)[None]
        used = live.sum(dim=1, keepdim=True)
        forced = (slot == 0) | (slot == used - 1) | store.pinned  # sinks, newest, most relevant
        fit = self.fit()
        fits = used <= fit  # a head ranking cannot pay for: all of its pages
        forced = forced | fits
        k = kernels.page_slots(self.max_pages, fit, store.n_pages)
        # forced pages rank first, slots holding no token last (a forced live page whose share
        # rounds away in ``2 + est`` must not tie with them)
        key = (est + forced * 2.0).masked_fill(~live, -1.0)
        order = torch.topk(key, k, dim=-1).indices
        est = est.gather(1, order)
        rank = torch.arange(k, device=q.device)[None]
        # estimated mass of the better-ranked pages (a masked sum rather than cumsum, which a
        # compiled step would leave as a library call)
        before = (est[:, None, :] * (rank[:, None, :] < rank[0, :, None])).sum(-1)
        chosen = ((before < self.mass) | (rank < self.min_pages) | forced.gather(1, order))
        chosen = chosen & live.gather(1, order) & ((rank < self.max_pages) | fits)
        return order, chosen


def first_occurrence(x: Tensor) -> Tensor:
    """Boolean mask of the entries of the 1-D ``x`` not seen earlier in it."""
    same = x[:, None] == x[None, :]
    return ~same.tril(-1).any(dim=1)


def consensus(rel: Tensor, top: int = 0) -> Tensor:
    """``(N, H, M)`` per-head relevance (each head's sums to 1) -> ``(M,)`` the relevance every
    head shares, summing to 1: each token's mean over the ``top`` heads that give it the most
    (``top`` 0: over every layer and head). The mean over every head favours what all heads
    attend a little (the prompt's preamble, the text nearest the window); the top heads' mean
    favours what a few retrieval heads single out (at 512 tokens on SmolLM2 the needle took
    most of one head's attention and little of the others')."""
    flat = rel.flatten(0, 1)
    if not top:
        return flat.mean(dim=0)
    shared = flat.topk(min(top, flat.shape[0]), dim=0).values.mean(dim=0)
    return shared / shared.sum().clamp_min(1e-30)


def spread_forward(scores: Tensor, span: int) -> Tensor:
    """``(H, M)`` -> each token takes the largest score among itself and the ``span`` tokens
    before it, so what follows a relevant token (a key's value: "... for X is: 6392092") is
    relevant too."""
    padded = F.pad(scores, (span, 0), value=float("-inf"))
    return F.max_pool1d(padded[:, None], span + 1, stride=1)[:, 0]


def chunk_sum(scores: Tensor, chunk: int) -> Tensor:
    """``(H, M)`` token scores -> ``(H, ceil(M / chunk))`` chunk scores (sums)."""
    if chunk == 1:
        return scores
    pad = -scores.shape[1] % chunk
    return F.pad(scores, (0, pad)).view(scores.shape[0], -1, chunk).sum(-1)


def allocate(scores: Tensor, total: int, min_share: float) -> Tensor:
    """Spread ``total`` chunks over ``(layers, heads)`` by relevance.

    ``scores`` ``(N, H, C)``: per-head normalised chunk scores. Every head first gets its best
    ``floor(min_share * total / (N * H))`` chunks; the remaining budget goes to the globally
    highest-scoring chunks not yet taken, one head's at most ``C``. Returns ``(N, H)`` counts
    summing to ``min(total, N * H * C)``.
    """
    n, h, c = scores.shape
    total = min(total, n * h * c)
    floor = min(c, int(min_share * total / (n * h)))
    ranked = scores.sort(dim=-1, descending=True).values
    counts = torch.full((n, h), floor, dtype=torch.long)
    rest = ranked[..., floor:c].reshape(-1)
    extra = total - floor * n * h
    if extra > 0 and rest.numel():
        owner = torch.arange(n * h).repeat_interleave(c - floor)
        winners = torch.topk(rest, extra).indices
        counts += torch.bincount(owner[winners], minlength=n * h).view(n, h)
    return counts

