"""Extra forward passes after prefill that score the prompt's tokens by the attention they receive
(KVzip's context reconstruction, arXiv 2505.23416): :func:`reconstruction_scores` runs the
:class:`~atskv.core.method.Reconstruction` passes a method asks for over an uncompressed prefill,
without changing it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from atskv.core import seam
from atskv.core.method import Reconstruction

#: fed tokens whose scoring logits are materialised at once (bounds the pass's extra memory)
QUERY_BLOCK = 128


class _ReconstructSession:
    """Seam callbacks for one pass: the fed tokens' keys/values go after the prompt's (a copy per
    layer, dropped after the pass), attention is exact and causal, and every layer's attention to
    the pass's prompt range is reduced into ``scores``."""

    def __init__(self, keys: Sequence[Tensor], values: Sequence[Tensor], prompt_len: int,
                 recon: Reconstruction, scores: list[Tensor]):
        self.keys, self.values = keys, values
        self.prompt_len = prompt_len
        self.recon = recon
        self.scores = scores
        self.position = prompt_len

    def seen_tokens(self) -> int:
        return self.position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.cat([self.keys[layer], k[0]], dim=1),
                torch.cat([self.values[layer], v[0]], dim=1))

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  window: int | None) -> Tensor:
        """``q`` ``(1, H_q, t, d)`` of the fed tokens over the prompt tokens the layer holds and
        themselves ``(H_kv, T + t, d)``, each query over at most ``window`` keys when the layer
        slides. Only layers holding the whole prompt are scored (a sliding layer that kept only
        its window is not compressed by the method); their scores' softmax spans every held key."""
        t, total = q.shape[2], k.shape[1]
        qpos = torch.arange(total - t, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        r = self.recon
        if total - t == self.prompt_len:
            sub = torch.cat([k[:, : r.sink], k[:, r.start : r.end], k[:, total - t :]], dim=1)
            best = subsampled_max_attention(q[0], sub, r.sink, r.end - r.start, scale)
            self.scores[layer][:, r.start : r.end] = best
        return F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask, scale=scale,
                                              enable_gqa=True)


def subsampled_max_attention(q: Tensor, keys: Tensor, sink: int, n: int, scale: float) -> Tensor:
    """``(H_kv, n)``: for each of the ``n`` keys after the first ``sink`` of ``keys`` ``(H_kv,
    sink + n + t, d)``, the largest softmax probability any query of ``q`` ``(H_q, t, d)`` gives
    it over the GQA group, the softmax over all of ``keys``; query ``i`` sees the last ``t``
    keys (its own tokens) causally, up to its own. Computed as ``exp(max_i (l_ij - lse_i))``
    (one exponential per logit, inside the log-sum-exp)."""
    h_q, t, d = q.shape
    h_kv, total, _ = keys.shape
    g = h_q // h_kv
    qg = q.view(h_kv, g, t, d).float()
    kt = keys.float().transpose(1, 2).contiguous()  # (H_kv, d, S)
    own = torch.arange(t, device=q.device)
    best = torch.full((h_kv, n), float("-inf"), device=q.device)
    for a in range(0, t, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, t)
        logits = torch.bmm(qg[:, :, a:b].reshape(h_kv, g * (b - a), d), kt).mul_(scale)
        logits = logits.view(h_kv, g, b - a, total)
        future = own[None, :] > own[a:b, None]  # (b - a, t): a fed token after the query
        logits[..., sink + n :].masked_fill_(future, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        best = torch.maximum(best, (logits[..., sink : sink + n] - lse).amax(dim=(1, 2)))
    return best.exp()


@torch.inference_mode()
def reconstruction_scores(model: Any, keys: Sequence[Tensor], values: Sequence[Tensor],
                          prompt_len: int, passes: Sequence[Reconstruction]) -> list[Tensor]:
    """Run ``passes`` after a prefill of ``prompt_len`` tokens (``keys``, ``values``: per layer
    ``(H_kv, L, d)``, left unchanged): per layer ``(H_kv, L)`` float32 scores, 0 where no pass
    scored a token."""
    scores = [torch.zeros(k.shape[0], prompt_len, device=k.device) for k in keys]
    device = keys[0].device
    with seam.use_engine_attention(model):
        for recon in passes:
            if not 0 <= recon.sink <= recon.start <= recon.end <= prompt_len:
                raise ValueError(f"reconstruction range sink={recon.sink}, [{recon.start}, "
                                 f"{recon.end}) is not inside the {prompt_len}-token prompt")
            session = _ReconstructSession(keys, values, prompt_len, recon, scores)
            ids = torch.tensor([recon.ids], dtype=torch.long, device=device)
            pos = torch.arange(prompt_len, prompt_len + ids.shape[1], device=device)[None]
            seam.forward(model, session, ids, pos)
    return scores
