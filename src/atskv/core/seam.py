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
import time
from collections.abc import Callable, Iterator
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


def rotary(model: Any) -> tuple[Tensor, float] | None:
    """The model's rotary position embedding as ``(inv_freq, attention_scaling)``: the inverse
    frequencies ``(d / 2,)`` (float32; the current ones, for RoPE types that update them with the
    sequence length) and the factor on cos/sin, read off the decoder's ``rotary_emb`` (Llama
    layout: ``q * cos + rotate_half(q) * sin``, halves paired). None when the model has none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rope = getattr(decoder, "rotary_emb", None)
    inv_freq = getattr(rope, "inv_freq", None)
    if not isinstance(inv_freq, Tensor):
        return None
    return inv_freq.float(), float(getattr(rope, "attention_scaling", 1.0))


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the model's generation config's."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    ids = {eos} if isinstance(eos, int) else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else ({extra} if isinstance(extra, int) else set())
    return ids


def attn_implementation(model: Any) -> str | None:
    """The attention implementation the model uses outside the engine (e.g. ``sdpa``)."""
    return getattr(text_config(model), "_attn_implementation", None)


@contextlib.contextmanager
def use_engine_attention(model: Any) -> Iterator[None]:
    """Switch the model to the engine's attention for the duration (restored afterwards)."""
    previous = text_config(model)._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def active(session: Session) -> Iterator[None]:
    """Route the ``atskv`` attention of the forward passes inside to ``session``."""
    _ACTIVE.append(session)
    try:
        yield
    finally:
        _ACTIVE.pop()


def make_cache(model: Any, session: Session) -> SessionCache:
    return SessionCache(session, model_dims(model)["n_layers"])


def step_logits(model: Any, cache: SessionCache, ids: Tensor, positions: Tensor) -> Tensor:
    """The model on ``ids`` ``(1, t)`` at explicit ``positions`` ``(1, t)`` with ``cache``; the
    logits of the last position ``(vocab,)``. This is the function a static decode step compiles
    (no host sync and no data-dependent Python in it: transformers builds no mask for the
    ``atskv`` attention, and positions are explicit)."""
    head = _plain_head(model) if torch.compiler.is_compiling() else None
    if head is None or head.weight.device.type != "cpu":
        out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        return out.logits[0, -1]
    hidden = model.get_decoder()(input_ids=ids, position_ids=positions, cache=cache,
                                 use_cache=True).last_hidden_state[0, -1]
    # the head as a multiply-and-sum, which the compiler fuses into one loop that streams the
    # (vocab x hidden) weight at close to the read bandwidth; its GEMV kernel reaches under half
    # of it on CPU, and the head is a fifth of a small model's weights
    logits = (head.weight * hidden.to(head.weight.dtype)).sum(-1)
    return logits if head.bias is None else logits + head.bias


def _plain_head(model: Any) -> torch.nn.Linear | None:
    """The output projection of a causal LM whose logits are exactly ``lm_head(final hidden
    state)`` (no logit scaling or soft-capping in its config), else None."""
    cfg = text_config(model)
    if (not type(model).__name__.endswith("ForCausalLM") or not hasattr(model, "get_decoder")
            or any(getattr(cfg, a, None) is not None for a in
                   ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))):
        return None
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


@torch.inference_mode()
def forward(model: Any, session: Session, ids: Tensor, positions: Tensor) -> Tensor:
    """Run the model on ``ids`` ``(1, t)`` at explicit ``positions`` ``(1, t)`` with the
    session's cache; returns the logits of the last position ``(vocab,)``."""
    with active(session):
        return step_logits(model, make_cache(model, session), ids, positions)


class _StepClock:
    """A LogitsProcessor that stamps when each step's logits arrive (``sync`` first)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.stamps: list[float] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores


@torch.inference_mode()
def timed_generate(model: Any, ids: Tensor, new_tokens: int,
                   sync: Callable[[], None]) -> tuple[int, list[float], float]:
    """Transformers' own ``generate()`` (greedy, its DynamicCache and default attention,
    ``min_new_tokens = max_new_tokens`` so it never stops early), the reference our decode loop
    is compared with. Returns the tokens generated, the time each step's logits arrived (a
    LogitsProcessor stamps them after ``sync()``), and the start time."""
    from transformers import GenerationConfig, LogitsProcessorList

    gen = model.generation_config
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=gen.eos_token_id,
                           pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else 0)
    clock = _StepClock(sync)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                         logits_processor=LogitsProcessorList([clock]))
    return out.shape[1] - ids.shape[1], clock.stamps, t0


@torch.inference_mode()
def reference_greedy(model: Any, ids: Tensor, max_new_tokens: int) -> tuple[list[int], list[Tensor]]:
    """Plain transformers greedy decoding with its own DynamicCache: the oracle the full-cache
    engine is tested against. Returns tokens and per-step logits."""
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [lg[0] for lg in out.logits]
