"""The one module that touches transformers internals (tested against transformers 5.24).

Two seams, no edits or monkeypatches of modeling code:

* a :class:`transformers.cache_utils.Cache` subclass whose layers hand the new keys/values of each
  forward pass to the engine's :class:`Session` (which owns the real storage);
* an attention function registered with ``AttentionInterface`` under the name ``"atskv"``. It
  receives the query ``(B, H_q, q, d)`` of every layer and delegates to the session, which
  computes prefill attention exactly and lets the method choose what decode attention reads.
  No attention-mask function is registered for that name, so transformers builds no mask: the
  session applies causality itself and positions are always passed explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

ATTN_NAME = "atskv"


class Session(Protocol):
    """What the engine provides to the seam for one forward pass."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor: ...

    def seen_tokens(self) -> int: ...


_ACTIVE: list[Session] = []


def _attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
               scaling: float | None = None, dropout: float = 0.0, **_: Any):
    if not _ACTIVE:
        raise RuntimeError("the 'atskv' attention runs only inside Engine.generate")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _ACTIVE[-1].attention(module.layer_idx, query, key, value, scale)  # (B, H_q, q, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _attention)


class _Layer(CacheLayerMixin):
    """Forwards ``update`` to the session; stores nothing itself."""

    is_compileable = False

    def __init__(self, cache: SessionCache, idx: int):
        super().__init__()
        self._cache = cache
        self._idx = idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        return self._cache.session.update(self._idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._cache.session.seen_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class SessionCache(Cache):
    def __init__(self, session: Session, n_layers: int):
        self.session = session
        super().__init__(layers=[_Layer(self, i) for i in range(n_layers)])


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_dims(model: Any) -> dict[str, int]:
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "max_positions": cfg.max_position_embeddings,
    }


@contextlib.contextmanager
def use_engine_attention(model: Any) -> Iterator[None]:
    """Switch the model to the engine's attention for the duration (restored afterwards)."""
    previous = text_config(model)._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def forward(model: Any, session: Session, ids: Tensor, positions: Tensor) -> Tensor:
    """Run the model on ``ids`` ``(1, t)`` at explicit ``positions`` ``(1, t)`` with the
    session's cache; returns the logits of the last position ``(vocab,)``."""
    cache = SessionCache(session, model_dims(model)["n_layers"])
    _ACTIVE.append(session)
    try:
        out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
    finally:
        _ACTIVE.pop()
    return out.logits[0, -1]


@torch.inference_mode()
def reference_greedy(model: Any, ids: Tensor, max_new_tokens: int) -> tuple[list[int], list[Tensor]]:
    """Plain transformers greedy decoding with its own DynamicCache: the oracle the full-cache
    engine is tested against. Returns tokens and per-step logits."""
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [lg[0] for lg in out.logits]
