"""Helpers shared by the benchmark tests: config namespaces, JSONL files, an offline hub."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace


def bench_cfg(name: str, **kw) -> SimpleNamespace:
    """A ``benchmark`` config with every field unset but ``name`` (``kw`` overrides)."""
    base = dict(
        name=name,
        n_samples=None,
        tasks=None,
        data_dir=None,
        max_new_tokens=None,
        haystack=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def write_jsonl(path: Path, rows) -> Path:
    """One line per row (dicts as JSON, strings verbatim, for malformed lines); makes parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def offline_hub(monkeypatch) -> None:
    """Make ``datasets.load_dataset`` fail as it does without a network."""
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def generate(model, method, prompt, n, tokenizer=None, **kw):
    """One greedy generation through the engine (no early stop unless asked)."""
    from atskv.core.engine import Engine

    kw.setdefault("stop_at_eos", False)
    return Engine(model, tokenizer).generate(prompt, method, n, **kw)


def small_llama(tie: bool = True):
    """A 2-layer random Llama (vocabulary 96) built in-process with seed 0, in eval mode; its
    input embeddings tied to its output layer or not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


#: float32's unit roundoff (half an ulp of 1)
U = 2.0**-24


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of a sum or dot product
    of ``n`` float32 terms, in any order, with or without fused multiply-adds."""
    return n * U / (1 - n * U)


def attention_rel_bound(q, k, scale: float, rows: int, exact_logits: bool = False) -> float:
    """A bound, relative to ``sum_i w_i |v_i|`` (the attention of the same weights over the
    values' magnitudes), on the error of any float32 attention of queries ``q`` over at most
    ``rows`` rows of keys ``k`` (``(..., d)`` both; the largest norms are what counts), derived
    from the arithmetic rather than read off one machine:

    * each logit ``scale q.k_i`` is a dot product of ``d`` terms and a product: its error is at
      most ``D = gamma(d + 2) scale |q| |k_i|`` (Cauchy-Schwarz bounds ``sum_j |q_j k_ij|``), which
      moves every softmax weight by a factor within ``exp(+-2 D)``;
    * subtracting the running maximum costs ``u |s_i - m| <= 2 u S`` (``S = scale |q| |k|``), an
      exponential a few ulp (vectorised ones: at most 2), the softmax's sum and the weighted sum
      of values ``gamma`` of twice the rows (online softmax rescales partial sums once per block
      at most), and the division one rounding: ``8 u + 3 gamma(2 rows + 2)`` in all.

    ``exact_logits``: the logits and their differences are exact in float32 (small integers), so
    only the second part applies. First-order terms; :func:`assert_attention_close` allows 1%
    over them for the products."""
    if exact_logits:
        return 8 * U + 3 * gamma(2 * rows + 2)
    d = q.shape[-1]
    qn = float(q.double().norm(dim=-1).max())
    kn = float(k.double().norm(dim=-1).max()) if k.numel() else 0.0
    s = scale * qn * kn
    logit = gamma(d + 2) * s
    return math.expm1(2 * logit) + 2 * U * s + 8 * U + 3 * gamma(2 * rows + 2)


def assert_attention_close(out, ref64, abs64, rel: float) -> None:
    """``out`` (float32 attention) within ``rel`` (:func:`attention_rel_bound`) of ``ref64`` (the
    same attention in float64), relative to ``abs64`` (the float64 attention over ``|v|``),
    elementwise."""
    import torch

    err = (out.double() - ref64).abs()
    allowed = 1.01 * rel * abs64 + torch.finfo(torch.float32).tiny
    worst = (err / allowed).max()
    assert worst <= 1, f"error {float(err.max()):.3g} exceeds the bound by {float(worst):.3g}x"
