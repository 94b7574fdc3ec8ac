"""PyramidKV (arXiv 2406.02069): SnapKV scoring with budgets shrinking linearly with depth.

With the average prompt capacity ``B = prompt_budget()`` (window included), layer ``l`` keeps
``max - l * (max - min) // (N - 1)`` tokens beyond the window, ``min = (B - w) // beta``,
``max = 2 (B - w) - min``; the integer budgets are then adjusted (last layer first) so that their
average is exactly ``B - w``, i.e. the same total as uniform SnapKV. When the prompt is too
short for the lowest layer's share (``max > L - w``), every layer gets ``B - w`` (uniform).
Scores: window attention summed over the window and GQA group, max pooling (kernel 7, as in the
authors' LongBench runs). Generated tokens are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from atskv.methods.base import METHODS, Method, PrefillContext
from atskv.methods.scoring import pyramid_budgets, snap_keep
from atskv.types import ConfigError


@METHODS.register("pyramidkv")
@dataclass
class PyramidKV(Method):
    window: int = 8
    beta: int = 20
    kernel: int = 7
    pooling: str = "max"

    name = "pyramidkv"
    paper = "https://arxiv.org/abs/2406.02069"

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.window, self.beta, self.kernel) < 1:
            raise ConfigError(f"method.window={self.window}, beta={self.beta} and "
                              f"kernel={self.kernel} must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"method.pooling={self.pooling!r}; choose max or avg")
        self.observation_window = self.window

    def layer_budgets(self, n_layers: int) -> list[int]:
        """Prompt tokens each layer keeps per KV head, window included."""
        w = min(self.window, self.prompt_budget())
        extra = pyramid_budgets(self.prompt_budget() - w, n_layers, self.beta, self.prompt_len - w)
        return [e + w for e in extra]

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        if self.prompt_budget() >= ctx.prompt_len:
            return None
        return [snap_keep(ctx.queries[i], ctx.keys[i], ctx.scale, self.window, b, self.kernel,
                          self.pooling) for i, b in enumerate(self.layer_budgets(ctx.n_layers))]
