"""The generation loop: chunked prefill, compression, greedy decoding with explicit positions.

Batch size 1 (the protocol of every benchmark here and of the papers' efficiency claims).
Measurements are taken here, around device-synchronised regions, and KV sizes are read off the
tensors the cache holds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv import hf_seam
from atskv.kvcache import DenseKV, PackedKV
from atskv.methods.base import Method, PrefillContext
from atskv.metrics.timing import synchronize
from atskv.types import GenerationOutput


class _Session:
    """Per-generation state the seam calls into (see :class:`atskv.hf_seam.Session`)."""

    def __init__(self, method: Method, n_layers: int):
        self.method = method
        self.n_layers = n_layers
        self.prefill: list[DenseKV] | None = [DenseKV() for _ in range(n_layers)]
        self.queries: list[Tensor | None] = [None] * n_layers
        self.store: list[PackedKV] = []
        self.position = 0  # absolute position of the next token
        self.step_read_bytes = 0
        self.kept: list[list[Tensor]] | None = None

    def seen_tokens(self) -> int:
        return self.position

    # -- seam callbacks -------------------------------------------------------------------
    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.prefill is not None:
            return self.prefill[layer].append(k[0], v[0])
        store = self.store[layer]
        self.method.before_append(layer, store)
        store.append(k[0, :, 0], v[0, :, 0])
        return k, v

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if self.prefill is not None:
            return self._prefill_attention(layer, q, k, v, scale)
        _, h_q, _, d = q.shape
        h_kv = self.store[layer].n_heads
        res = self.method.attend(layer, self.store[layer], q[0, :, 0].view(h_kv, h_q // h_kv, d), scale)
        self.step_read_bytes += res.read_bytes
        return res.out.reshape(1, h_q, 1, d)

    def _prefill_attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Exact causal attention of a prompt chunk ``q`` ``(1, H_q, t, d)`` over all prompt keys
        so far ``(H_kv, T, d)``; stashes the last queries for the method's scoring."""
        t, total = q.shape[2], k.shape[1]
        w = self.method.observation_window
        if w:
            prev = self.queries[layer]
            cur = q[0] if prev is None else torch.cat([prev, q[0]], dim=1)
            self.queries[layer] = cur[:, -w:]
        kwargs: dict[str, Any] = {"scale": scale, "enable_gqa": True}
        if t == total:
            kwargs["is_causal"] = True
        else:  # a later chunk: all earlier tokens plus causal inside the chunk
            kwargs["attn_mask"] = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(total - t)
        return F.scaled_dot_product_attention(q, k[None], v[None], **kwargs)

    # -- compression ----------------------------------------------------------------------
    def compress(self, max_new_tokens: int, scale: float) -> None:
        assert self.prefill is not None
        keys = [p.keys for p in self.prefill]
        values = [p.values for p in self.prefill]
        n_heads, prompt_len = keys[0].shape[0], keys[0].shape[1]
        queries = [q if q is not None else keys[0].new_empty(0) for q in self.queries]
        ctx = PrefillContext(keys, values, queries, prompt_len, max_new_tokens, scale)
        keep = self.method.select(ctx)
        if keep is None:
            everything = torch.arange(prompt_len, device=keys[0].device)
            keep = [[everything] * n_heads for _ in keys]
        self.kept = keep
        self.prefill = None  # drop the uncompressed tensors before building the packed ones
        self.queries = [None] * self.n_layers
        for layer in range(self.n_layers):
            lens = [int(i.numel()) for i in keep[layer]]
            room = self.method.headroom(layer, lens)
            self.store.append(self.method.make_store(layer, keys[layer], values[layer], keep[layer], room))
            keys[layer] = values[layer] = None  # type: ignore[call-overload]

    def kv_bytes(self) -> int:
        if self.prefill is not None:
            return sum(p.nbytes() for p in self.prefill)
        return sum(s.nbytes() for s in self.store)


class Engine:
    """Greedy generation with a KV-cache method on a transformers causal LM."""

    def __init__(self, model: Any, tokenizer: Any, method: Method, prefill_chunk: int = 0,
                 cuda_graph: bool = False):
        self.model = model
        self.cuda_graph = cuda_graph
        self.tokenizer = tokenizer
        self.method = method
        self.prefill_chunk = prefill_chunk
        self.dims = hf_seam.model_dims(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        gen_cfg = getattr(model, "generation_config", None)
        ids = {eos} if isinstance(eos, int) else set()
        extra = getattr(gen_cfg, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, list) else ({extra} if isinstance(extra, int) else set())
        self.eos_ids = ids

    def full_kv_bytes(self, n_tokens: int) -> int:
        """Bytes a full cache holds for ``n_tokens`` tokens (all layers, K and V)."""
        d = self.dims
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * d["n_layers"] * d["n_kv_heads"] * d["head_dim"] * itemsize * n_tokens

    @torch.inference_mode()
    def generate(self, input_ids: list[int] | Tensor, max_new_tokens: int,
                 stop_at_eos: bool = True, return_logits: bool = False) -> GenerationOutput:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)
        prompt_len = ids.shape[1]
        if prompt_len + max_new_tokens > self.dims["max_positions"]:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's {self.dims['max_positions']} positions")
        self.method.begin(prompt_len, max_new_tokens)
        session = _Session(self.method, self.dims["n_layers"])
        scale = self.dims["head_dim"] ** -0.5
        logits_seen: list[Tensor] = []
        with hf_seam.use_engine_attention(self.model):
            synchronize(self.device)
            t0 = time.perf_counter()
            chunk = self.prefill_chunk or prompt_len
            for s in range(0, prompt_len, chunk):
                piece = ids[:, s : s + chunk]
                pos = torch.arange(s, s + piece.shape[1], device=self.device).view(1, -1)
                session.position = s
                logits = hf_seam.forward(self.model, session, piece, pos)
            session.position = prompt_len
            kv_prefill_peak = session.kv_bytes()
            session.compress(max_new_tokens, scale)
            token = int(torch.argmax(logits))
            synchronize(self.device)
            ttft = time.perf_counter() - t0
            if return_logits:
                logits_seen.append(logits.float().cpu())
            kv_after = session.kv_bytes()
            tokens = [token]
            read_bytes: list[int] = []
            step = self._stepper(session)
            t1 = time.perf_counter()
            while len(tokens) < max_new_tokens and not (stop_at_eos and token in self.eos_ids):
                logits, step_bytes = step(token)
                read_bytes.append(step_bytes)
                token = int(torch.argmax(logits))
                tokens.append(token)
                if return_logits:
                    logits_seen.append(logits.float().cpu())
            synchronize(self.device)
            decode_s = time.perf_counter() - t1
        kv_peak = session.kv_bytes()
        text_tokens = [t for t in tokens if not (stop_at_eos and t in self.eos_ids)]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True) if self.tokenizer else ""
        stats: dict[str, Any] = {
            "cuda_graph": isinstance(step, _GraphStep) and step.graph is not None,
            "kept_tokens": [[int(i.numel()) for i in layer] for layer in (session.kept or [])],
            "kv_bytes_prefill": kv_prefill_peak,
        }
        if return_logits:
            stats["logits"] = logits_seen
            stats["kept_indices"] = session.kept
        return GenerationOutput(
            token_ids=tokens,
            text=text,
            prompt_tokens=prompt_len,
            ttft_s=ttft,
            decode_s=decode_s,
            decode_tokens=len(tokens) - 1,
            kv_bytes_after_compression=kv_after,
            kv_bytes_peak=max(kv_after, kv_peak),
            kv_bytes_uncompressed=self.full_kv_bytes(prompt_len + max_new_tokens),
            decode_kv_read_bytes=(sum(read_bytes) / len(read_bytes)) if read_bytes else None,
            stats=stats,
        )

    def _stepper(self, session: _Session) -> _EagerStep:
        if self.cuda_graph and self.device.type == "cuda" and getattr(self.method, "static", False):
            return _GraphStep(self.model, session, self.device)
        return _EagerStep(self.model, session, self.device)

    def warmup(self) -> None:
        """One short generation so that one-time costs stay out of the timed samples."""
        n = min(64, self.dims["max_positions"] - 4)
        self.generate(list(range(1, n + 1)), max_new_tokens=3, stop_at_eos=False)


class _EagerStep:
    """One decode step: the token at the session's next position through the model."""

    def __init__(self, model: Any, session: _Session, device: torch.device):
        self.model, self.session, self.device = model, session, device

    def __call__(self, token: int) -> tuple[Tensor, int]:
        s = self.session
        s.step_read_bytes = 0
        pos = torch.tensor([[s.position]], device=self.device)
        logits = hf_seam.forward(self.model, s, torch.tensor([[token]], device=self.device), pos)
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

    def __init__(self, model: Any, session: _Session, device: torch.device):
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
                    self.logits = hf_seam.forward(self.model, s, self.ids, self.pos)
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
