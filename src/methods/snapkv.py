"""SnapKV (arXiv 2404.14469): keep the prompt tokens the last prompt queries attend to.

After prefill, per layer: attention of the last ``window`` prompt queries over the prompt,
summed over the window and over each GQA group, max-pooled along the sequence (``kernel``); per
KV head keep the top ``keep - window`` tokens plus the window, in position order, where ``keep``
is the prompt budget (``budget`` x prompt length, or ``kv_size``). Generated tokens are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from atskv.core.method import METHODS, State
from atskv.methods.scoring import ScoredSelection


@METHODS.register("snapkv")
@dataclass(frozen=True)
class SnapKV(ScoredSelection[State]):
    """SnapKV as :class:`ScoredSelection` defines it: its window, kernel, pooling and search
    space are SnapKV's own."""

    paper = "https://arxiv.org/abs/2404.14469"
