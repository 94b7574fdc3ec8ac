"""DynamicKV (arXiv 2412.14838): task-adaptive per-layer budgets under a fixed total.

``C`` is the average prompt capacity per layer (the prompt budget, window included), ``base = C -
w``. The engine hands every layer's keys at once, so the paper's layer-by-layer prefill is
replayed here in layer order: layer ``l`` scores its prompt with SnapKV (window ``w``, max pooling,
GQA sum) and keeps per head its ``B_max = min(r_max * base, L - w)`` best tokens in score order.
Every ``m`` layers and at the last one, the layers seen so far are re-budgeted: a global top
``base * H * n_seen`` over their stored scores gives ``c_j`` winners in layer ``j``;
``budget_j = B_max * c_j / sum(c)``, rescaled so the budgets sum to ``base * N`` (N = all
layers, also at the intermediate steps, as the spec reads; the last layer absorbs rounding), and
each layer is cut to its ``min(budget_j, L - w)`` best tokens (plus the window). Layers with
spread-out attention win more of the total. Generated tokens are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from atskv.core.method import METHODS, PrefillContext, State
from atskv.methods.scoring import ScoredSelection, fit_total, scoring_space


@dataclass
class DynamicKVState(State):
    budgets: list[int] = field(default_factory=list)  # final tokens beyond the window per layer


@METHODS.register("dynamic_kv")
@dataclass(frozen=True)
class DynamicKV(ScoredSelection[DynamicKVState]):
    r_max: int = 10
    interval: int = 4

    defaults = {"window": 8}
    paper = "https://arxiv.org/abs/2412.14838"
    # DynamicKV varies r_max and the redistribution interval; + window, kernel (pooling stays max)
    search_space = {**scoring_space("window", "kernel"), "r_max": "choice(2, 5, 10, 20)",
                    "interval": "choice(1, 2, 4, 8)"}
    state_type = DynamicKVState

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r_max", "interval"):
            self.check(name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")

    def budgets(self, state: DynamicKVState, ctx: PrefillContext, scores: list[Tensor],
                per_layer: int) -> list[int | list[int]]:
        n_layers, limit = ctx.n_layers, scores[0].shape[1]
        b_max = min(self.r_max * per_layer, limit)
        vals: list[Tensor] = []  # per layer (H, kept) scores, best first
        budgets: list[int] = []
        for layer in range(n_layers):
            vals.append(torch.topk(scores[layer].float(), b_max, dim=-1).values)
            if layer % self.interval == self.interval - 1 or layer == n_layers - 1:
                budgets = redistribute(vals, per_layer, b_max, n_layers, limit)
                vals = [v[:, :b] for v, b in zip(vals, budgets)]
        state.budgets = budgets
        return list(budgets)


def redistribute(vals: list[Tensor], base: int, b_max: int, n_layers: int, limit: int) -> list[int]:
    """Budgets (per head, beyond the window) of the layers seen so far."""
    flat = torch.cat([v.flatten() for v in vals])
    n_top = min(base * vals[0].shape[0] * len(vals), flat.numel())
    if n_top == 0 or b_max == 0:
        return [0] * len(vals)
    owner = torch.cat([torch.full((v.numel(),), j) for j, v in enumerate(vals)])
    won = torch.bincount(owner[torch.topk(flat, n_top).indices], minlength=len(vals)).double()
    budgets = b_max * won / won.sum()
    budgets = budgets * (base * n_layers) / budgets.sum()
    return fit_total([int(b) for b in budgets.tolist()], base * n_layers, [limit] * len(vals))
