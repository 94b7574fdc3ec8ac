"""Needle recall: how much of a synthetic sample's answer survived compression."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def needle_recall(kept: Sequence[Sequence[Tensor]], spans: Sequence[Sequence[int]]) -> float:
    """The fraction of the needles' tokens (``spans``: ``[start, end)`` token ranges of the
    prompt) that each layer and KV head kept (``kept[layer][head]``: kept prompt-token indices),
    averaged over layers and heads; 1.0 for a cache that keeps everything."""
    tokens = torch.cat([torch.arange(s, e) for s, e in spans if e > s])
    if not tokens.numel():
        raise ValueError("needle_recall needs at least one non-empty span")
    fractions = [torch.isin(tokens, idx.cpu()).float().mean().item() for layer in kept for idx in layer]
    return sum(fractions) / len(fractions)
