"""The method interface every KV-cache strategy implements, and the registry.

A method is a dataclass whose fields are its hyperparameters (typed, with the paper's defaults).
The shared ``budget`` (fraction of the full KV cache a method may keep, 0 < budget <= 1) is a
field of every method; each method translates it into its native knobs. The engine calls, per
generation:

1. :meth:`Method.begin` with the prompt length and generation length;
2. :meth:`Method.select` once after prefill: which prompt tokens each layer/KV head keeps;
3. :meth:`Method.headroom` to size each head's decode buffer;
4. per decode step and layer, :meth:`Method.before_append` (evict to make room) and
   :meth:`Method.attend` (attention of the new query over the kept tokens; sparse methods choose a
   subset here and report the bytes they read).

No runner code knows which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.kvcache import PackedKV
from atskv.registry import Registry
from atskv.types import ConfigError


@dataclass
class PrefillContext:
    """Everything a method may look at when compressing after prefill (batch size 1).

    keys, values: per layer ``(H_kv, L, d)``, keys after RoPE.
    queries: per layer ``(H_q, w, d)``, the last ``w`` prompt queries after RoPE
        (``w = Method.observation_window``; empty when 0).
    """

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]
    prompt_len: int
    max_new_tokens: int
    scale: float

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.queries[0].shape[0] // self.n_kv_heads if self.queries else 1


@dataclass
class AttendResult:
    out: Tensor  # (H_kv, g, d)
    read_bytes: int  # KV bytes this step read for this layer (selection metadata included)


@dataclass
class Method:
    """Base class: the full cache. Subclasses override the phases they act in."""

    budget: float = 1.0

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    #: prompt queries per layer kept for scoring after prefill
    observation_window: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.budget) <= 1.0:
            raise ConfigError(f"budget={self.budget} is outside (0, 1]")

    # -- per generation -------------------------------------------------------------------
    def begin(self, prompt_len: int, max_new_tokens: int) -> None:
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens

    def capacity_tokens(self) -> int:
        """Tokens per layer and KV head the shared budget allows at the peak of a generation:
        ``budget`` times what a full cache holds (prompt plus generated tokens)."""
        total = self.prompt_len + self.max_new_tokens
        return max(1, min(total, round(self.budget * total)))

    def prompt_budget(self) -> int:
        """Prompt tokens to keep per KV head when every generated token is kept too, so that the
        peak stays within :meth:`capacity_tokens`."""
        return max(1, min(self.prompt_len, self.capacity_tokens() - self.max_new_tokens))

    # -- after prefill --------------------------------------------------------------------
    def select(self, ctx: PrefillContext) -> list[list[Tensor]] | None:
        """Per layer, per KV head, the sorted prompt-token indices to keep (None: keep all)."""
        return None

    def headroom(self, layer: int, kept: list[int]) -> list[int]:
        """Rows to reserve per KV head for decoded tokens (default: all of them)."""
        return [self.max_new_tokens] * len(kept)

    def make_store(self, layer: int, keys: Tensor, values: Tensor, keep: list[Tensor],
                   headroom: list[int]) -> PackedKV:
        """Build the layer's decode storage from the prefill tensors ``(H_kv, L, d)``."""
        return PackedKV.from_selection(keys, values, keep, headroom)

    # -- each decode step -----------------------------------------------------------------
    def before_append(self, layer: int, store: PackedKV) -> None:
        """Evict tokens so that one more fits in every head (default: nothing)."""

    def attend(self, layer: int, store: PackedKV, q: Tensor, scale: float) -> AttendResult:
        """Attention of one query step ``q`` ``(H_kv, g, d)`` over the stored tokens."""
        return AttendResult(dense_attention(store, q, scale), store.total_tokens() * store.token_bytes())


def dense_attention(store: PackedKV, q: Tensor, scale: float) -> Tensor:
    """Exact attention of ``q`` ``(H_kv, g, d)`` over every stored token; ``(H_kv, g, d)``."""
    dense = store.dense()
    if dense is not None:
        k, v = dense
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    outs = []
    for h in range(store.n_heads):
        k, v = store.head(h)
        outs.append(F.scaled_dot_product_attention(q[h : h + 1], k[None], v[None], scale=scale))
    return torch.cat(outs, dim=0)


METHODS: Registry[type[Method]] = Registry("method")
