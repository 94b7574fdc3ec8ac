"""AdaKV (Feng et al., arXiv 2407.11550, NeurIPS 2025): SnapKV's scores with one budget per layer
spread over its KV heads.

SnapKV scores every prompt token outside the observation window (the last ``window`` queries'
attention, summed over the window and the GQA group, max-pooled with ``kernel``). Instead of
every head keeping the same top ``keep - window``, the layer's heads share ``H_kv x (keep -
window)`` tokens: the layer's best scores, all heads pooled, decide how many each head keeps
(a head whose attention is concentrated on a few tokens needs few, a diffuse one many), blended
with the uniform split so that every head keeps at least ``floor_alpha`` of it (the authors'
safeguard; :func:`atskv.methods.scoring.adaptive_head_budgets`). Each head then keeps its own top
tokens plus the window. Heads of a layer keep different numbers of tokens, stored packed without
padding, so the budget frees real memory (kvpress's AdaKVPress masks the evicted ones instead).
The layer's total is exactly the uniform one: budgets move between the heads of a layer, never
between layers. Generated tokens are all kept. Fidelity notes: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from atskv.core.method import METHODS, PrefillContext, State
from atskv.methods.scoring import ScoredSelection, adaptive_head_budgets, scoring_space


@METHODS.register("adakv")
@dataclass(frozen=True)
class AdaKV(ScoredSelection[State]):
    """AdaKV on SnapKV's scores: window 32, kernel 7, max pooling (the authors' settings, also
    :class:`ScoredSelection`'s defaults) and ``floor_alpha`` 0.2 (their setting for GQA models)."""

    floor_alpha: float = 0.2

    paper = "https://arxiv.org/abs/2407.11550"
    # SnapKV's window and pooling kernel, and the safeguard AdaKV adds (1.0 would be SnapKV)
    search_space = {**scoring_space("window", "kernel"), "floor_alpha": "interval(0.0, 0.8)"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("floor_alpha", self.floor_alpha, 0.0 <= self.floor_alpha <= 1.0,
                   "must be in [0, 1] (the share of each head's uniform budget it always keeps)")

    def budgets(self, state: State, ctx: PrefillContext, scores: list[Tensor],
                per_layer: int) -> list[int | list[int]]:
        return [adaptive_head_budgets(s, per_layer, self.floor_alpha) for s in scores]
