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
import functools
import time
import weakref
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

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None) -> Tensor: ...

    def seen_tokens(self) -> int: ...


class UnsupportedModel(ValueError):
    """A model whose attention the engine cannot reproduce exactly (named in the message)."""


_ACTIVE: list[Session] = []

#: keyword arguments the attention function may receive that do not change its result (masks
#: and positions are the engine's; these carry bookkeeping only)
_NEUTRAL_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions",
                             "output_hidden_states", "return_dict", "layer_idx", "cache"})


def _attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
               scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any):
    """Every argument that changes the math is honoured (``scaling``, ``sliding_window``) or
    refused (soft-capping, sinks, dropout, non-causal attention, anything unknown)."""
    if not _ACTIVE:
        raise RuntimeError("the 'atskv' attention runs only inside Engine.generate")
    name = type(module).__name__
    if softcap is not None:
        raise UnsupportedModel(f"{name} soft-caps its attention logits (softcap={softcap}): "
                               f"the engine's attention does not")
    if dropout:
        raise UnsupportedModel(f"{name} applies attention dropout ({dropout}): put the model in "
                               f"eval mode")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise UnsupportedModel(f"{name} attends bidirectionally: the engine is causal only")
    odd = sorted(k for k, v in kwargs.items()
                 if v is not None and k not in _NEUTRAL_KWARGS and k != "is_causal")
    if odd:
        raise UnsupportedModel(f"{name} passes {', '.join(odd)} to its attention function, which "
                               f"the engine's attention does not implement")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _ACTIVE[-1].attention(module.layer_idx, query, key, value, scale,
                                sliding_window)  # (B, H_q, q, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _attention)


class _Layer(CacheLayerMixin):
    """Forwards ``update`` to the session; stores nothing itself. It holds the session, not
    its :class:`SessionCache`: a reference back to the cache would be a cycle (cache -> layer ->
    cache) holding the session's KV, freed only by Python's cyclic collector, whose full
    collections are rare in a big process."""

    is_compileable = False

    def __init__(self, session: Session, idx: int):
        super().__init__()
        self._session = session
        self._idx = idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        return self._session.update(self._idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._session.seen_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class SessionCache(Cache):
    def __init__(self, session: Session, n_layers: int):
        self.session = session
        super().__init__(layers=[_Layer(session, i) for i in range(n_layers)])


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


#: the attention layer kinds the engine runs (``config.layer_types``)
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(model: Any) -> list[int | None]:
    """Per layer, the sliding window its attention keeps (a query sees itself and the ``W - 1``
    tokens before it, transformers' ``sliding_window``), or None for full causal attention.
    Hybrid models (Gemma 3, Qwen2/3 with ``use_sliding_window``) say per layer in
    ``config.layer_types``; others (Mistral, Phi-3) slide every layer when the config sets
    ``sliding_window``. The engine checks these against what each layer's attention receives."""
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def check_supported(model: Any) -> None:
    """Raise :class:`UnsupportedModel`, naming the model and what it does, for a model whose
    attention the engine would not reproduce exactly (so that it is never run wrongly or
    uncompressed in silence): encoder-decoders, bidirectional attention, layers other than
    full or sliding-window causal attention (chunked, linear, state-space), soft-capped
    attention logits, attention sinks, latent (MLA) or shared KV, keys and values of different
    widths. Multimodal checkpoints run on their text (the engine feeds token ids only)."""
    cfg, text = model.config, text_config(model)
    arch = type(model).__name__

    def refuse(what: str) -> None:
        raise UnsupportedModel(f"{arch} ({getattr(text, 'model_type', '?')}) {what}; the engine "
                               f"runs decoder-only causal LMs whose layers attend over every "
                               f"earlier token or a sliding window of them")

    if getattr(cfg, "is_encoder_decoder", False):
        refuse("is an encoder-decoder model")
    if not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        refuse("attends bidirectionally")
    missing = [a for a in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                           "max_position_embeddings") if getattr(text, a, None) is None]
    if missing:
        refuse(f"has no {', '.join(missing)} in its config (no multi-head attention KV cache)")
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(LAYER_TYPES))
    if other:
        refuse(f"has {', '.join(other)} layers")
    for attr, what in (("attention_chunk_size", "attends in chunks (attention_chunk_size)"),
                       ("attn_logit_softcapping", "soft-caps its attention logits"),
                       ("kv_lora_rank", "compresses its KV into a latent (MLA)"),
                       ("num_kv_shared_layers", "shares KV between layers")):
        if getattr(text, attr, None):
            refuse(f"{what} ({attr}={getattr(text, attr)})")
    head_dim = model_dims(model)["head_dim"]
    v_dim = getattr(text, "v_head_dim", None)
    if v_dim is not None and v_dim != head_dim:
        refuse(f"has values of {v_dim} dims and keys of {head_dim}")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        refuse("has learned attention sinks")


def rotary(model: Any) -> tuple[Tensor, float] | None:
    """The model's rotary position embedding as ``(inv_freq, attention_scaling)``: the inverse
    frequencies ``(d / 2,)`` (float32; the current ones, for RoPE types that update them with the
    sequence length) and the factor on cos/sin, read off the decoder's ``rotary_emb`` (Llama
    layout: ``q * cos + rotate_half(q) * sin``, halves paired). None when the model has none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rope = getattr(decoder, "rotary_emb", None)
    # hybrid models (Gemma 3) hold one rotation per layer kind: the methods compress the
    # full-attention layers, so theirs
    for prefix in ("", "full_attention_"):
        inv_freq = getattr(rope, f"{prefix}inv_freq", None)
        if isinstance(inv_freq, Tensor):
            return inv_freq.float(), float(getattr(rope, f"{prefix}attention_scaling", 1.0))
    return None


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
    """The model on ``ids`` ``(B, t)`` at explicit ``positions`` ``(B, t)`` with ``cache``; the
    logits of each row's last position ``(B, vocab)``. This is the function a static decode step
    compiles (no host sync and no data-dependent Python in it: transformers builds no mask for
    the ``atskv`` attention, and positions are explicit)."""
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1]


@torch.inference_mode()
def forward(model: Any, session: Session, ids: Tensor, positions: Tensor) -> Tensor:
    """Run the model on ``ids`` ``(B, t)`` at explicit ``positions`` ``(B, t)`` with the
    session's cache; returns the logits of each row's last position ``(B, vocab)``."""
    with active(session):
        return step_logits(model, make_cache(model, session), ids, positions)


_ROWS_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows_forward(module: torch.nn.Linear, x: Tensor) -> Tensor:
    from atskv.core import kernels

    out = kernels.linear_rows(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def exact_linears(model: Any) -> Iterator[None]:
    """For the duration, the model's linear layers whose weights the CPU kernels take (float32
    on the CPU) run through ``atskv::linear_rows``: each row of a step (a sequence of a decode
    batch) gets the output it gets alone, and every weight is read once per step (the library
    GEMV reaches under half the read bandwidth on CPU). Other layers, and other devices, are
    left as they are."""
    from atskv.core import kernels

    swapped = [m for m in model.modules() if type(m) is torch.nn.Linear
               and "forward" not in vars(m) and kernels.usable(m.weight)]
    for m in swapped:
        # one forward per module for its lifetime: a compiled step holds it weakly, and a new
        # one each time would invalidate the step
        if m not in _ROWS_FORWARD:
            _ROWS_FORWARD[m] = functools.partial(_rows_forward, m)
        m.forward = _ROWS_FORWARD[m]
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


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
