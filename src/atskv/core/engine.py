"""The generation loop: chunked prefill, compression, greedy decoding with explicit positions,
one sequence at a time or a batch of them.

The phases, each its own method of :class:`Engine`:

* :meth:`Engine.prefill`: exact attention over the prompt; returns a :class:`Prefill` (every
  layer's uncompressed keys/values, the last prompt queries a method scores with, the logits of
  the last position and the time it took). A prefill is never modified afterwards, so several
  methods can compress the same one (a sweep's shared prefill); another prefill can continue it;
* :meth:`Engine.compress`: the method's :meth:`~atskv.methods.Method.select` and per-layer stores,
  built as copies of the kept tokens;
* :meth:`Engine.extend`: tokens appended on top of a compressed cache, uncompressed, with exact
  attention (the question part of a prompt whose context was compressed without it: the
  question-agnostic protocol);
* decoding (:meth:`Engine.generate_batch`): greedy, with explicit position ids, until each
  sequence's ``max_new_tokens``, EOS or first stop string. The sequences of a batch advance
  together: one forward pass per step for all of them (each weight read once), each sequence's
  attention through its own method and stores (:mod:`atskv.core.decoding`). On the CPU in float32
  the decode step's linear layers compute every row as they compute it alone
  (``atskv::linear_rows``), so a sequence gets the same tokens, logits and byte counters in a
  batch as alone.

:meth:`Engine.generate` runs prefill, compression and decoding for one prompt;
:meth:`Engine.generate_from` compresses a given prefill (or starts from a given compression),
extends it with a question if one is given, and decodes. Measurements are taken here, around
device-synchronised regions, and KV sizes are read off the tensors the methods' states hold.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import dynamo, seam
from atskv.core.decoding import (
    CompiledStep,
    EagerStep,
    ExtendSession,
    GraphStep,
    Row,
    compilable,
    static,
)
from atskv.core.method import Method, PrefillContext, State
from atskv.core.reconstruct import reconstruction_scores
from atskv.core.stores import DenseKV, StaticKV
from atskv.core.types import GenerationOutput
from atskv.metrics.timing import synchronize

log = logging.getLogger(__name__)


@dataclass
class Prefill:
    """A prompt's uncompressed state after prefill (read-only for the methods).

    keys, values: per layer ``(H_kv, L, d)`` (keys after RoPE; a sliding-window layer may hold
    only its last tokens, at least ``min(L, window)``); queries: per layer the last ``w`` prompt
    queries ``(H_q, w, d)`` (``w`` as asked for, at most L); logits: ``(vocab,)`` of the last
    prompt position; seconds: the device-synchronised prefill time; windows: per layer the
    sliding window its attention keeps (None: every earlier token); scale: the attention's
    logit scale (as the model passes it); input_ids: the prompt.
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    queries: list[Tensor]
    logits: Tensor
    prompt_len: int
    seconds: float
    kv_bytes: int  # the uncompressed KV held at the end of prefill
    windows: list[int | None]
    scale: float
    input_ids: list[int] = field(default_factory=list)
    #: scores computed over this prefill so far, shared by the compressions that ask for them
    #: (:meth:`PrefillContext.shared`), per set of compressed layers
    memo: dict[tuple[int, ...], dict[Any, tuple[Any, float]]] = field(default_factory=dict,
                                                                       repr=False)


class PrefillSession:
    """Seam callbacks during prefill: keys/values accumulate uncompressed, attention is exact and
    causal (over each sliding-window layer's window), and the last ``window`` queries of every
    layer are kept for the method's scoring."""

    def __init__(self, n_layers: int, window: int, windows: list[int | None],
                 base: Prefill | None = None):
        self.kv = [DenseKV() for _ in range(n_layers)]
        self.queries: list[Tensor | None] = [None] * n_layers
        self.window = window
        self.windows = windows  # per layer, as the model's config declares them
        self.scales: list[float] = [base.scale] if base is not None else []
        self.position = 0
        if base is not None:  # continue it: its tensors are read, never written
            for layer, kv in enumerate(self.kv):
                kv.keys, kv.values = base.keys[layer], base.values[layer]
                q = base.queries[layer]
                self.queries[layer] = q if q.numel() else None

    def seen_tokens(self) -> int:
        return self.position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kv, w = self.kv[layer], self.windows[layer]
        if w is not None and kv.length > w - 1:  # no query from here on sees the older tokens
            kv.keys, kv.values = kv.keys[:, kv.length - w + 1:], kv.values[:, kv.length - w + 1:]
        return kv.append(k[0], v[0])

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None) -> Tensor:
        """Causal attention of a prompt chunk ``q`` ``(1, H_q, t, d)`` over the prompt keys the
        layer holds ``(H_kv, T, d)`` (the last T tokens up to the chunk's end), each query over
        at most ``window`` of them (itself included) when the layer slides."""
        if window != self.windows[layer]:
            raise seam.UnsupportedModel(
                f"layer {layer} of the model attends over a sliding window of {window} tokens, "
                f"but its config declares {self.windows[layer]}: the engine would not reproduce it")
        self.scales.append(scale)
        t, total = q.shape[2], k.shape[1]
        if self.window:
            prev = self.queries[layer]
            cur = q[0] if prev is None else torch.cat([prev, q[0]], dim=1)
            self.queries[layer] = cur[:, -self.window:]
        kwargs: dict[str, Any] = {"scale": scale, "enable_gqa": True}
        if t == total and (window is None or window >= t):
            kwargs["is_causal"] = True
        else:  # earlier tokens, causal inside the chunk, within the window
            qpos = torch.arange(total - t, total, device=q.device)[:, None]
            kpos = torch.arange(total, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            kwargs["attn_mask"] = mask
        return F.scaled_dot_product_attention(q, k[None], v[None], **kwargs)

    def result(self, input_ids: list[int], logits: Tensor, seconds: float,
               dtype: torch.dtype) -> Prefill:
        """What the prefill of the prompt ``input_ids`` (a continued base's included) holds, as a
        :class:`Prefill` (its tensors, not copies)."""
        empty = torch.empty(0, dtype=dtype, device=logits.device)
        return Prefill(
            keys=[kv.keys for kv in self.kv], values=[kv.values for kv in self.kv],
            queries=[q if q is not None else empty for q in self.queries], logits=logits,
            prompt_len=len(input_ids), seconds=seconds,
            kv_bytes=sum(kv.nbytes() for kv in self.kv), windows=list(self.windows),
            scale=_one_scale(self.scales), input_ids=list(input_ids))


@dataclass
class Compressed:
    """A method's state after compressing a prefill: ``keep`` the kept prompt-token indices per
    layer and KV head, ``seconds`` the compression's time. :meth:`copy` gives an independent
    copy, so that several questions can each start from the same compressed context."""

    state: State
    keep: list[list[Tensor]]
    seconds: float

    def copy(self) -> Compressed:
        return Compressed(copy.deepcopy(self.state), self.keep, self.seconds)


class StopStrings:
    """Ends generation at the first occurrence of any stop string in the decoded text, checked
    incrementally: after each token only the last few tokens are decoded (enough to hold the
    longest stop string, which needs at most one token per character)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        if self.stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.tail = max((len(s) for s in self.stops), default=0) + 8

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        text = self.tokenizer.decode(tokens[-self.tail:], skip_special_tokens=True)
        return any(s in text for s in self.stops)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (whole when none occurs)."""
        at = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:at]


def compile_pays(hw: Any, decode_steps: int | None) -> bool:
    """Whether a run compiles its decode step: the ``hardware`` config's ``compile``, for a run
    that decodes at least ``compile_min_steps`` steps (``decode_steps``; None: unknown, compile).
    A compile costs tens of seconds once per process and shape, a compiled step saves
    milliseconds: a short run is faster eager."""
    least = int(getattr(hw, "compile_min_steps", 0) or 0)
    return bool(hw.compile) and (decode_steps is None or decode_steps >= least)


class Engine:
    """Greedy generation with KV-cache methods on a transformers causal LM, one sequence or a
    batch of them."""

    def __init__(self, model: Any, tokenizer: Any, prefill_chunk: int = 0,
                 cuda_graph: bool = False, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.cuda_graph = cuda_graph
        self.use_compile(compile)
        seam.check_supported(model)  # a model the engine cannot run exactly fails here
        self.dims = seam.model_dims(model)
        self.windows = seam.layer_windows(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = seam.eos_token_ids(model, tokenizer)

    def use_compile(self, compile: bool) -> None:
        """Compile the static decode step from now on (where torch.compile works here), or
        not."""
        self.compile = compile and dynamo.available()
        if compile and not self.compile:
            log.warning("torch.compile is disabled here (TORCH_COMPILE_DISABLE): decoding eagerly")

    @classmethod
    def for_hardware(cls, model: Any, tokenizer: Any, hw: Any,
                     decode_steps: int | None = None) -> Engine:
        """An engine with a ``hardware`` config's prefill chunk, CUDA-graph and compile settings
        (the graph only on a CUDA device; compiling only for a run of ``decode_steps``, when
        known, that :func:`compile_pays` for)."""
        device = next(model.parameters()).device
        return cls(model, tokenizer, prefill_chunk=hw.prefill_chunk,
                   cuda_graph=bool(hw.cuda_graph) and device.type == "cuda",
                   compile=compile_pays(hw, decode_steps))

    def full_kv_bytes(self, n_tokens: int) -> int:
        """Bytes a full cache holds for ``n_tokens`` tokens (all layers, K and V; a
        sliding-window layer holds at most its window)."""
        d = self.dims
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        tokens = sum(n_tokens if w is None else min(w, n_tokens) for w in self.windows)
        return 2 * d["n_kv_heads"] * d["head_dim"] * itemsize * tokens

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.dims["max_positions"]:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the model's {self.dims['max_positions']} positions")

    # -- the three phases -----------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: list[int] | Tensor, method: Method, max_new_tokens: int,
                 stop: Sequence[str] = (), stop_at_eos: bool = True,
                 return_logits: bool = False) -> GenerationOutput:
        """Prefill, compress with ``method`` and decode (the prefill is freed as it is
        compressed)."""
        self.check_fits(len(input_ids), max_new_tokens)
        pre = self.prefill(input_ids, method.queries_needed())
        return self.generate_from(pre, method, max_new_tokens, stop, stop_at_eos, return_logits,
                                  consume=True)

    @torch.inference_mode()
    def prefill(self, input_ids: list[int] | Tensor, queries: int = 0,
                base: Prefill | None = None) -> Prefill:
        """Exact (chunked) prefill of the prompt, keeping the last ``queries`` prompt queries of
        every layer. With ``base``, the prompt continues ``base``'s (which is left as it was):
        the result is the prefill of both, timed as ``base``'s seconds plus this one's (the
        question-aware prompt of a context that was prefilled once for both protocols)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)
        start = base.prompt_len if base is not None else 0
        prompt_len = start + ids.shape[1]
        session = PrefillSession(self.dims["n_layers"], min(queries, prompt_len), self.windows,
                                 base)
        with seam.use_engine_attention(self.model):
            synchronize(self.device)
            t0 = time.perf_counter()
            chunk = self.prefill_chunk or ids.shape[1]
            for s in range(0, ids.shape[1], chunk):
                piece = ids[:, s : s + chunk]
                pos = torch.arange(start + s, start + s + piece.shape[1],
                                   device=self.device).view(1, -1)
                session.position = start + s
                logits = seam.forward(self.model, session, piece, pos)[0]
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        return session.result((base.input_ids if base is not None else []) + ids[0].tolist(),
                              logits, seconds + (base.seconds if base is not None else 0.0),
                              self.dtype)

    @torch.inference_mode()
    def compress(self, pre: Prefill, method: Method, max_new_tokens: int,
                 consume: bool = False, question_follows: bool = False) -> Compressed:
        """The method's state with its per-layer stores built from ``pre`` (copies of the kept
        tokens; room for ``max_new_tokens`` appended tokens: the generation, and the question's
        tokens when one is appended before it), the kept prompt-token indices per layer and KV
        head, and the time it took. With ``consume`` each layer's prefill tensors are dropped once
        its store is built (a prefill nobody shares). ``question_follows``: the appended tokens
        begin with a question the method does not see (:attr:`PrefillContext.question_follows`).

        A sliding-window layer whose window is shorter than what this generation's queries
        would see (``window < prompt + max_new_tokens - 1``) keeps exactly its window, as a ring
        (:func:`window_store`; in ``state.windows``): its KV is bounded already and it is not
        compressed further. The method compresses the other layers and never sees the sliding
        ones: its :class:`PrefillContext` holds the other layers only, in order, and its layer
        ``j`` is the ``j``-th of them. A layer whose window covers the whole generation attends
        to everything, so the method compresses it like a full-attention layer."""
        synchronize(self.device)
        t0 = time.perf_counter()
        state = method.begin(pre.prompt_len, max_new_tokens)
        keys, values = pre.keys, pre.values
        assert all(k is not None for k in keys), "this prefill was consumed already"
        ring = [w is not None and w < pre.prompt_len + max_new_tokens - 1 for w in pre.windows]
        others = [i for i, r in enumerate(ring) if not r]
        keep: list[list[Tensor]] | None = None
        charged = 0.0
        if others:
            rope = seam.rotary(self.model)
            ctx = PrefillContext([keys[i] for i in others], [values[i] for i in others],  # type: ignore[misc]
                                 [pre.queries[i] for i in others], pre.prompt_len,
                                 max_new_tokens, pre.scale, *(rope or (None, 1.0)),
                                 question_follows=question_follows,
                                 memo=pre.memo.setdefault(tuple(others), {}))
            passes = tuple(method.reconstruction(pre.input_ids, self.tokenizer, question_follows))
            if passes:  # part of compressing, run once per prefill for the same passes
                scores = ctx.shared(("reconstruction", passes), lambda: reconstruction_scores(
                    self.model, keys, values, pre.prompt_len, passes))  # type: ignore[arg-type]
                ctx.reconstruction = [scores[i] for i in others]
            keep = method.select(state, ctx)
            charged = ctx.charged
            del ctx
        if keep is None:
            everything = torch.arange(pre.prompt_len, device=keys[0].device)  # type: ignore[union-attr]
            keep = [[everything] * keys[0].shape[0] for _ in others]  # type: ignore[union-attr]
        kept: list[list[Tensor]] = []
        for layer in range(len(keys)):
            if ring[layer]:
                store, positions = window_store(keys[layer], values[layer], pre.prompt_len,  # type: ignore[arg-type]
                                                pre.windows[layer])  # type: ignore[arg-type]
                state.windows[layer] = store
                kept.append(positions)
            else:
                j = len(state.stores)
                state.stores.append(method.make_store(state, j, keys[layer], values[layer],  # type: ignore[arg-type]
                                                      keep[j]))
                kept.append(keep[j])
            if consume:
                keys[layer] = values[layer] = None
        synchronize(self.device)
        return Compressed(state, kept, time.perf_counter() - t0 + charged)

    @torch.inference_mode()
    def forget(self, compressed: Compressed, method: Method, position: int,
               copy: bool = True) -> Compressed:
        """``compressed`` (a copy of it) without the kept tokens at ``position`` and after, as
        if they had never been stored: a question compressed with its context, removed before
        the next question goes on at ``position`` (the question-aware protocol's later
        questions). Kept tokens are stored in position order, so they are each head's last."""
        c = compressed.copy() if copy else compressed
        keep, j = [], 0
        for layer, heads in enumerate(c.keep):
            drop = [int((k >= position).sum()) for k in heads]
            ring = c.state.windows.get(layer)
            if ring is not None:  # (its window loses the dropped tokens' places until refilled)
                ring.truncate(drop)
            else:
                method.truncate_layer(c.state, j, c.state.stores[j], drop)
                j += 1
            keep.append([k[k < position] for k in heads])
        return Compressed(c.state, keep, c.seconds)

    @torch.inference_mode()
    def extend(self, method: Method, state: State, token_ids: list[int],
               position: int) -> tuple[Tensor, float, int]:
        """Append ``token_ids`` at positions ``position ..`` on top of the compressed ``state``,
        uncompressed, with exact attention over what its stores hold (:meth:`Method.extend_layer`)
        in one forward pass. Returns the logits of the last token, the seconds it took and the
        KV bytes its attention read."""
        session = ExtendSession([Row(method, state, position)])
        ids = torch.tensor([token_ids], device=self.device)
        pos = torch.arange(position, position + len(token_ids), device=self.device).view(1, -1)
        with seam.use_engine_attention(self.model), seam.exact_linears(self.model):
            synchronize(self.device)
            t0 = time.perf_counter()
            logits = seam.forward(self.model, session, ids, pos)[0]
            synchronize(self.device)
        return logits, time.perf_counter() - t0, session.step_read_bytes[0]

    @torch.inference_mode()
    def generate_from(self, pre: Prefill, method: Method, max_new_tokens: int,
                      stop: Sequence[str] = (), stop_at_eos: bool = True,
                      return_logits: bool = False, consume: bool = False,
                      question: Sequence[int] = (),
                      compressed: Compressed | None = None) -> GenerationOutput:
        """Compress ``pre`` with ``method`` (or start from ``compressed``, a compression of
        ``pre`` that this generation may modify), append the ``question`` tokens on top of it
        uncompressed (:meth:`extend`; the question-agnostic protocol: the method compressed the
        context without seeing them), and decode. TTFT = the prefill's time + the compression
        + the question's extension + the first token."""
        return self.generate_batch([Request(pre, method, max_new_tokens, stop, stop_at_eos,
                                            return_logits, consume, question, compressed)])[0]

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[Request]) -> list[GenerationOutput]:
        """Every request compressed (or started from its compression) and extended with its
        question one after another, then decoded together: one forward pass per step for all
        of them. Each output is what :meth:`generate_from` gives for the request alone (tokens,
        logits, byte counters); its timings are the batch's (``stats["decode_batch_size"]``)."""
        gens = [self._start(r) for r in requests]
        self._decode(gens)
        return [self._output(g, len(gens)) for g in gens]

    def _start(self, r: Request) -> _Generation:
        question = list(r.question)
        comp = r.compressed or self.compress(r.pre, r.method, len(question) + r.max_new_tokens,
                                             r.consume, question_follows=bool(question))
        g = _Generation(r, comp, question, StopStrings(self.tokenizer, r.stop),
                        kv_after=comp.state.nbytes())
        logits = r.pre.logits
        if question:
            logits, g.extend_s, g.extend_read = self.extend(r.method, comp.state, question,
                                                            r.position())
        g.tokens = [int(torch.argmax(logits))]
        if r.return_logits:
            g.logits = [logits.float().cpu()]
        g.done = self._finished(g)
        return g

    def _finished(self, g: _Generation) -> bool:
        r = g.request
        return (len(g.tokens) >= r.max_new_tokens
                or (r.stop_at_eos and g.tokens[-1] in self.eos_ids) or g.stopper.hit(g.tokens))

    def _decode(self, gens: list[_Generation]) -> None:
        """Decode steps until every generation has finished. Rows whose steps are static and
        equally long run as one fixed batch (captured where the engine does so, or compiled when
        they are :func:`~atskv.core.decoding.compilable`; a finished row keeps running within its own
        room and its outputs are dropped); otherwise the batch shrinks as rows finish."""
        rows = [Row(g.request.method, g.compressed.state,
                    g.request.position() + len(g.question)) for g in gens]
        fixed = (static(rows) and len({g.request.max_new_tokens for g in gens}) == 1
                 and (self.cuda_graph or (self.compile and compilable(rows))))
        with seam.use_engine_attention(self.model), seam.exact_linears(self.model):
            step: EagerStep | None = self._stepper(rows) if fixed else None
            while not all(g.done for g in gens):
                live = list(range(len(gens))) if fixed else [i for i, g in enumerate(gens)
                                                            if not g.done]
                if not fixed and (step is None or len(step.rows) != len(live)):
                    step = EagerStep(self.model, [rows[i] for i in live], self.device)
                assert step is not None
                compiled = step.compile_steps
                t = time.perf_counter()
                logits, reads = step([gens[i].tokens[-1] for i in live])
                nxt = logits.argmax(dim=-1).tolist()  # a host sync: the step has finished
                dt = None if step.compile_steps != compiled else time.perf_counter() - t
                for j, i in enumerate(live):
                    g = gens[i]
                    if g.done:  # a finished row of a fixed batch: its step is dropped
                        continue
                    g.tokens.append(int(nxt[j]))
                    g.reads.append(reads[j])
                    g.steps += 1
                    if dt is None:
                        g.compile_steps += 1
                        g.compile_s += step.compile_s - g.compile_s_seen
                    else:
                        g.step_s.append(dt)
                    g.compile_s_seen = step.compile_s
                    if g.logits is not None:
                        g.logits.append(logits[j].float().cpu())
                    if self._finished(g):
                        g.done = True
                        g.kv_end = g.compressed.state.nbytes()
            for g in gens:
                g.compiled = isinstance(step, CompiledStep) and step.compiled_calls > 0
                g.graph = isinstance(step, GraphStep) and step.graph is not None
                if g.kv_end is None:
                    g.kv_end = g.compressed.state.nbytes()

    def _output(self, g: _Generation, batch: int) -> GenerationOutput:
        r, tokens, keep = g.request, g.tokens, g.compressed.keep
        text_tokens = [t for t in tokens if not (r.stop_at_eos and t in self.eos_ids)]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True) if self.tokenizer else ""
        kept = [[int(i.numel()) for i in layer] for layer in keep]
        flat = [n for layer in kept for n in layer]
        stats: dict[str, Any] = {
            "cuda_graph": g.graph,
            "compiled": g.compiled,
            "compile_s": g.compile_s,
            "compile_steps": g.compile_steps,
            "decode_step_s": g.step_s,  # each timed decode step (token to token)
            "decode_batch_size": batch,  # sequences decoded together (timings are the batch's)
            "kept_tokens": kept,  # per layer and KV head (a sliding-window layer: its window)
            "window_layers": sorted(g.compressed.state.windows),
            "prompt_tokens_kept": {"mean": sum(flat) / len(flat), "min": min(flat), "max": max(flat)},
            "kv_bytes_prefill": r.pre.kv_bytes,
            "prefill_s": r.pre.seconds,
            "compress_s": g.compressed.seconds,
            "question_tokens": len(g.question),
            "extend_s": g.extend_s,
            "extend_kv_read_bytes": g.extend_read,
            "kept_indices": keep,
            "stopped_by": ("eos" if r.stop_at_eos and tokens[-1] in self.eos_ids else
                           "stop" if g.stopper.hit(tokens) else "length"),
        }
        if g.logits is not None:
            stats["logits"] = g.logits
            stats["state"] = g.compressed.state
        return GenerationOutput(
            token_ids=tokens,
            text=g.stopper.cut(text),
            prompt_tokens=r.position() + len(g.question),
            ttft_s=r.pre.seconds + g.compressed.seconds + g.extend_s,
            decode_s=sum(g.step_s),
            decode_tokens=len(g.step_s),
            kv_bytes_after_compression=g.kv_after,
            kv_bytes_peak=max(g.kv_after, g.kv_end or 0),
            kv_bytes_uncompressed=self.full_kv_bytes(r.position() + len(g.question)
                                                     + len(tokens) - 1),
            decode_kv_read_bytes=(sum(g.reads) / len(g.reads)) if g.reads else None,
            stats=stats,
        )

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """The context in which :meth:`stepper`'s steps (and the compressions they start from)
        run: inference mode, the engine's attention and linear layers in the model."""
        with (torch.inference_mode(), seam.use_engine_attention(self.model),
              seam.exact_linears(self.model)):
            yield

    def stepper(self, method: Method, state: State,
                prompt_len: int) -> Callable[[int], tuple[Tensor, int]]:
        """Single decode steps over a compressed ``state``, as decoding runs them (compiled or
        graph-captured where it would be), for harnesses that interleave several methods'
        steps: ``step(token)`` feeds ``token`` at the next position and returns the logits and
        the KV bytes the step read. Call it inside :meth:`stepping`."""
        step = self._stepper([Row(method, state, prompt_len)])

        def one(token: int) -> tuple[Tensor, int]:
            logits, reads = step([token])
            return logits[0], reads[0]

        return one

    def _stepper(self, rows: list[Row]) -> EagerStep:
        if static(rows) and self.cuda_graph and self.device.type == "cuda":
            return GraphStep(self.model, rows, self.device)
        if static(rows) and self.compile:
            return CompiledStep(self.model, rows, self.device)
        return EagerStep(self.model, rows, self.device)

    def warmup(self, method: Method) -> float:
        """Short generations so that one-time costs (first calls, compiling the decode step for
        one set of shapes and then for varying ones) stay out of the timed samples; returns the
        seconds its steps spent compiling."""
        spent = 0.0
        for n in (64, 80):
            n = min(n, self.dims["max_positions"] - 6)
            out = self.generate(list(range(1, n + 1)), method, max_new_tokens=4,
                                stop_at_eos=False)
            spent += out.stats["compile_s"]
        return spent


def window_store(keys: Tensor, values: Tensor, prompt_len: int,
                 window: int) -> tuple[StaticKV, list[Tensor]]:
    """A sliding-window layer's decode store: the last ``min(prompt_len, window)`` prompt tokens
    of ``keys``, ``values`` ``(H_kv, T, d)`` (the layer's last T tokens) in a ring of ``window``
    rows per head, where each new token overwrites the oldest (the query at position p sees
    positions ``p - window + 1 .. p``, as transformers' sliding window); and the kept prompt
    positions per head."""
    n = min(prompt_len, window)
    held = keys.shape[1]
    rows = torch.arange(held - n, held, device=keys.device)
    store = StaticKV(keys, values, [rows] * keys.shape[0], headroom=window - n, sinks=0)
    return store, [rows + (prompt_len - held)] * keys.shape[0]


def _one_scale(scales: list[float]) -> float:
    """The attention scale every layer used (the methods score with one)."""
    if len(set(scales)) != 1:
        raise seam.UnsupportedModel(f"the model's layers scale attention differently "
                                    f"({sorted(set(scales))}); the methods score with one scale")
    return scales[0]


@dataclass
class Request:
    """One generation of a batch (:meth:`Engine.generate_batch`): a prefill and the method that
    compresses it (or its compression, which the generation may modify), the question appended
    on top of it (none: the question is inside the prefill), and how the generation ends."""

    pre: Prefill
    method: Method
    max_new_tokens: int
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    return_logits: bool = False
    consume: bool = False  # the prefill's tensors are freed as they are compressed
    question: Sequence[int] = ()
    compressed: Compressed | None = None
    start: int | None = None  # where the question goes (None: after the prefill's prompt)

    def position(self) -> int:
        """The position of the first appended token (the question's, else the first
        generated token's)."""
        return self.pre.prompt_len if self.start is None else self.start


@dataclass
class _Generation:
    """A request while its batch decodes."""

    request: Request
    compressed: Compressed
    question: list[int]
    stopper: StopStrings
    kv_after: int
    kv_end: int | None = None
    extend_s: float = 0.0
    extend_read: int = 0
    tokens: list[int] = field(default_factory=list)
    logits: list[Tensor] | None = None
    reads: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    steps: int = 0
    compile_steps: int = 0
    compile_s: float = 0.0
    compile_s_seen: float = 0.0
    compiled: bool = False
    graph: bool = False
    done: bool = False
