"""Decode steps over a batch of sequences: the model runs once on every sequence's token (each
weight read once per step), and each sequence's attention goes through its own method and its
own stores (ragged, per-head, of any size).

A step is eager (:class:`EagerStep`), compiled (:class:`CompiledStep`: the static step under
``torch.compile(fullgraph=True)``, :mod:`atskv.core.dynamo`) or replayed from a CUDA graph
(:class:`GraphStep`); all three take the rows' tokens and return the logits ``(B, vocab)`` and
the KV bytes each row's attention read. A compiled or captured step has a fixed set of rows; the
engine keeps running a row that has finished (its outputs are thrown away) rather than change
the set, which would compile again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atskv.core import dynamo, seam
from atskv.core.method import Method, State
from atskv.core.stores import decode_rows
from atskv.metrics.timing import synchronize

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One sequence of a decode batch: its method, its compressed state (which owns its
    stores) and the absolute position of its next token."""

    method: Method
    state: State
    position: int


def method_layers(state: State) -> dict[int, int]:
    """Model layer -> the method's layer (its index in ``state.stores``): the method never sees
    the sliding-window layers (``state.windows``), so its layer ``j`` is the ``j``-th other."""
    n = len(state.stores) + len(state.windows)
    return {layer: j for j, layer in enumerate(i for i in range(n) if i not in state.windows)}


def attend_row(row: Row, layers: dict[int, int], layer: int, q: Tensor, k: Tensor, v: Tensor,
               scale: float, extend: bool = False) -> tuple[Tensor, int]:
    """One row's layer: its new key and value ``(H_kv, d)`` into its store and its query
    ``(H_kv, g, d)``'s attention, through its method (:meth:`Method.decode_layer`, or
    :meth:`Method.extend_layer` for a question's tokens), or, for a sliding-window layer, its
    ring's own append and exact attention. The output and the KV bytes read."""
    ring = row.state.windows.get(layer)
    if ring is not None:
        ring.append(k, v)
        return ring.attend(q, scale)
    j = layers[layer]
    hook = row.method.extend_layer if extend else row.method.decode_layer
    res = hook(row.state, j, row.state.stores[j], q, k, v, scale)
    return res.out, res.read_bytes


class DecodeSession:
    """Seam callbacks during decode steps of a batch of rows: each row's new key and value go
    into its own stores and its query attends through its own method (one method call per row
    and layer, so that a method may do both in one kernel). The rows whose layer is a plain
    append and attention (:meth:`Method.plain_decode`) over a store the native kernel serves
    run that layer together, in one call (:func:`atskv.core.stores.decode_rows`)."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = list(rows)
        self.layers = [method_layers(r.state) for r in self.rows]
        plain = [r.method.plain_decode(r.state) for r in self.rows]
        n_layers = max((len(r.state.stores) + len(r.state.windows) for r in self.rows), default=0)
        #: per model layer, the rows that run it together (:func:`decode_rows`): plain rows
        #: whose store of that layer the native kernel serves (a sliding-window layer's ring is
        #: the row's own)
        self.together = [[b for b, r in enumerate(self.rows) if plain[b]
                          and layer not in r.state.windows
                          and getattr(r.state.stores[self.layers[b][layer]], "kernel", False)]
                         for layer in range(n_layers)]
        #: per row, the KV bytes the current step reads (sizes of what it reads: also inside a
        #: compiled step, where the compiled function sets them, and a captured one, at capture)
        self.step_read_bytes = [0] * len(self.rows)

    def seen_tokens(self) -> int:
        return max(r.position for r in self.rows)  # positions are explicit: only a size hint

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v  # stored by each row's method in :meth:`attention`, which receives them next

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None = None) -> Tensor:
        """Rows' queries ``(B, H_q, 1, d)`` and new keys and values ``(B, H_kv, 1, d)`` ->
        ``(B, H_q, 1, d)`` (a sliding-window layer's ``window`` is its ring's)."""
        n, h_q, _, d = q.shape
        h_kv = k.shape[1]
        qs = q[:, :, 0].reshape(n, h_kv, h_q // h_kv, d)
        together = self.together[layer]
        outs: list[Tensor | None] = [None] * n
        if together:
            stores = [self.rows[b].state.stores[self.layers[b][layer]] for b in together]
            out, reads = decode_rows(together, stores, qs, k[:, :, 0], v[:, :, 0], scale)
            if len(together) == n:
                self.step_read_bytes = [a + r for a, r in zip(self.step_read_bytes, reads)]
                return out.reshape(n, h_q, d)[:, :, None]
            for i, b in enumerate(together):
                outs[b] = out[i].reshape(h_q, d)
                self.step_read_bytes[b] += reads[i]
        for b, row in enumerate(self.rows):
            if outs[b] is not None:
                continue
            res, read = attend_row(row, self.layers[b], layer, qs[b], k[b, :, 0], v[b, :, 0],
                                   scale)
            self.step_read_bytes[b] += read
            outs[b] = res.reshape(h_q, d)
        return torch.stack(outs)[:, :, None]  # type: ignore[arg-type]


class ExtendSession(DecodeSession):
    """Seam callbacks while one row's tokens are appended on top of its compressed cache:
    within each layer the chunk's tokens go in one at a time (:meth:`Method.extend_layer`: into
    the store, then exact attention over what it holds), which is causal attention over the
    compressed tokens and the chunk itself, and respects whatever a store evicts as tokens
    arrive."""

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None = None) -> Tensor:
        (row,) = self.rows
        _, h_q, t, d = q.shape
        h_kv = k.shape[1]
        outs = []
        for i in range(t):
            out, read = attend_row(row, self.layers[0], layer,
                                   q[0, :, i].view(h_kv, h_q // h_kv, d), k[0, :, i], v[0, :, i],
                                   scale, extend=True)
            self.step_read_bytes[0] += read
            outs.append(out.reshape(h_q, d))
        return torch.stack(outs, dim=1)[None]


#: the most rows a compiled step holds: every distinct set of rows compiles a step of its own
#: (tens of seconds each), so larger batches decode eagerly, still one weight read per step
MAX_COMPILED_ROWS = 8
#: the most rows of a compiled step whose layers are not plain (:meth:`Method.plain_decode`): the
#: graph unrolls each such row's attention (plain rows share one call per layer), and compiling
#: it takes longer than linearly in them (11-16 minutes at 8 rows for SmolLM2 on a loaded 2-core
#: machine)
MAX_UNROLLED_ROWS = 4


def compilable(rows: Sequence[Row]) -> bool:
    """Whether the rows, all static, may run as one compiled step (:data:`MAX_COMPILED_ROWS`,
    :data:`MAX_UNROLLED_ROWS`)."""
    unrolled = sum(not r.method.plain_decode(r.state) for r in rows)
    return len(rows) <= MAX_COMPILED_ROWS and unrolled <= MAX_UNROLLED_ROWS


def static(rows: Sequence[Row]) -> bool:
    """Whether every row's decode step is static (fixed shapes, no host sync)."""
    return all(r.method.static_decode()
               and all(s.static for s in (*r.state.stores, *r.state.windows.values()))
               for r in rows)


class EagerStep:
    """One decode step of the rows: each row's token at its next position through the model."""

    compile_s = 0.0  # time spent compiling (compiled steps only)
    compile_steps = 0  # steps whose time was compile time

    def __init__(self, model: Any, rows: Sequence[Row], device: torch.device):
        self.model, self.session, self.device = model, DecodeSession(rows), device

    @property
    def rows(self) -> list[Row]:
        return self.session.rows

    def __call__(self, tokens: Sequence[int]) -> tuple[Tensor, list[int]]:
        s = self.session
        s.step_read_bytes = [0] * len(s.rows)
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        pos = torch.tensor([[r.position] for r in s.rows], device=self.device)
        logits = seam.forward(self.model, s, ids, pos)
        self.advance()
        return logits, s.step_read_bytes

    def advance(self) -> None:
        for r in self.session.rows:
            r.position += 1


class CompiledStep(EagerStep):
    """Decode steps through the compiled static step (:func:`atskv.core.dynamo.compiled_step`),
    every one of them: the tokens and positions go in through device tensors. The KV bytes a
    step reads are counted inside the compiled step (from the sizes of the tensors it reads, as
    in an eager step). A call that had to compile (a new method, model or shape) is timed as
    ``compile_s`` and left out of the decode rate."""

    def __init__(self, model: Any, rows: Sequence[Row], device: torch.device):
        super().__init__(model, rows, device)
        self.fn = dynamo.compiled_step(model)
        self.cache = seam.make_cache(model, self.session)
        self.ids = torch.zeros(len(rows), 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(len(rows), 1, dtype=torch.long, device=device)
        self.compiled_calls = self.compile_steps = 0
        self.compile_s = 0.0

    def __call__(self, tokens: Sequence[int]) -> tuple[Tensor, list[int]]:
        s = self.session
        s.step_read_bytes = [0] * len(s.rows)
        self.ids.copy_(torch.tensor([[t] for t in tokens]))
        self.pos.copy_(torch.tensor([[r.position] for r in s.rows]))
        before = dynamo.compilations()
        t0 = time.perf_counter()
        with seam.active(s):
            logits = self.fn(self.model, self.cache, self.ids, self.pos)
        if dynamo.compilations() != before:
            synchronize(self.device)
            self.compile_s += time.perf_counter() - t0
            self.compile_steps += 1
        self.compiled_calls += 1
        self.advance()
        return logits, s.step_read_bytes


class GraphStep(EagerStep):
    """Decode steps replayed from a CUDA graph (rows whose decode state is static).

    The first step runs eagerly on a side stream (the warm-up capture needs; it is a real step).
    The second is captured into a ``torch.cuda.CUDAGraph`` with the tokens and positions held in
    static device tensors, then replayed for it and every later step; the rows' decode state
    (lengths, page bounds, buffers) lives in device tensors updated in place, so replays advance
    it. Read bytes per step are fixed by the static shapes and taken from the captured step. If
    capture fails, the steps run eagerly and ``stats["cuda_graph"]`` says so.
    """

    def __init__(self, model: Any, rows: Sequence[Row], device: torch.device):
        super().__init__(model, rows, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.failed = False

    def __call__(self, tokens: Sequence[int]) -> tuple[Tensor, list[int]]:
        self.calls += 1
        if self.failed or self.calls == 1:
            if self.calls == 1:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = super().__call__(tokens)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            return super().__call__(tokens)
        s = self.session
        if self.graph is None:
            self.ids = torch.tensor([[t] for t in tokens], device=self.device)
            self.pos = torch.tensor([[r.position] for r in s.rows], device=self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                s.step_read_bytes = [0] * len(s.rows)
                with torch.cuda.graph(graph):
                    self.logits = seam.forward(self.model, s, self.ids, self.pos)
            except Exception as e:  # noqa: BLE001 - fall back to eager, recorded in stats
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.failed = True
                return super().__call__(tokens)
            self.graph, self.read_bytes = graph, list(s.step_read_bytes)
        else:
            self.ids.copy_(torch.tensor([[t] for t in tokens]))
            self.pos.copy_(torch.tensor([[r.position] for r in s.rows]))
        self.graph.replay()
        self.advance()
        return self.logits, list(self.read_bytes)
