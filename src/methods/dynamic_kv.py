"""DynamicKV (arXiv 2412.14838): task-adaptive per-layer budgets under a fixed total.

``C = prompt_budget()`` is the average prompt capacity per layer (window included), ``base = C -
w``. The engine hands every layer's keys at once, so the paper's layer-by-layer prefill is
replayed here in layer order: layer ``l`` scores its prompt with SnapKV (window ``w``, max pooling,
GQA sum) and keeps per head its ``B_max = min(r_max * base, L - w)`` best tokens in score order.
Every ``m`` layers and at the last one, the layers seen so far are re-budgeted: a global top
``base * H * n_seen`` over their stored scores gives ``c_j`` winners in layer ``j``;
``budget_j = B_max * c_j / sum(c)``, rescaled so the budgets sum to ``base * N`` (N = all
layers, also at the intermediate steps, as the spec reads; the last layer absorbs rounding), and each layer is cut to its ``min(budget_j, L - w)`` best tokens (plus the
window). Layers with spread-out attention win more of the total. Generated tokens are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atskv.methods.base import METHODS, Method, PrefillContext
from atskv.methods.scoring import fit_total, window_scores
from atskv.types import ConfigError


@METHODS.register("dynamic_kv")
@dataclass
class DynamicKV(Method):
    window: int = 8
    r_max: int = 10
    kernel: int = 7
    pooling: str = "max"
    interval: int = 4

    name = "dynamic_kv"
    paper = "https://arxiv.org/abs/2412.14838"

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.window, self.r_max, self.kernel, self.interval) < 1:
            raise ConfigError("method.window, r_max, kernel and interval must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"method.pooling={self.pooling!r}; choose max or avg")
        self.observation_window = self.window

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        cap, n, n_layers = self.prompt_budget(), ctx.prompt_len, ctx.n_layers
        if cap >= n:
            return None
        w = min(self.window, cap)
        base = cap - w
        b_max = min(self.r_max * base, n - w)
        vals: list[Tensor] = []  # per layer (H, kept) scores, best first
        order: list[Tensor] = []  # the matching token indices
        self.budgets: list[int] = []
        for layer in range(n_layers):
            s = window_scores(ctx.queries[layer], ctx.keys[layer], ctx.scale, w, self.kernel,
                              self.pooling)
            top = torch.topk(s.float(), b_max, dim=-1)
            vals.append(top.values)
            order.append(top.indices)
            if layer % self.interval == self.interval - 1 or layer == n_layers - 1:
                self.budgets = self._redistribute(vals, base, b_max, n_layers, n - w)
                vals = [v[:, :b] for v, b in zip(vals, self.budgets)]
                order = [o[:, :b] for o, b in zip(order, self.budgets)]
        tail = torch.arange(n - w, n, device=ctx.keys[0].device)
        return [[torch.cat([o[h].sort().values, tail]) for h in range(o.shape[0])] for o in order]

    @staticmethod
    def _redistribute(vals: list[Tensor], base: int, b_max: int, n_layers: int,
                      limit: int) -> list[int]:
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
