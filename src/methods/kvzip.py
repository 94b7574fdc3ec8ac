"""KVzip (Kim et al., arXiv 2505.23416, NeurIPS 2025): question-agnostic compression by context
reconstruction.

After prefill the model is asked to repeat its prompt from the cache: for each chunk of ``chunk``
prompt tokens (after the first ``n_sink``, which are always kept), the engine feeds "Repeat the
previous context exactly." (later chunks: "Repeat the part of the previous context exactly,
starting with" and the previous chunk's last ``overlap`` tokens), the chat template's turn end
and assistant header, and the chunk itself, at the positions after the prompt
(:class:`~atskv.core.method.Reconstruction`; the cache is not changed). A KV pair's score is the
largest attention any query head of the reconstruction pays it (the softmax over the sinks, the
chunk and the fed tokens; the maximum over the GQA group): what the model needs to restore the
context is what any later question may need. The budget is then spread by these scores over
every layer and KV head together (``allocation=global``: KVzip's default, non-uniform over layers
and heads, the model's total kept exactly), over the heads of each layer (``layer``: kvpress's
``layerwise``), or uniformly per head (``head``: KVzip's ``pair-uniform``). The passes cost about
two prefills of the prompt; they are part of compressing (timed in TTFT). Generated tokens are all
kept. Fidelity notes: docs/methods.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atskv.core.method import METHODS, Method, PrefillContext, Reconstruction, State
from atskv.methods.scoring import topk_sorted

ALLOCATIONS = ("global", "layer", "head")
FIRST = "\n\nRepeat the previous context exactly."
NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
log = logging.getLogger(__name__)


def chat_suffix(tokenizer: Any) -> list[int]:
    """What the tokenizer's chat template puts after a user message's content, up to the
    assistant's reply ("\\n" without a template), as token ids."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode("\n", add_special_tokens=False)
    mark = "\u2063" * 3
    text = tokenizer.apply_chat_template([{"role": "user", "content": "context" + mark}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text.split(mark, 1)[1], add_special_tokens=False)


@METHODS.register("kvzip")
@dataclass(frozen=True)
class KVzip(Method[State]):
    """KVzip's settings as kvpress runs them: chunks of 2048 tokens (KVzip's own code: 2000), 8
    overlap tokens, 4 sinks, budgets over every layer and head."""

    chunk: int = 2048
    overlap: int = 8
    n_sink: int = 4
    allocation: str = "global"

    paper = "https://arxiv.org/abs/2505.23416"
    uses_tokenizer = True
    # the reconstruction's chunking, the sinks and how the budget is spread
    search_space = {
        "chunk": "choice(256, 512, 1024, 2048)",
        "n_sink": "choice(0, 4, 16, 64)",
        "allocation": "choice(global, layer, head)",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("chunk", self.chunk, self.chunk >= 1, "must be >= 1")
        for name in ("overlap", "n_sink"):
            self.check(name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        self.check("allocation", self.allocation, self.allocation in ALLOCATIONS,
                   f"is unknown; choose one of {', '.join(ALLOCATIONS)}")

    def reconstruction(self, prompt: Sequence[int], tokenizer: Any,
                       question_follows: bool = False) -> list[Reconstruction]:
        n = len(prompt)
        keep = self.prompt_keep(n)
        if keep >= n:
            return []
        # a budget below the sinks keeps the first tokens
        return reconstruction_passes(prompt, tokenizer, min(self.n_sink, keep), self.chunk,
                                     self.overlap)

    def select(self, state: State, ctx: PrefillContext) -> list[list[Tensor]] | None:
        n = ctx.prompt_len
        if state.keep >= n:
            return None
        if ctx.reconstruction is None:
            raise ValueError("kvzip scores with the engine's reconstruction passes; this "
                             "PrefillContext has none (see Method.reconstruction)")
        sinks = min(self.n_sink, state.keep)
        scores = torch.stack([s[:, sinks:] for s in ctx.reconstruction])  # (N, H, L - sinks)
        n_layers, h, m = scores.shape
        per_head = state.keep - sinks
        if self.allocation == "head":
            counts = torch.full((n_layers, h), per_head)
        elif self.allocation == "layer":
            counts = torch.stack([_won(s, h * per_head) for s in scores])
        else:
            counts = _won(scores.flatten(0, 1), n_layers * h * per_head).view(n_layers, h)
        head = torch.arange(sinks, device=scores.device)
        return [[torch.cat([head, topk_sorted(scores[i, j], int(counts[i, j])) + sinks])
                 for j in range(h)] for i in range(n_layers)]


def reconstruction_passes(prompt: Sequence[int], tokenizer: Any, sinks: int, chunk: int,
                          overlap: int) -> list[Reconstruction]:
    """KVzip's passes over ``prompt`` after its first ``sinks`` tokens: per chunk of ``chunk``
    tokens, the repeat prompt (later chunks: the continue prompt and the previous chunk's last
    ``overlap`` tokens), the chat template's turn end and the chunk itself."""
    if tokenizer is None:  # tests without a tokenizer: the chunks alone, said once
        log.warning("kvzip without a tokenizer: reconstructing without the repeat prompt")
        first, nxt, suffix = [], [], []
    else:
        first, nxt = (tokenizer.encode(t, add_special_tokens=False) for t in (FIRST, NEXT))
        suffix = chat_suffix(tokenizer)
    ids, n = list(prompt), len(prompt)
    passes = []
    for s in range(sinks, n, chunk):
        e = min(s + chunk, n)
        ask = first if s == sinks else nxt + ids[max(sinks, s - overlap) : s]
        passes.append(Reconstruction(tuple(ask + suffix + ids[s:e]), s, e, sinks))
    return passes


def _won(scores: Tensor, total: int) -> Tensor:
    """``(R,)``: how many of the ``total`` best entries of ``scores`` ``(R, M)`` each row holds."""
    top = torch.topk(scores.flatten(), total).indices // scores.shape[1]
    return torch.bincount(top, minlength=scores.shape[0])
