"""The method interface every KV-cache strategy implements, and the registry.

A method is a frozen dataclass of hyperparameters (typed, with the paper's defaults): settings
only. Everything a method keeps during one generation lives in the :class:`State` that
:meth:`Method.begin` returns and that every hook receives; the state owns every tensor the method
keeps (its per-layer stores included), so the bytes a method stores are counted from it.

The shared budget is a fraction of the **prompt's** KV cache (the field's definition: kvpress's
``compression_ratio = 1 - budget``; the papers' "KV size" divided by the prompt length):
``budget`` or, alternatively, ``kv_size`` (prompt tokens per layer and KV head, the LongBench
papers' parameter). :meth:`Method.prompt_keep` turns either into prompt tokens kept per layer and
KV head on average; every method translates that into its own knobs. Generated tokens come on
top, as each paper treats them: methods that evict while decoding (``evicts_while_decoding``)
stay at their compressed size, the others append every generated token.

The engine calls, per generation:

1. :meth:`Method.begin` with the prompt length and generation length -> a :class:`State`;
2. :meth:`Method.select` once after prefill: which prompt tokens each layer/KV head keeps;
3. :meth:`Method.make_store` per layer: the decode storage (headroom for generated tokens);
4. per decode step and layer, :meth:`Method.decode_layer`: :meth:`Method.before_append` (evict
   to make room), the store's ``append`` of the new token, then :meth:`Method.attend` (attention
   of the new query over the kept tokens; sparse methods choose a subset here and report the
   bytes they read). A method may do all three in one kernel (atskv on the CPU).

In the question-agnostic protocol the method compresses the context alone (its
:class:`PrefillContext` says so: ``question_follows``); the question's tokens
then go on top of the compressed cache, uncompressed, through :meth:`Method.extend_layer` (the
append, then exact attention), before decoding starts.

Capabilities the runner or the tests need are declared once on the class (``compresses``,
``evicts_while_decoding``, ``sparse_reads``, ``uses_tokenizer``) or answered by a method of the settings
(:meth:`Method.queries_needed`, :meth:`Method.static_decode`); nothing is probed with getattr.
No runner code knows which method it runs: a new method is one module in this package with a
``@METHODS.register("name")`` class, discovered on import.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from torch import Tensor

from atskv.core.registry import Registry
from atskv.core.stores import StaticKV, StaticPagedKV, Store, tensor_bytes
from atskv.core.types import ConfigError
from atskv.metrics.timing import synchronize


@dataclass
class PrefillContext:
    """Everything a method may look at when compressing after prefill (batch size 1).

    keys, values: per layer ``(H_kv, L, d)``, keys after RoPE.
    queries: per layer ``(H_q, w, d)``, the last ``w`` prompt queries after RoPE, ``w`` at least
        :meth:`Method.queries_needed` (a shared prefill may hold more: slice the last ones); they
        sit at positions ``L - w .. L - 1``.
    rope_inv_freq, rope_scaling: the model's rotary embedding (inverse frequencies ``(d / 2,)``
        and the factor on cos/sin; Llama layout ``x cos + rotate_half(x) sin``), for methods that
        undo or predict the rotation; None for a model without RoPE (or a hand-built context).
    """

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]
    prompt_len: int
    max_new_tokens: int
    scale: float
    rope_inv_freq: Tensor | None = None
    rope_scaling: float = 1.0
    #: per layer ``(H_kv, L)`` float32: what the :class:`Reconstruction` passes the method asked
    #: for measured for each prompt token (0 where no pass scored it); None without passes
    reconstruction: list[Tensor] | None = None
    #: the caller appends tokens after this compression that the method does not see (a
    #: question, in the question-agnostic protocol): the prompt's end is the context's, not a
    #: question
    question_follows: bool = False
    #: results of :meth:`shared` computations over the same prefill (and layers), with their
    #: seconds; None: nothing is shared
    memo: dict[Any, tuple[Any, float]] | None = field(default=None, repr=False)
    #: seconds of reused :meth:`shared` results, charged to this compression
    charged: float = 0.0

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per prefill for every compression that asks with the
        same ``key`` (a score that depends on the prefill and the method's settings but not on
        the budget: the other budgets of a sweep group reuse it). The key must name everything
        the result depends on besides the prefill. A reuse is charged the seconds the
        computation took (:attr:`charged`), so every compression's time includes it."""
        if self.memo is None:
            return compute()
        if key in self.memo:
            value, seconds = self.memo[key]
            self.charged += seconds
            return value
        synchronize(self.keys[0].device)
        t0 = time.perf_counter()
        value = compute()
        synchronize(self.keys[0].device)
        self.memo[key] = (value, time.perf_counter() - t0)
        return value

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.queries[0].shape[0] // self.n_kv_heads if self.queries[0].numel() else 1


@dataclass(frozen=True)
class Reconstruction:
    """One extra forward pass after prefill (KVzip's context reconstruction), asked for by
    :meth:`Method.reconstruction`: ``ids`` are fed at the positions after the prompt, attending to
    the whole prompt's cache and causally to themselves (the cache is not changed). Each prompt
    token in ``[start, end)`` is scored with the largest attention probability that any query
    head of any fed token pays it, the softmax taken over the keys ``[0, sink)``, ``[start,
    end)`` and the fed tokens (KVzip's), the maximum over the GQA group."""

    ids: tuple[int, ...]
    start: int
    end: int
    sink: int = 0


@dataclass
class AttendResult:
    out: Tensor  # (H_kv, g, d)
    read_bytes: int  # KV bytes this step read for this layer (selection metadata included)


@dataclass
class State:
    """One generation's state: what a method keeps between its hooks.

    ``stores`` (one per layer, built by :meth:`Method.make_store`) hold the kept keys/values and
    whatever per-token or per-page metadata the store maintains. Subclasses add the method's own
    per-generation fields; tensors among them are listed by :meth:`own_tensors`, so that
    :meth:`nbytes` counts every byte the method keeps (a generic test walks every tensor reachable
    from the state and checks the sum).
    """

    prompt_len: int
    max_new_tokens: int
    keep: int  # prompt tokens per layer and KV head the budget allows (average)
    stores: list[Store] = field(default_factory=list)
    #: model layer -> the store of a sliding-window layer, which keeps exactly its window: built
    #: and driven by the engine, never seen by the method (``stores`` are the other layers')
    windows: dict[int, Store] = field(default_factory=dict)

    def own_tensors(self) -> Iterator[Tensor]:
        """The method's own tensors besides the stores (override in subclasses)."""
        return iter(())

    def tensors(self) -> Iterator[Tensor]:
        for store in (*self.stores, *self.windows.values()):
            yield from store.tensors()
        yield from self.own_tensors()

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the state holds: K/V, page summaries, scores, index tensors."""
        return tensor_bytes(*self.tensors())

    def spare_bytes(self) -> int:
        """Bytes of the method's own tensors reserved for generated tokens that were never made
        (e.g. page bounds of headroom pages; override in subclasses, like :meth:`own_tensors`)."""
        return 0

    def nbytes(self) -> int:
        """The stored KV footprint: :meth:`allocated_bytes` less the rows (and their page
        metadata) reserved for generated tokens that were never made (decoding stopped early, or
        not there yet)."""
        stores = (*self.stores, *self.windows.values())
        return self.allocated_bytes() - sum(s.spare_bytes() for s in stores) - self.spare_bytes()


S = TypeVar("S", bound=State)


@dataclass(frozen=True)
class Method(Generic[S]):
    """Base class: the full cache. Subclasses override the phases they act in; a method is
    generic over its own :class:`State` type (``class H2O(Method[H2OState])``), which every
    hook receives as that type."""

    budget: float | None = None  # fraction of the prompt's KV cache kept (None: all of it)
    kv_size: int | None = None  # alternatively: prompt tokens kept per layer and KV head

    #: the registered name (set by ``METHODS.register``)
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: keeps fewer prompt tokens than the full cache (False: stores everything)
    compresses: ClassVar[bool] = True
    #: evicts while decoding, so the cache stays at its compressed size
    evicts_while_decoding: ClassVar[bool] = False
    #: reads only a subset of the stored KV per decode step
    sparse_reads: ClassVar[bool] = False
    #: builds token prompts of its own with the tokenizer (:meth:`reconstruction`)
    uses_tokenizer: ClassVar[bool] = False
    #: the per-generation state class :meth:`begin` creates
    state_type: ClassVar[type[State]] = State
    #: defaults of inherited hyperparameters that differ from the parent class's (e.g.
    #: ``{"window": 8}``): applied to the inherited dataclass fields when the class is made, so
    #: that each field is declared once, on the class that introduces it
    defaults: ClassVar[dict[str, Any]] = {}
    #: hyperparameter field -> hydra-optuna-sweeper distribution (``"choice(8, 16)"``,
    #: ``"interval(0.1, 0.9)"``) that ``python -m atskv.experiments.tune`` searches on the dev split
    search_space: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("defaults")
        if not own:
            return
        inherited = {f.name: f for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                     for f in reversed(dataclasses.fields(base))}
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in own.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}.defaults names {name!r}, which no parent "
                                f"class declares; declare a new field as a field")
            # the parent's field, declared again with this default (the dataclass decorator,
            # which runs next, keeps it in the parent's position)
            annotations[name] = inherited[name].type
            setattr(cls, name, value)
        cls.__annotations__ = annotations

    def __post_init__(self) -> None:
        if self.budget is not None and self.kv_size is not None:
            raise ConfigError(f"budget={self.budget} and kv_size={self.kv_size} are both set; "
                              f"give one (budget: fraction of the prompt's KV cache kept; "
                              f"kv_size: prompt tokens kept per layer and KV head)")
        if self.budget is not None and not 0.0 < float(self.budget) <= 1.0:
            raise ConfigError(f"budget={self.budget} is outside (0, 1]: the fraction of the "
                              f"prompt's KV cache a method keeps, e.g. budget=0.2")
        if self.kv_size is not None and int(self.kv_size) < 1:
            raise ConfigError(f"kv_size={self.kv_size} must be >= 1 (prompt tokens kept per layer "
                              f"and KV head, e.g. kv_size=512)")

    def check(self, name: str, value: Any, ok: bool, rule: str) -> None:
        """Raise a :class:`ConfigError` naming ``method.<name>=<value>`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"method.{name}={value!r} {rule}")

    # -- capabilities -----------------------------------------------------------------------
    def queries_needed(self) -> int:
        """How many of the last prompt queries (per layer) :meth:`select` scores with."""
        return 0

    def static_decode(self) -> bool:
        """Whether the decode step is static: fixed shapes, state in device tensors updated in
        place, no host synchronisation, no data-dependent Python control flow, so that it can be
        compiled (``torch.compile``, ``fullgraph=True``) or captured in a CUDA graph. True for
        the default store (:class:`StaticKV`) and hooks."""
        return True

    def plain_decode(self, state: S) -> bool:
        """Whether every decode layer of this generation is its store's append, without page
        summaries, then the store's exact attention over every row (what :meth:`decode_layer`
        does by default), so that a batch's rows with such layers may run them together, in one
        native call per layer (:func:`atskv.core.stores.decode_rows`). True when the class keeps
        the default hooks and its stores keep no page summaries."""
        cls = type(self)
        return (cls.decode_layer is Method.decode_layer
                and cls.before_append is Method.before_append and cls.attend is Method.attend
                and all(getattr(s, "summary", None) is None for s in state.stores))

    def reconstruction(self, prompt: Sequence[int], tokenizer: Any,
                       question_follows: bool = False) -> list[Reconstruction]:
        """Forward passes the engine runs after prefill, before :meth:`select`, whose scores
        reach it as ``PrefillContext.reconstruction`` (default: none). ``tokenizer`` may be None
        (tests without one); ``question_follows`` is the :class:`PrefillContext`'s."""
        return []

    # -- per generation ---------------------------------------------------------------------
    def prompt_keep(self, prompt_len: int) -> int:
        """Prompt tokens to keep per layer and KV head on average: ``kv_size``, or ``budget`` x
        the prompt length, between 1 and the prompt length. Never depends on the generation
        length."""
        if self.kv_size is not None:
            n = int(self.kv_size)
        else:
            n = round((1.0 if self.budget is None else float(self.budget)) * prompt_len)
        return max(1, min(prompt_len, n))

    def prompt_target(self, prompt_len: int) -> int:
        """Prompt tokens per layer and KV head the method aims to keep: :meth:`prompt_keep`, less
        what a method pays out of the budget for its own metadata (e.g. page summaries)."""
        return self.prompt_keep(prompt_len)

    def begin(self, prompt_len: int, max_new_tokens: int) -> S:
        return self.state_type(prompt_len, max_new_tokens, self.prompt_keep(prompt_len))  # type: ignore[return-value]

    # -- after prefill ----------------------------------------------------------------------
    def select(self, state: S, ctx: PrefillContext) -> list[list[Tensor]] | None:
        """Per layer, per KV head, the sorted prompt-token indices to keep (None: keep all)."""
        return None

    def make_store(self, state: S, layer: int, keys: Tensor, values: Tensor,
                   keep: list[Tensor]) -> Store:
        """The layer's decode storage from the prefill tensors ``(H_kv, L, d)`` (a copy of the
        kept tokens; the prefill tensors are never modified). Default: a static store where every
        generated token is appended, so each head gets a row for each generated token that is fed
        back (all but the last). Heads keeping different numbers of tokens are packed without
        padding (:class:`StaticPagedKV` with pages of one token)."""
        if len({int(k.numel()) for k in keep}) == 1:
            return StaticKV(keys, values, keep, headroom(state))
        return StaticPagedKV(keys, values, keep, [headroom(state)] * len(keep), page=1,
                             bounds=False)

    # -- each decode step -------------------------------------------------------------------
    def before_append(self, state: S, layer: int, store: Any) -> None:
        """Evict tokens so that one more fits in every head (default: nothing)."""

    def decode_layer(self, state: S, layer: int, store: Any, q: Tensor, k: Tensor, v: Tensor,
                     scale: float) -> AttendResult:
        """One layer of a decode step: the new token's key and value ``(H_kv, d)`` into the store
        (after :meth:`before_append`), then :meth:`attend` of the query ``q`` ``(H_kv, g, d)``."""
        self.before_append(state, layer, store)
        store.append(k, v)
        return self.attend(state, layer, store, q, scale)

    def extend_layer(self, state: S, layer: int, store: Any, q: Tensor, k: Tensor, v: Tensor,
                     scale: float) -> AttendResult:
        """One token of a chunk appended on top of the compressed cache (the question, in the
        question-agnostic protocol): into the store (after :meth:`before_append`, so a method
        that evicts keeps its size), then the store's exact attention over everything it holds.
        Decode-time selection (sparse reads) does not apply: the question is prefilled exactly,
        as kvpress's evaluation does."""
        self.before_append(state, layer, store)
        store.append(k, v)
        return AttendResult(*store.attend(q, scale))

    def truncate_layer(self, state: S, layer: int, store: Any, drop: list[int]) -> None:
        """Forget each KV head's last ``drop[h]`` stored tokens (a question compressed with the
        context, removed before the next question; see the question-aware protocol)."""
        store.truncate(drop)

    def attend(self, state: S, layer: int, store: Any, q: Tensor, scale: float) -> AttendResult:
        """Attention of one query step ``q`` ``(H_kv, g, d)`` over every stored token (the
        store's own exact attention)."""
        return AttendResult(*store.attend(q, scale))


def headroom(state: State) -> int:
    """Rows a head needs for the generated tokens fed back to the model: every one but the last
    (the last token is sampled, never attended to)."""
    return max(0, state.max_new_tokens - 1)


METHODS: Registry[type[Method]] = Registry("method", set_name=True)
