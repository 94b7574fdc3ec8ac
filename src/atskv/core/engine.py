"""The generation loop: chunked prefill, compression, greedy decoding with explicit positions.

Batch size 1 (the protocol of every benchmark here and of the papers' efficiency claims). Three
phases, each its own method of :class:`Engine`:

* :meth:`Engine.prefill`: exact attention over the prompt; returns a :class:`Prefill` (every
  layer's uncompressed keys/values, the last prompt queries a method scores with, the logits of
  the last position and the time it took). A prefill is never modified afterwards, so several
  methods can compress the same one (a sweep's shared prefill);
* :meth:`Engine.compress`: the method's :meth:`~atskv.methods.Method.select` and per-layer stores,
  built as copies of the kept tokens;
* :meth:`Engine.decode`: greedy decoding with explicit position ids ``L + step`` until
  ``max_new_tokens``, EOS or the first stop string.

:meth:`Engine.generate` runs all three. Measurements are taken here, around device-synchronised
regions, and KV sizes are read off the tensors the method's state holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import dynamo, seam
from atskv.core.method import Method, PrefillContext, State
from atskv.core.reconstruct import reconstruction_scores
from atskv.core.stores import DenseKV
from atskv.core.types import GenerationOutput
from atskv.metrics.timing import synchronize


@dataclass
class Prefill:
    """A prompt's uncompressed state after prefill (read-only for the methods).

    keys, values: per layer ``(H_kv, L, d)`` (keys after RoPE); queries: per layer the last
    ``w`` prompt queries ``(H_q, w, d)`` (``w`` as asked for, at most L); logits: ``(vocab,)`` of
    the last prompt position; seconds: the device-synchronised prefill time; input_ids: the
    prompt.
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    queries: list[Tensor]
    logits: Tensor
    prompt_len: int
    seconds: float
    kv_bytes: int  # the uncompressed KV held at the end of prefill
    input_ids: list[int] = field(default_factory=list)


class _PrefillSession:
    """Seam callbacks during prefill: keys/values accumulate uncompressed, attention is exact and
    causal, and the last ``window`` queries of every layer are kept for the method's scoring."""

    def __init__(self, n_layers: int, window: int):
        self.kv = [DenseKV() for _ in range(n_layers)]
        self.queries: list[Tensor | None] = [None] * n_layers
        self.window = window
        self.position = 0

    def seen_tokens(self) -> int:
        return self.position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.kv[layer].append(k[0], v[0])

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Causal attention of a prompt chunk ``q`` ``(1, H_q, t, d)`` over all prompt keys so
        far ``(H_kv, T, d)``."""
        t, total = q.shape[2], k.shape[1]
        if self.window:
            prev = self.queries[layer]
            cur = q[0] if prev is None else torch.cat([prev, q[0]], dim=1)
            self.queries[layer] = cur[:, -self.window:]
        kwargs: dict[str, Any] = {"scale": scale, "enable_gqa": True}
        if t == total:
            kwargs["is_causal"] = True
        else:  # a later chunk: all earlier tokens plus causal inside the chunk
            kwargs["attn_mask"] = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(total - t)
        return F.scaled_dot_product_attention(q, k[None], v[None], **kwargs)


class _DecodeSession:
    """Seam callbacks during decoding: the method's hooks over the stores its state owns."""

    def __init__(self, method: Method, state: State, position: int):
        self.method = method
        self.state = state
        self.position = position  # absolute position of the next token
        #: the KV bytes the current step reads (sizes of what it reads: also inside a compiled
        #: step, where the compiled function sets it, and a captured one, counted at capture)
        self.step_read_bytes = 0

    def seen_tokens(self) -> int:
        return self.position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v  # stored by the method in :meth:`attention`, which receives them next

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """The layer's new key and value ``(1, H_kv, 1, d)`` into its store, then attention (one
        method call, so that a method may do both in one kernel)."""
        _, h_q, _, d = q.shape
        store = self.state.stores[layer]
        h_kv = store.n_heads
        res = self.method.decode_layer(self.state, layer, store,
                                       q[0, :, 0].view(h_kv, h_q // h_kv, d), k[0, :, 0],
                                       v[0, :, 0], scale)
        self.step_read_bytes += res.read_bytes
        return res.out.reshape(1, h_q, 1, d)


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


class Engine:
    """Greedy generation with a KV-cache method on a transformers causal LM."""

    def __init__(self, model: Any, tokenizer: Any, prefill_chunk: int = 0,
                 cuda_graph: bool = False, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.dims = seam.model_dims(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.scale = self.dims["head_dim"] ** -0.5
        self.eos_ids = seam.eos_token_ids(model, tokenizer)

    @classmethod
    def for_hardware(cls, model: Any, tokenizer: Any, hw: Any) -> Engine:
        """An engine with a ``hardware`` config's prefill chunk, CUDA-graph and compile settings
        (the graph only on a CUDA device)."""
        device = next(model.parameters()).device
        return cls(model, tokenizer, prefill_chunk=hw.prefill_chunk,
                   cuda_graph=bool(hw.cuda_graph) and device.type == "cuda",
                   compile=bool(hw.compile))

    def full_kv_bytes(self, n_tokens: int) -> int:
        """Bytes a full cache holds for ``n_tokens`` tokens (all layers, K and V)."""
        d = self.dims
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * d["n_layers"] * d["n_kv_heads"] * d["head_dim"] * itemsize * n_tokens

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
    def prefill(self, input_ids: list[int] | Tensor, queries: int = 0) -> Prefill:
        """Exact (chunked) prefill of the prompt, keeping the last ``queries`` prompt queries of
        every layer."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)
        prompt_len = ids.shape[1]
        session = _PrefillSession(self.dims["n_layers"], min(queries, prompt_len))
        with seam.use_engine_attention(self.model):
            synchronize(self.device)
            t0 = time.perf_counter()
            chunk = self.prefill_chunk or prompt_len
            for s in range(0, prompt_len, chunk):
                piece = ids[:, s : s + chunk]
                pos = torch.arange(s, s + piece.shape[1], device=self.device).view(1, -1)
                session.position = s
                logits = seam.forward(self.model, session, piece, pos)
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        empty = ids.new_empty(0, dtype=self.dtype)
        return Prefill(
            keys=[kv.keys for kv in session.kv], values=[kv.values for kv in session.kv],
            queries=[q if q is not None else empty for q in session.queries], logits=logits,
            prompt_len=prompt_len, seconds=seconds,
            kv_bytes=sum(kv.nbytes() for kv in session.kv), input_ids=ids[0].tolist())

    def compress(self, pre: Prefill, method: Method, max_new_tokens: int,
                 consume: bool = False) -> tuple[State, list[list[Tensor]]]:
        """The method's state with its per-layer stores built from ``pre`` (copies of the kept
        tokens), and the kept prompt-token indices per layer and KV head. With ``consume`` each
        layer's prefill tensors are dropped once its store is built (a prefill nobody shares)."""
        state = method.begin(pre.prompt_len, max_new_tokens)
        keys, values = pre.keys, pre.values
        assert all(k is not None for k in keys), "this prefill was consumed already"
        rope = seam.rotary(self.model)
        ctx = PrefillContext(keys, values, pre.queries, pre.prompt_len, max_new_tokens, self.scale,  # type: ignore[arg-type]
                             *(rope or (None, 1.0)))
        passes = method.reconstruction(pre.input_ids, self.tokenizer)
        if passes:  # part of compressing: timed with it, run again for every method that asks
            ctx.reconstruction = reconstruction_scores(self.model, keys, values, pre.prompt_len,  # type: ignore[arg-type]
                                                       passes)
        keep = method.select(state, ctx)
        if keep is None:
            everything = torch.arange(pre.prompt_len, device=keys[0].device)  # type: ignore[union-attr]
            keep = [[everything] * keys[0].shape[0] for _ in keys]  # type: ignore[union-attr]
        del ctx
        for layer in range(len(keys)):
            state.stores.append(method.make_store(state, layer, keys[layer], values[layer],  # type: ignore[arg-type]
                                                  keep[layer]))
            if consume:
                keys[layer] = values[layer] = None
        return state, keep

    @torch.inference_mode()
    def generate_from(self, pre: Prefill, method: Method, max_new_tokens: int,
                      stop: Sequence[str] = (), stop_at_eos: bool = True,
                      return_logits: bool = False, consume: bool = False) -> GenerationOutput:
        """Compress ``pre`` with ``method`` and decode. TTFT = the prefill's time + this
        compression + the first token."""
        stopper = StopStrings(self.tokenizer, stop)
        synchronize(self.device)
        t0 = time.perf_counter()
        state, keep = self.compress(pre, method, max_new_tokens, consume)
        token = int(torch.argmax(pre.logits))
        synchronize(self.device)
        compress_s = time.perf_counter() - t0
        kv_after = state.nbytes()
        logits_seen = [pre.logits.float().cpu()] if return_logits else []
        tokens, read_bytes, step_s, decode_s, step = self.decode(
            method, state, pre.prompt_len, token, max_new_tokens, stopper, stop_at_eos,
            logits_seen if return_logits else None)
        # steps that compiled the decode step are timed apart (compile_s), not as decoding
        decode_tokens = len(tokens) - 1 - step.compile_steps
        decode_s -= step.compile_s
        kv_end = state.nbytes()
        text_tokens = [t for t in tokens if not (stop_at_eos and t in self.eos_ids)]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True) if self.tokenizer else ""
        kept = [[int(i.numel()) for i in layer] for layer in keep]
        flat = [n for layer in kept for n in layer]
        stats: dict[str, Any] = {
            "cuda_graph": isinstance(step, _GraphStep) and step.graph is not None,
            "compiled": isinstance(step, _CompiledStep) and step.compiled_calls > 0,
            "compile_s": step.compile_s,
            "compile_steps": step.compile_steps,
            "decode_step_s": step_s,  # each timed decode step (token to token)
            "kept_tokens": kept,
            "prompt_tokens_kept": {"mean": sum(flat) / len(flat), "min": min(flat), "max": max(flat)},
            "kv_bytes_prefill": pre.kv_bytes,
            "prefill_s": pre.seconds,
            "compress_s": compress_s,
            "kept_indices": keep,
            "stopped_by": ("eos" if stop_at_eos and tokens[-1] in self.eos_ids else
                           "stop" if stopper.hit(tokens) else "length"),
        }
        if return_logits:
            stats["logits"] = logits_seen
            stats["state"] = state
        return GenerationOutput(
            token_ids=tokens,
            text=stopper.cut(text),
            prompt_tokens=pre.prompt_len,
            ttft_s=pre.seconds + compress_s,
            decode_s=decode_s,
            decode_tokens=decode_tokens,
            kv_bytes_after_compression=kv_after,
            kv_bytes_peak=max(kv_after, kv_end),
            kv_bytes_uncompressed=self.full_kv_bytes(pre.prompt_len + len(tokens) - 1),
            decode_kv_read_bytes=(sum(read_bytes) / len(read_bytes)) if read_bytes else None,
            stats=stats,
        )

    def decode(self, method: Method, state: State, prompt_len: int, token: int,
               max_new_tokens: int, stopper: StopStrings, stop_at_eos: bool,
               logits_seen: list[Tensor] | None
               ) -> tuple[list[int], list[int], list[float], float, _EagerStep]:
        """Greedy decoding from the first ``token``: the tokens, the KV bytes each step read,
        the seconds of each step that did not compile, the decode time (after the first token)
        and the stepper used."""
        session = _DecodeSession(method, state, prompt_len)
        tokens = [token]
        read_bytes: list[int] = []
        step_s: list[float] = []
        with seam.use_engine_attention(self.model):
            step = self._stepper(method, session)
            synchronize(self.device)
            t1 = time.perf_counter()
            while (len(tokens) < max_new_tokens and not (stop_at_eos and token in self.eos_ids)
                   and not stopper.hit(tokens)):
                t = time.perf_counter()
                compiled = step.compile_steps
                logits, step_bytes = step(token)
                read_bytes.append(step_bytes)
                token = int(torch.argmax(logits))  # a host sync: the step has finished
                if step.compile_steps == compiled:  # a step that compiled is timed apart
                    step_s.append(time.perf_counter() - t)
                tokens.append(token)
                if logits_seen is not None:
                    logits_seen.append(logits.float().cpu())
            synchronize(self.device)
            decode_s = time.perf_counter() - t1
        return tokens, read_bytes, step_s, decode_s, step

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """The context in which :meth:`stepper`'s steps (and the compressions they start from)
        run: inference mode, the engine's attention in the model."""
        with torch.inference_mode(), seam.use_engine_attention(self.model):
            yield

    def stepper(self, method: Method, state: State,
                prompt_len: int) -> Callable[[int], tuple[Tensor, int]]:
        """Single decode steps over a compressed ``state``, as :meth:`decode` runs them (compiled
        or graph-captured where it would be), for harnesses that interleave several methods'
        steps: ``step(token)`` feeds ``token`` at the next position and returns the logits and
        the KV bytes the step read. Call it inside :meth:`stepping`."""
        return self._stepper(method, _DecodeSession(method, state, prompt_len))

    def _stepper(self, method: Method, session: _DecodeSession) -> _EagerStep:
        static = method.static_decode() and all(s.static for s in session.state.stores)
        if static and self.cuda_graph and self.device.type == "cuda":
            return _GraphStep(self.model, session, self.device)
        if static and self.compile:
            return _CompiledStep(self.model, session, self.device)
        return _EagerStep(self.model, session, self.device)

    def warmup(self, method: Method) -> None:
        """Short generations so that one-time costs (first calls, compiling the decode step for
        one set of shapes and then for varying ones) stay out of the timed samples."""
        for n in (64, 80):
            n = min(n, self.dims["max_positions"] - 6)
            self.generate(list(range(1, n + 1)), method, max_new_tokens=4, stop_at_eos=False)


class _EagerStep:
    """One decode step: the token at the session's next position through the model."""

    compile_s = 0.0  # time spent compiling (compiled steps only)
    compile_steps = 0  # steps whose time was compile time

    def __init__(self, model: Any, session: _DecodeSession, device: torch.device):
        self.model, self.session, self.device = model, session, device

    def __call__(self, token: int) -> tuple[Tensor, int]:
        s = self.session
        s.step_read_bytes = 0
        pos = torch.tensor([[s.position]], device=self.device)
        logits = seam.forward(self.model, s, torch.tensor([[token]], device=self.device), pos)
        s.position += 1
        return logits, s.step_read_bytes


class _CompiledStep(_EagerStep):
    """Decode steps through the compiled static step (:func:`compiled_step`), every one of them:
    the token and the position go in through device tensors. The KV bytes a step reads are
    counted inside the compiled step (from the sizes of the tensors it reads, as in an eager
    step). A call that had to compile (a new method, model or shape) is timed as ``compile_s``
    and left out of the decode rate.
    """

    def __init__(self, model: Any, session: _DecodeSession, device: torch.device):
        super().__init__(model, session, device)
        self.fn = dynamo.compiled_step(model)
        self.cache = seam.make_cache(model, session)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.compiled_calls = self.compile_steps = 0
        self.compile_s = 0.0

    def __call__(self, token: int) -> tuple[Tensor, int]:
        s = self.session
        s.step_read_bytes = 0
        self.ids.fill_(token)
        self.pos.fill_(s.position)
        before = dynamo.compilations()
        t0 = time.perf_counter()
        with seam.active(s):
            logits = self.fn(self.model, self.cache, self.ids, self.pos)
        if dynamo.compilations() != before:
            synchronize(self.device)
            self.compile_s += time.perf_counter() - t0
            self.compile_steps += 1
        self.compiled_calls += 1
        s.position += 1
        return logits, s.step_read_bytes


class _GraphStep(_EagerStep):
    """Decode steps replayed from a CUDA graph (methods whose decode state is static).

    The first step runs eagerly on a side stream (the warm-up capture needs; it is a real step).
    The second is captured into a ``torch.cuda.CUDAGraph`` with the token and position held in
    static device tensors, then replayed for it and every later step; the method's decode state
    (lengths, page bounds, buffers) lives in device tensors updated in place, so replays advance
    it. Read bytes per step are fixed by the static shapes and taken from the captured step. If
    capture fails, the steps run eagerly and ``stats["cuda_graph"]`` says so.
    """

    def __init__(self, model: Any, session: _DecodeSession, device: torch.device):
        super().__init__(model, session, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.failed = False

    def __call__(self, token: int) -> tuple[Tensor, int]:
        self.calls += 1
        if self.failed or self.calls == 1:
            if self.calls == 1:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = super().__call__(token)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            return super().__call__(token)
        s = self.session
        if self.graph is None:
            self.ids = torch.tensor([[token]], device=self.device)
            self.pos = torch.tensor([[s.position]], device=self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                s.step_read_bytes = 0
                with torch.cuda.graph(graph):
                    self.logits = seam.forward(self.model, s, self.ids, self.pos)
            except Exception as e:  # noqa: BLE001 - fall back to eager, recorded in stats
                import logging

                logging.getLogger(__name__).warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.failed = True
                return super().__call__(token)
            self.graph, self.read_bytes = graph, s.step_read_bytes
        else:
            self.ids.fill_(token)
            self.pos.fill_(s.position)
        self.graph.replay()
        s.position += 1
        return self.logits, self.read_bytes
