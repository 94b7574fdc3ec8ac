"""SnapKV (arXiv 2404.14469): keep the prompt tokens the last prompt queries attend to.

After prefill, per layer: attention of the last ``window`` prompt queries over the prompt,
summed over the window and over each GQA group, max-pooled along the sequence (``kernel``); per
KV head keep the top ``prompt_budget() - window`` tokens plus the window, in position order.
Generated tokens are all kept, so the peak cache is ``budget`` x full's (``capacity_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from atskv.methods.base import METHODS, Method, PrefillContext
from atskv.methods.scoring import snap_keep
from atskv.types import ConfigError


@METHODS.register("snapkv")
@dataclass
class SnapKV(Method):
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    name = "snapkv"
    paper = "https://arxiv.org/abs/2404.14469"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1:
            raise ConfigError(f"method.window={self.window} and method.kernel={self.kernel} "
                              f"must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"method.pooling={self.pooling!r}; choose max or avg")
        self.observation_window = self.window

    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        keep = self.prompt_budget()
        if keep >= ctx.prompt_len:
            return None
        return [snap_keep(ctx.queries[i], ctx.keys[i], ctx.scale, self.window, keep,
                          self.kernel, self.pooling) for i in range(ctx.n_layers)]
