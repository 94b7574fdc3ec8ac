"""PyramidKV (arXiv 2406.02069): SnapKV scoring with budgets shrinking linearly with depth.

With the average prompt capacity ``B`` per layer (the prompt budget, window included), layer
``l`` keeps ``max - l * (max - min) // (N - 1)`` tokens beyond the window, ``min = (B - w) //
beta``, ``max = 2 (B - w) - min``; the integer budgets are then adjusted (last layer first) so
that their average is exactly ``B - w``, i.e. the same total as uniform SnapKV. When the prompt is
too short for the lowest layer's share (``max > L - w``), every layer gets ``B - w`` (uniform).
Scores: window attention summed over the window and GQA group, max pooling (kernel 7, as in the
authors' LongBench runs). Generated tokens are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from atskv.core.method import METHODS, PrefillContext, State
from atskv.methods.scoring import SCORING_SPACE, ScoredSelection, pyramid_budgets


@METHODS.register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(ScoredSelection[State]):
    beta: int = 20

    defaults = {"window": 8}
    paper = "https://arxiv.org/abs/2406.02069"
    # SnapKV's knobs plus beta, the steepness of the pyramid PyramidKV varies
    search_space = {**SCORING_SPACE, "beta": "choice(5, 10, 20, 40)"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("beta", self.beta, self.beta >= 1, "must be >= 1")

    def budgets(self, state: State, ctx: PrefillContext, scores: list[Tensor],
                per_layer: int) -> list[int | list[int]]:
        limit = scores[0].shape[1]  # tokens before the window
        return list(pyramid_budgets(per_layer, ctx.n_layers, self.beta, limit))
