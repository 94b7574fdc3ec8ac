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
#: the same on CPU, where 32 keeps a block's logits in a core's L2 cache at a few thousand keys
CPU_QUERY_BLOCK = 32
#: below this share of a query's exponentials (each relative to its largest logit) the
#: subsampled softmax's sum is taken again from its own logits: terms that underflowed would
#: otherwise count (at 1e-20 the lost terms weigh below e^-41 of the sum)
SUB_MASS_FLOOR = 1e-20


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
        r = self.recon
        if total - t == self.prompt_len and (window is None or window >= total):
            out, best = scored_attention(q[0], k, v, scale, r.sink, r.start, r.end)
            self.scores[layer][:, r.start : r.end] = best
            return out[None]
        qpos = torch.arange(total - t, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        if total - t == self.prompt_len:
            _, best = scored_attention(q[0], k, v, scale, r.sink, r.start, r.end, output=False)
            self.scores[layer][:, r.start : r.end] = best
        return F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask, scale=scale,
                                              enable_gqa=True)


def scored_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float, sink: int,
                     start: int, end: int, output: bool = True) -> tuple[Tensor | None, Tensor]:
    """One pass of ``t`` fed tokens' queries ``q`` ``(H_q, t, d)`` over the ``T`` prompt keys
    and their own ``(H_kv, T + t, d)`` (``values`` alike), query ``i`` seeing every prompt key
    and its own tokens causally, up to itself; the logits are computed once for two results:

    * the attention output ``(H_q, t, d)`` (in ``q``'s dtype), what the model's attention gives
      (None with ``output=False``: a sliding layer's output is masked to its window elsewhere);
    * ``(H_kv, end - start)``: for each prompt key in ``[start, end)`` the largest probability
      any query of the GQA group gives it under KVzip's subsampled softmax, which spans only the
      first ``sink`` keys, ``[start, end)`` and the fed tokens (``exp(max_i (l_ij - lse_i))``,
      the log-sum-exp over those keys).

    Queries go in blocks of :data:`QUERY_BLOCK` (:data:`CPU_QUERY_BLOCK` on CPU)."""
    h_q, t, d = q.shape
    h_kv, total, _ = keys.shape
    g, prompt, n = h_q // h_kv, total - t, end - start
    qg = q.reshape(h_kv, g, t, d).float()
    kt = keys.float().transpose(1, 2).contiguous()  # (H_kv, d, T + t)
    whole = start == sink and end == prompt  # the subsampled softmax spans every key
    own = torch.arange(t, device=q.device)
    vf = values.float() if output else None
    out = torch.empty(h_kv, g, t, d, device=q.device) if output else None
    best = torch.full((h_kv, n), float("-inf"), device=q.device)
    block = QUERY_BLOCK if q.is_cuda else CPU_QUERY_BLOCK
    for a in range(0, t, block):
        b = min(a + block, t)
        logits = torch.bmm(qg[:, :, a:b].reshape(h_kv, g * (b - a), d), kt).mul_(scale)
        logits = logits.view(h_kv, g, b - a, total)
        future = own[None, :] > own[a:b, None]  # (b - a, t): a fed token after the query
        logits[..., prompt:].masked_fill_(future, float("-inf"))
        top = logits.amax(dim=-1, keepdim=True)
        p = (logits - top).exp_()
        mass = p.sum(dim=-1, keepdim=True)
        if out is not None:
            out[:, :, a:b] = torch.bmm(p.view(h_kv, g * (b - a), total), vf).view(
                h_kv, g, b - a, d).div_(mass)
        sub = mass if whole else (p[..., :sink].sum(dim=-1, keepdim=True)
                                  + p[..., start:end].sum(dim=-1, keepdim=True)
                                  + p[..., prompt:].sum(dim=-1, keepdim=True))
        if (sub >= SUB_MASS_FLOOR).all():
            lse = top + sub.log()
        else:  # the subsampled keys lie far below the block's largest logit: exactly
            lse = torch.logsumexp(torch.cat([logits[..., :sink], logits[..., start:end],
                                             logits[..., prompt:]], dim=-1), dim=-1, keepdim=True)
        best = torch.maximum(best, (logits[..., start:end] - lse).amax(dim=(1, 2)))
    return (None if out is None else out.view(h_q, t, d).to(q.dtype)), best.exp()


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
