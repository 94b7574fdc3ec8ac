"""Expected Attention (Devoto, Jeblick, Jegou, arXiv 2510.00636; kvpress's
ExpectedAttentionPress): keep the prompt tokens that future queries are expected to attend to,
predicted from the statistics of the prompt's queries, not from any particular query.

Per layer, the prompt's queries before RoPE (the last ``stats_window`` prompt queries, un-rotated
from their positions; all of them after the ``n_sink`` first by default) are summarised by their
mean ``mu`` and covariance ``S`` per query head. A future query at position ``t`` is ``R_t q``;
averaging the rotation over the next ``n_future`` positions, ``R = mean_t R_t``, gives the
future queries' mean ``R mu`` and covariance ``R S R^T``. For a Gaussian query, the expected
unnormalised attention a key ``k`` receives is ``exp(s k.(R mu) + s^2 k^T (R S R^T) k / 2)``
(``s`` the attention scale); its softmax over the prompt's keys (the ``n_sink`` first apart),
averaged over the GQA group and weighted by the value's norm, ``(p + epsilon) |v|``, is each
token's score. Per KV head the sinks and the top-scored tokens are kept; with ``headwise`` the
layer's budget is spread over its heads by these scores as AdaKV does (kvpress's leaderboard
configuration). No observation window is kept and nothing assumes a question at the end of the
prompt: the method reads the last queries only through their mean and covariance, so it serves
the question-agnostic protocol as well as the question-aware one. Generated tokens are all kept.
Fidelity notes: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.core.method import METHODS, Method, PrefillContext, State
from atskv.core.types import ConfigError
from atskv.methods.scoring import adaptive_head_budgets, topk_sorted

#: queries_needed() when the statistics use every prompt query (the engine keeps at most L)
ALL_QUERIES = 2**31 - 1


def rope_cos_sin(inv_freq: Tensor, scaling: float, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(n, d)`` cos and sin of the rotary embedding at ``positions`` ``(n,)``, as transformers'
    Llama computes them (float32 angles, halves repeated, times the attention scaling)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(q: Tensor, inv_freq: Tensor, scaling: float, positions: Tensor) -> Tensor:
    """The pre-RoPE vectors of ``q`` ``(..., n, d)``, rotated at ``positions`` ``(n,)``:
    ``R_p^{-1} q / scaling`` with ``R_p^{-1} = R_{-p}`` (float32)."""
    cos, sin = rope_cos_sin(inv_freq, 1.0, positions)
    q = q.float()
    return (q * cos - rotate_half(q) * sin) / scaling


def average_rotation(inv_freq: Tensor, scaling: float, start: int, n: int) -> Tensor:
    """``(d, d)``: the mean over positions ``start .. start + n - 1`` of the RoPE matrix
    ``R_t = diag(cos_t) + diag(sin_t) P`` (``P x = rotate_half(x)``), times the scaling."""
    cos, sin = rope_cos_sin(inv_freq, scaling, torch.arange(start, start + n,
                                                            device=inv_freq.device))
    d = cos.shape[-1]
    p = rotate_half(torch.eye(d, device=cos.device)).T  # P @ x == rotate_half(x)
    return torch.diag(cos.mean(0)) + torch.diag(sin.mean(0)) @ p


def query_statistics(pre: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(H, d)`` and covariance ``(H, d, d)`` (divided by n) of ``pre`` ``(H, n, d)``."""
    mu = pre.mean(dim=1)
    centred = pre - mu[:, None]
    return mu, centred.transpose(1, 2) @ centred / pre.shape[1]


def expected_attention(keys: Tensor, mu: Tensor, cov: Tensor | None, scale: float) -> Tensor:
    """``(H_kv, g, M)``: the softmax over the keys ``(H_kv, M, d)`` of the expected logits of
    queries with mean ``mu`` ``(H_q, d)`` and covariance ``cov`` ``(H_q, d, d)`` (None: mean
    only), ``s k.mu + s^2 k^T cov k / 2``."""
    h_kv, m, d = keys.shape
    g = mu.shape[0] // h_kv
    k = keys.float()
    logits = torch.einsum("hgd,hmd->hgm", mu.view(h_kv, g, d), k) * scale
    if cov is not None:
        kc = torch.einsum("hmd,hgde->hgme", k, cov.view(h_kv, g, d, d))
        logits = logits + 0.5 * scale**2 * (kc * k[:, None]).sum(-1)
    return torch.softmax(logits, dim=-1)


@METHODS.register("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(Method[State]):
    """kvpress's ExpectedAttentionPress settings (future positions 512, 4 sinks, covariance and
    value norms on), with its leaderboard configuration's ``epsilon`` 0.01 and AdaKV's head-wise
    budgets (``floor_alpha`` 0.2)."""

    n_future: int = 512
    stats_window: int | None = None  # None: every prompt query after the sinks
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.01
    headwise: bool = True
    floor_alpha: float = 0.2

    paper = "https://arxiv.org/abs/2510.00636"
    # which queries the statistics summarise, how far ahead the rotation is averaged, the value
    # norm's offset and the head-wise safeguard
    search_space = {
        "stats_window": "choice(32, 128, 512, 2048)",
        "n_future": "choice(64, 256, 512, 2048)",
        "epsilon": "choice(0.0, 0.001, 0.01, 0.1)",
        "floor_alpha": "interval(0.0, 0.8)",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("n_future", self.n_future, self.n_future >= 1, "must be >= 1")
        self.check("n_sink", self.n_sink, self.n_sink >= 0, "must be >= 0")
        if self.stats_window is not None:
            self.check("stats_window", self.stats_window, self.stats_window >= 1,
                       "must be >= 1 (or null: every prompt query after the sinks)")
        self.check("epsilon", self.epsilon, self.epsilon >= 0.0, "must be >= 0")
        self.check("floor_alpha", self.floor_alpha, 0.0 <= self.floor_alpha <= 1.0,
                   "must be in [0, 1]")

    def queries_needed(self) -> int:
        return ALL_QUERIES if self.stats_window is None else self.stats_window

    def select(self, state: State, ctx: PrefillContext) -> list[list[Tensor]] | None:
        n = ctx.prompt_len
        if state.keep >= n:
            return None
        if ctx.rope_inv_freq is None:
            raise ConfigError("method=expected_attention needs a model with rotary position "
                              "embeddings (its rotary_emb's inv_freq); this one has none")
        sinks = min(self.n_sink, state.keep)
        per_head = state.keep - sinks
        rot = average_rotation(ctx.rope_inv_freq, ctx.rope_scaling, n, self.n_future)
        out = []
        for layer in range(ctx.n_layers):
            s = self.scores(ctx, layer, sinks, rot)
            budgets = (adaptive_head_budgets(s, per_head, self.floor_alpha) if self.headwise
                       else [per_head] * s.shape[0])
            head = torch.arange(sinks, device=s.device)
            out.append([torch.cat([head, topk_sorted(s[h], b) + sinks])
                        for h, b in enumerate(budgets)])
        return out

    def scores(self, ctx: PrefillContext, layer: int, sinks: int, rot: Tensor) -> Tensor:
        """``(H_kv, L - sinks)`` scores of the tokens after the sinks, given the averaged future
        rotation ``rot`` ``(d, d)``."""
        n = ctx.prompt_len
        q = ctx.queries[layer]
        # the positions after the sinks (at least the last one, for a prompt of sinks only)
        w = min(q.shape[1], self.stats_window or q.shape[1], max(1, n - self.n_sink))
        positions = torch.arange(n - w, n, device=q.device)
        pre = unrotate(q[:, -w:], ctx.rope_inv_freq, ctx.rope_scaling, positions)  # type: ignore[arg-type]
        mu, cov = query_statistics(pre)
        mu = mu @ rot.T
        cov = rot @ cov @ rot.T if self.use_covariance else None
        probs = expected_attention(ctx.keys[layer][:, sinks:], mu, cov, ctx.scale).mean(dim=1)
        if self.use_vnorm:
            probs = (probs + self.epsilon) * ctx.values[layer][:, sinks:].float().norm(dim=-1)
        return probs
