"""A KV-cache method under transformers' own ``generate()`` loop (sampling, logits processors,
stopping criteria are generate's): the session behind :func:`atskv.compress`.

One :class:`GenerateSession` serves one ``generate()`` call through the seam's cache
(:func:`atskv.core.seam.make_cache`) and attention. It reproduces the engine's phases
(:mod:`atskv.core.engine`), with the engine's own code:

* **prefill**: the forward passes until the prompt's ``prompt_len`` tokens have gone in (one,
  or one per chunk with ``prefill_chunk_size``): each batch row through its own
  :class:`~atskv.core.engine.PrefillSession` (dense KV, exact causal attention over each
  sliding-window layer's window, the last queries kept for the method);
* **compression**, in the prompt's last forward pass once its last layer's attention has run
  (the method needs every layer's prefill KV and queries): each row's prefill compressed by
  :meth:`Engine.compress <atskv.core.engine.Engine.compress>`, with room for the tokens that
  will be appended;
* **extension**: tokens appended on top of a compression before decoding (the question of a
  context compressed without it; :meth:`GenerateSession.resume`), exact attention over what the
  stores hold (:class:`~atskv.core.decoding.ExtendSession`);
* **decoding**: one token per row and forward pass, through each row's method and stores
  (:class:`~atskv.core.decoding.DecodeSession`).

``get_seq_length()`` is the number of tokens seen (not the compressed length): generate()
derives positions from it. Rows are sequences of equal length (no padding): each keeps its own
state, as in the engine's batched decoding. :meth:`stats` reads what each row's state holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atskv.core import seam
from atskv.core.decoding import DecodeSession, ExtendSession, Row
from atskv.core.engine import Compressed, Engine, PrefillSession
from atskv.core.method import Method
from atskv.core.types import ConfigError


@dataclass
class KVStats:
    """One batch row's KV cache in its last generation, measured from the tensors its method's
    state holds (:meth:`State.nbytes`); sizes in bytes.

    ``kv_bytes_uncompressed`` is what a full cache holds for the same tokens at the end (every
    token the cache received: prompt, appended question, generated tokens fed back; a
    sliding-window layer at most its window). ``prompt_tokens_kept`` is the mean, min and max
    over layers and KV heads of the prompt tokens kept (a sliding-window layer's: its window),
    ``kept_tokens`` the same per layer and KV head. ``decode_kv_read_bytes``: the mean KV bytes
    a decode step's attention read (sparse methods read less than they hold), None without a
    decode step."""

    prompt_tokens: int
    tokens_seen: int
    kv_bytes_after_compression: int
    kv_bytes_peak: int
    kv_bytes_end: int
    kv_bytes_uncompressed: int
    prompt_tokens_kept: dict[str, float]
    kept_tokens: list[list[int]]
    window_layers: list[int]
    compress_s: float
    decode_steps: int
    decode_kv_read_bytes: float | None

    @property
    def kv_fraction(self) -> float:
        """Peak KV held over the full cache's for the same tokens."""
        return self.kv_bytes_peak / self.kv_bytes_uncompressed


def check_unpadded(attention_mask: Any) -> None:
    """Refuse an attention mask that masks tokens out (a padded batch): the engine's attention
    is causal over every token a row holds and does not read masks."""
    if isinstance(attention_mask, Tensor) and not bool(attention_mask.all()):
        raise ConfigError("compress() supports batches of equal-length prompts without padding "
                         "(the attention_mask has zeros); generate each prompt alone, or group "
                         "prompts of equal length")


class GenerateSession:
    """Seam callbacks for one ``generate()`` call with ``method`` (module docstring).

    ``appended``: the tokens that go on top of the prompt (a question appended after the
    compression, and ``max_new_tokens``): the stores are built with room for them, and a call
    that would append more is stopped with an error rather than overflow them. Made by
    :meth:`prefilling` (prompts to prefill and compress) or :meth:`resume` (a compression to
    continue)."""

    def __init__(self, engine: Engine, method: Method, prompt_len: int, batch: int,
                 appended: int):
        self.engine, self.method = engine, method
        self.prompt_len, self.batch, self.appended = prompt_len, batch, appended
        self.prompts: list[list[int]] = []
        self.prefills: list[PrefillSession] | None = None
        self.compressed: list[Compressed] = []
        #: with ``keep_copy``, each row's compression as it was before anything was appended
        self.keep_copy = False
        self.copies: list[Compressed] = []
        self.seen = 0  # tokens every row's cache has received
        self.fed = 0  # tokens appended after the compression
        self.extend_left = 0  # of those, the first ones extend (a question), not decode
        self.mode = "prefill"
        self.rows: list[Row] = []
        self.decoder: DecodeSession | None = None
        self.extenders: list[ExtendSession] = []
        self._kv: list[tuple[Tensor, Tensor]] = []
        self.kv_after: list[int] = []
        self.kv_peak: list[int] = []
        self.reads: list[list[int]] = [[] for _ in range(batch)]

    @classmethod
    def prefilling(cls, engine: Engine, method: Method, prompts: list[list[int]],
                   appended: int) -> GenerateSession:
        """A session whose forward passes start with the prompts (one per batch row, of equal
        length): they are prefilled, then compressed."""
        s = cls(engine, method, len(prompts[0]), len(prompts), appended)
        s.prompts = prompts
        queries = min(method.queries_needed(), s.prompt_len)
        s.prefills = [PrefillSession(engine.dims["n_layers"], queries, engine.windows)
                      for _ in prompts]
        return s

    @classmethod
    def resume(cls, engine: Engine, method: Method, compressed: Compressed, position: int,
               extend: int, appended: int) -> GenerateSession:
        """A session that starts from ``compressed`` (one row; modified as generation goes on)
        at ``position`` tokens seen: its first ``extend`` tokens are appended with exact
        attention (a question), the rest decoded; ``appended`` in all (the room its stores were
        built with)."""
        s = cls(engine, method, position, 1, appended)
        s.seen, s.extend_left = position, extend
        s._start([compressed])
        return s

    # -- the seam's Session protocol ------------------------------------------------------
    def seen_tokens(self) -> int:
        return self.seen

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s new keys and values ``(B, H_kv, t, d)`` (layer 0 starts a forward
        pass)."""
        if layer == 0:
            self._begin(k.shape[0], k.shape[2])
        if self.mode == "prefill":
            assert self.prefills is not None
            self._kv = [p.update(layer, k[b : b + 1], v[b : b + 1])
                        for b, p in enumerate(self.prefills)]
        return k, v

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None) -> Tensor:
        """``q`` ``(B, H_q, t, d)`` -> ``(B, H_q, t, d)``: each row through its own session."""
        if self.mode == "decode":
            assert self.decoder is not None
            return self.decoder.attention(layer, q, k, v, scale, window)
        if self.mode == "extend":
            return torch.cat([e.attention(layer, q[b : b + 1], k[b : b + 1], v[b : b + 1], scale,
                                          window) for b, e in enumerate(self.extenders)])
        assert self.prefills is not None
        out = torch.cat([p.attention(layer, q[b : b + 1], kb, vb, scale, window)
                         for b, (p, (kb, vb)) in enumerate(zip(self.prefills, self._kv))])
        if layer == self.engine.dims["n_layers"] - 1 and self.seen == self.prompt_len:
            self._compress()  # every layer's prompt KV and queries are in
        return out

    # -- phases ---------------------------------------------------------------------------
    def next_is_prefill(self) -> bool:
        """Whether the next forward pass feeds prompt tokens (before the compression)."""
        return self.prefills is not None and self.seen < self.prompt_len

    def _begin(self, batch: int, t: int) -> None:
        if batch != self.batch:
            raise RuntimeError(f"a forward pass of {batch} sequences in a generation of "
                               f"{self.batch}: beam search and assisted decoding are not "
                               f"supported with a KV-cache method")
        if self.next_is_prefill():
            if self.seen + t > self.prompt_len:
                raise RuntimeError(f"a forward pass of {t} tokens at {self.seen} crosses the "
                                   f"prompt's end ({self.prompt_len})")
            assert self.prefills is not None
            for p in self.prefills:
                p.position = self.seen
            self.mode = "prefill"
            self.seen += t
            return
        if self.prefills is not None:
            raise RuntimeError(f"a forward pass after {self.seen} of the prompt's "
                               f"{self.prompt_len} tokens did not reach the model's last layer")
        self._finish_step()
        if self.fed + t > max(0, self.appended - 1):
            raise RuntimeError(f"{self.fed + t} tokens appended after the compression, more "
                               f"than the {self.appended - 1} it was built for: the generation "
                               f"length must be known when it starts (max_new_tokens)")
        if self.extend_left > 0:
            if t > self.extend_left:
                raise RuntimeError(f"a forward pass of {t} tokens where {self.extend_left} "
                                   f"question tokens were expected")
            self.extend_left -= t
            self.mode = "extend"
            self.extenders = [ExtendSession([r]) for r in self.rows]
        else:
            if t != 1:
                raise RuntimeError(f"a decode step of {t} tokens: a KV-cache method decodes one "
                                   f"token per step (assisted and speculative decoding are not "
                                   f"supported)")
            self.mode = "decode"
            assert self.decoder is not None
            self.decoder.step_read_bytes = [0] * self.batch
        self.fed += t
        self.seen += t

    def _compress(self) -> None:
        """Every row's prefill, compressed by the method (the prefill tensors freed)."""
        assert self.prefills is not None
        dev = self.engine.device
        comps = []
        for p, ids in zip(self.prefills, self.prompts):
            pre = p.result(ids, torch.empty(0, device=dev), 0.0, self.engine.dtype)
            comps.append(self.engine.compress(pre, self.method, self.appended, consume=True))
        self.prefills, self._kv = None, []
        if self.keep_copy:
            self.copies = [c.copy() for c in comps]
        self._start(comps)

    def _start(self, comps: list[Compressed]) -> None:
        self.compressed = comps
        self.rows = [Row(self.method, c.state, self.seen) for c in comps]
        self.decoder = DecodeSession(self.rows)
        self.kv_after = [c.state.nbytes() for c in comps]
        self.kv_peak = list(self.kv_after)

    def _finish_step(self) -> None:
        """Book the previous forward pass after the compression (the KV it read, the KV held)."""
        if self.mode == "decode":
            assert self.decoder is not None
            for b, n in enumerate(self.decoder.step_read_bytes):
                self.reads[b].append(n)
        if self.mode == "extend":  # the question is in: the KV held before decoding grows it
            self.kv_peak = [max(p, r.state.nbytes()) for p, r in zip(self.kv_peak, self.rows)]

    # -- results --------------------------------------------------------------------------
    def stats(self) -> list[KVStats]:
        """Per batch row, what its cache held (after the last forward pass so far)."""
        if not self.compressed:
            return []
        self._finish_step()
        self.mode = "done"
        out = []
        for b, (c, row) in enumerate(zip(self.compressed, self.rows)):
            end = row.state.nbytes()
            kept = [[int(i.numel()) for i in layer] for layer in c.keep]
            flat = [n for layer in kept for n in layer]
            reads = self.reads[b]
            out.append(KVStats(
                prompt_tokens=self.prompt_len, tokens_seen=self.seen,
                kv_bytes_after_compression=self.kv_after[b],
                kv_bytes_peak=max(self.kv_peak[b], end), kv_bytes_end=end,
                kv_bytes_uncompressed=self.engine.full_kv_bytes(self.seen),
                prompt_tokens_kept={"mean": sum(flat) / len(flat), "min": min(flat),
                                    "max": max(flat)},
                kept_tokens=kept, window_layers=sorted(c.state.windows), compress_s=c.seconds,
                decode_steps=len(reads),
                decode_kv_read_bytes=sum(reads) / len(reads) if reads else None))
        return out

    @contextlib.contextmanager
    def running(self, model: Any) -> Iterator[seam.SessionCache]:
        """The context of the ``generate()`` call: the seam's cache for it, the engine's
        attention in the model, this session active, every forward pass in inference mode (the
        stores are inference tensors; what generate() makes between forward passes is not), and
        from the first pass after the prompt on, the decode step's exact linear layers
        (:func:`atskv.core.seam.exact_linears`: a row gets what it gets alone). Forward passes
        the compression runs inside the prompt's last one (a method's reconstruction passes)
        run as in the engine."""
        stack = contextlib.ExitStack()
        passes: list[torch.inference_mode] = []
        exact = False

        def before(module: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
            nonlocal exact
            if not passes:  # generate()'s pass, not one the engine runs inside it (kvzip's)
                check_unpadded(kwargs.get("attention_mask"))
                if not exact and not self.next_is_prefill():
                    stack.enter_context(seam.exact_linears(model))
                    exact = True
            passes.append(torch.inference_mode())
            passes[-1].__enter__()

        def after(module: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
            passes.pop().__exit__(None, None, None)

        hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
                 model.register_forward_hook(after, with_kwargs=True)]
        try:
            with seam.use_engine_attention(model), seam.active(self):
                yield seam.make_cache(model, self)
        finally:
            for h in hooks:
                h.remove()
            while passes:  # a forward pass that raised
                passes.pop().__exit__(None, None, None)
            stack.close()
